"""What a GPU result must say about the device that produced it: the GPU, its driver and the software stack.

Every result of test_bench_gpu.py and every CUDA result of test_bench_train_step.py carries these facts in its
extra_info (and conftest.py puts them in the run's machine_info), so that a number can never be read without
the chip, driver, CUDA, torch and Triton it was measured with. On a CPU (the GPU benchmarks' dry run) the same
keys are present, with None where a CPU has no such thing: bench/report.py reads device == "cpu" in a GPU
results file as a dry run.
"""

import functools
import subprocess

import torch


def driver_version() -> str | None:
    """The NVIDIA driver's version (e.g. 570.124.06). torch only knows the CUDA API version the driver
    supports, so this asks nvidia-smi; None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().split("\n")[0].strip() or None


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def dram_gbps(index: int) -> float | None:
    """The DRAM bandwidth from the memory clock and bus width (triton.testing.get_dram_gbps); None where the
    driver does not report them (newer CUDA releases deprecate the memory-clock attribute), since a missing
    yardstick must not fail a benchmark."""
    import triton.testing

    try:
        return triton.testing.get_dram_gbps(index) or None
    except Exception:  # whatever Triton's driver query raises on this driver
        return None


@functools.cache
def device_facts(device: torch.device) -> dict:
    """device, gpu (name), capability ("sm90"), driver, cuda (torch's build), torch, triton, gpu_memory_gb,
    sm_count and peak_dram_gbps (dram_gbps)."""
    facts = dict(device=device.type, gpu=None, capability=None, driver=None, cuda=torch.version.cuda,
                 torch=torch.__version__, triton=triton_version(), gpu_memory_gb=None, sm_count=None,
                 peak_dram_gbps=None)
    if device.type != "cuda":
        return facts
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    facts.update(gpu=props.name, capability=f"sm{props.major}{props.minor}", driver=driver_version(),
                 gpu_memory_gb=props.total_memory / 1e9, sm_count=props.multi_processor_count,
                 peak_dram_gbps=dram_gbps(index))
    return facts
