"""`python -m fastdistil.env`: its report on this machine, and its dispatch decisions on GPUs faked by patching
torch.cuda's device queries (nothing here needs a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdistil import env, extension

REPO = Path(__file__).resolve().parents[1]
OPS = ("triple_loss", "fused_linear_triple_loss", "sparse_triple_loss", "attention")


def device_section(report: str, header: str) -> dict[tuple[str, str], str]:
    """{(op, dtype): "implementation -- why"} of the indented lines under the line starting with header."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    section = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        op, dtype, decision = line.split(maxsplit=2)
        section[op, dtype] = decision
    return section


def test_module_runs_and_describes_the_cpu():
    proc = subprocess.run([sys.executable, "-m", "fastdistil.env"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out
    assert "triton " in out
    cpu = device_section(out, "cpu:")
    assert set(cpu) == {(op, dtype) for op in OPS for dtype in env.DTYPES}
    for dtype in env.DTYPES:
        assert cpu["attention", dtype].startswith("sdpa")
        if extension.AVAILABLE:
            assert cpu["triple_loss", dtype] == f"C++ kernel -- fastdistil._C, {extension.cpu_isa()} code path"
            assert cpu["sparse_triple_loss", dtype] == cpu["triple_loss", dtype]
            assert cpu["fused_linear_triple_loss", dtype].startswith("chunked projections + C++ kernel per chunk")
    if extension.AVAILABLE:
        assert f"fastdistil._C: loaded; CPU kernels use {extension.cpu_isa()}" in out
    if not torch.cuda.is_available():
        assert "cuda: not available" in out


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus((7, 0), (8, 0), ...) makes torch.cuda report one device per compute capability. Whether the
    Triton kernels load is decided once per process (triton_kernels_error is cached): each test decides afresh,
    after its own patches, and leaves no decision behind."""
    kernels_error = sys.modules["fastdistil.ops.triple_loss"].triton_kernels_error
    kernels_error.cache_clear()
    yield install_fake_gpus(monkeypatch)
    kernels_error.cache_clear()


def install_fake_gpus(monkeypatch):
    def install(*capabilities):
        def index(device=None):
            return device if isinstance(device, int) else torch.device(device).index or 0

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[index(device)])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU {index(device)}")
        return env.report()

    return install


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")
    if not extension.AVAILABLE:
        pytest.skip("needs fastdistil._C (it defines the loss op the Triton kernel implements)")


def test_volta_gets_triton_loss_without_bf16_and_sdpa_attention(fake_gpus, needs_triton):
    report = fake_gpus((7, 0))
    assert "cuda:0: Fake GPU 0, sm70 (Volta)" in report
    gpu = device_section(report, "cuda:0:")
    for op in ("triple_loss", "fused_linear_triple_loss", "sparse_triple_loss"):
        assert "Triton kernel" in gpu[op, "fp32"] and "Triton kernel" in gpu[op, "fp16"]
        assert gpu[op, "bf16"].startswith("unsupported") and "no bf16" in gpu[op, "bf16"]
    for dtype in env.DTYPES:
        assert gpu["attention", dtype].startswith("sdpa -- sm70")
    assert "math kernel" in gpu["attention", "bf16"]


@pytest.mark.parametrize("capability, name", [((8, 0), "Ampere"), ((8, 9), "Ada"), ((9, 0), "Hopper")])
def test_sm80_and_newer_get_triton_except_fp32_attention(fake_gpus, needs_triton, capability, name):
    report = fake_gpus(capability)
    major, minor = capability
    assert f"sm{major}{minor} ({name})" in report
    gpu = device_section(report, "cuda:0:")
    for dtype in env.DTYPES:
        assert gpu["triple_loss", dtype].startswith("Triton kernel")
        assert gpu["sparse_triple_loss", dtype].startswith("Triton kernel")
        assert gpu["fused_linear_triple_loss", dtype].startswith("chunked projections + Triton kernel per chunk")
    assert gpu["attention", "fp32"].startswith("sdpa -- fp32")
    for dtype in ("fp16", "bf16"):
        assert gpu["attention", dtype].startswith("triton")


def test_each_device_decided_on_its_own_capability(fake_gpus, needs_triton):
    report = fake_gpus((7, 0), (8, 0))
    assert device_section(report, "cuda:0:")["triple_loss", "bf16"].startswith("unsupported")
    assert device_section(report, "cuda:1:")["triple_loss", "bf16"].startswith("Triton kernel")


def test_pre_volta_has_no_triton_loss(fake_gpus, needs_triton):
    gpu = device_section(fake_gpus((6, 1)), "cuda:0:")
    for dtype in env.DTYPES:
        assert gpu["triple_loss", dtype] == "unsupported -- sm61: Triton runs on sm70 and newer"
        assert gpu["attention", dtype].startswith("sdpa")


def test_without_triton_cuda_falls_back(fake_gpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    report = fake_gpus((8, 0))
    assert "triton not installed" in report
    gpu = device_section(report, "cuda:0:")
    why = "Triton is not installed" if extension.AVAILABLE else "fastdistil._C"
    for dtype in env.DTYPES:
        assert gpu["triple_loss", dtype].startswith(f"unfused reference -- {why}")
        assert gpu["fused_linear_triple_loss", dtype].startswith("unavailable")
    assert gpu["attention", "fp32"].startswith("sdpa -- fp32")  # SDPA with or without Triton
    for dtype in ("fp16", "bf16"):
        assert gpu["attention", dtype].startswith("sdpa -- Triton is not installed")


def test_without_extension_the_loss_is_the_reference(fake_gpus, monkeypatch):
    monkeypatch.setattr(extension, "AVAILABLE", False)
    monkeypatch.setattr(extension, "ERROR", "ImportError: undefined symbol")
    report = fake_gpus((8, 0))
    assert "fastdistil._C: NOT loaded (ImportError: undefined symbol)" in report
    for header in ("cpu:", "cuda:0:"):
        section = device_section(report, header)
        for dtype in env.DTYPES:
            assert section["triple_loss", dtype].startswith("unfused reference -- fastdistil._C")
            assert section["fused_linear_triple_loss", dtype].startswith("unavailable -- fastdistil._C")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bf16_loss_on_volta_is_refused_by_name(fake_gpus, needs_triton, backend):
    """The dispatch itself refuses what the report calls unsupported, before any kernel runs (fake CUDA tensors
    stand in for a V100's)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastdistil

    fake_gpus((7, 0))
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = torch.empty(4, 30, device="cuda", dtype=torch.bfloat16)
        hidden = torch.empty(4, 8, device="cuda", dtype=torch.bfloat16)
        labels = torch.full((4,), -100, device="cuda", dtype=torch.long)
        mask = torch.ones(4, device="cuda", dtype=torch.long)
        with pytest.raises(ValueError, match=r"bfloat16 .*cuda.*sm70 has no bf16; use fp16 or fp32"):
            fastdistil.triple_loss(logits, logits, labels, hidden, hidden, mask, backend=backend)
