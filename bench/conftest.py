"""Shared fixtures of the benchmark suites, and what every result records about the machine that produced it.

bench/ is run explicitly (`pytest bench/`); pyproject's testpaths keeps it out of the default test run. Every
item here gets the `bench` marker, so `pytest tests bench -m "not bench"` also leaves it out.
"""

import os
import time
from pathlib import Path

import pytest
import torch

# The GPU benchmarks' dry run (FASTDISTIL_BENCH_TINY=1 without CUDA) runs the Triton kernels in Triton's
# interpreter, a mode Triton fixes when it is first imported: before any suite (or transformers) imports it.
if os.environ.get("FASTDISTIL_BENCH_TINY", "0") == "1" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.bandwidth import copy_bandwidth as measure_copy_bandwidth  # noqa: E402
from bench.gpu import device_facts  # noqa: E402
from bench.machine import CpuContention, cpu_flags, cpu_model, git_revision  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent

_SESSION = {}  # what the fixtures measured, for the machine_info hook at the end of the session


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a benchmark (bench/); run explicitly with `pytest bench/`")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BENCH_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.bench)


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Read+write bytes/s of a large tensor copy on all intra-op threads, measured once per session."""
    with CpuContention() as contention:
        result = measure_copy_bandwidth()
    result["other_cpu_fraction"] = contention.other_fraction
    _SESSION["copy_bandwidth"] = result
    return result["bytes_per_s"]


@pytest.fixture(autouse=True)
def _case_wall_time(request):
    """Every benchmark's extra_info gets its case's wall time (inputs, models, compiles, warm-up and timing
    together), what a time budget such as the GPU check's is spent on."""
    start = time.perf_counter()
    yield
    benchmark = request.node.funcargs.get("benchmark")
    if benchmark is not None:
        benchmark.extra_info["case_wall_s"] = time.perf_counter() - start


# optionalhook: without pytest-benchmark nobody defines this hook, and pytest would refuse to start.
@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    import transformers

    import fastdistil

    machine_info["cpu_model"] = cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["cpu_flags"] = cpu_flags()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch_version"] = torch.__version__
    machine_info["transformers_version"] = transformers.__version__
    machine_info["fastdistil_version"] = fastdistil.__version__
    machine_info["fastdistil_git"] = git_revision()
    machine_info["fastdistil_cpu_isa"] = fastdistil.extension.cpu_isa()
    if "copy_bandwidth" in _SESSION:
        machine_info["copy_bandwidth"] = _SESSION["copy_bandwidth"]
    if torch.cuda.is_available():
        machine_info["gpu"] = device_facts(torch.device("cuda", torch.cuda.current_device()))
