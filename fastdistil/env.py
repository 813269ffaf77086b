"""`python -m fastdistil.env`: which implementation of each op this machine runs, and why, per device and dtype.

Paste its output into a bug report. The decisions are the support matrix of the README ("The student's attention,
and GPUs"): on CPU the C++ kernels and PyTorch SDPA; on sm80 and newer the Triton loss in fp32/fp16/bf16 and
Triton attention in fp16/bf16 (fp32 attention goes to SDPA, whose fp32 kernels are several times faster than the
Triton kernel's exact fp32 dots); on Volta (sm70) the Triton loss in fp32/fp16 only (the chip has no bf16) and
SDPA's memory-efficient attention. The lines come from fastdistil.ops.triple_loss.auto_backend and
fastdistil.ops.attention.auto_backend, the functions the dispatch calls, and on a GPU a last line says whether
torch.compile traces the loss's Triton kernels.
"""

import os
import platform
import sys

import torch

from fastdistil import __version__
from fastdistil.ops import extension
from fastdistil.ops.attention import auto_backend as attention_backend_of
from fastdistil.ops.sparse_triple_loss import backend_for as sparse_backend_of
from fastdistil.ops.triple_loss import auto_backend as loss_backend_of
from fastdistil.ops.triple_loss import triton_kernels_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIM = 64  # DistilBERT's, for the attention lines
LOSS_IMPLEMENTATIONS = {"cpp": "C++ kernel", "triton": "Triton kernel", "reference": "unfused reference",
                        "unsupported": "unsupported"}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def architecture(major: int, minor: int) -> str:
    if major == 7:
        return "Turing" if minor >= 5 else "Volta"
    if major == 8:
        return "Ada" if minor >= 9 else "Ampere"
    return {6: "Pascal", 9: "Hopper", 10: "Blackwell", 12: "Blackwell"}.get(major, "unknown architecture")


def compute_capability(device: torch.device) -> str:
    """The device's compute capability and architecture, e.g. "sm70 (Volta)"."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor} ({architecture(major, minor)})"


def triple_loss_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(implementation, why) of fastdistil.triple_loss(backend="auto") for logits of this device and dtype."""
    backend, why = loss_backend_of(device, dtype)
    return LOSS_IMPLEMENTATIONS[backend], why


def sparse_triple_loss_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(implementation, why) of fastdistil.sparse_triple_loss(backend="auto"), the loss against a teacher cache."""
    backend, why = sparse_backend_of(device, dtype)
    return LOSS_IMPLEMENTATIONS[backend], why


def fused_linear_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(implementation, why) of fastdistil.fused_linear_triple_loss: chunks of projections, each chunk's loss by
    the device's loss kernel; it has no unfused fallback."""
    loss, why = triple_loss_backend(device, dtype)
    if loss == "unfused reference":
        return "unavailable", why
    if loss == "unsupported":
        return loss, why
    return f"chunked projections + {loss} per chunk", why


def attention_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(implementation, why) of fastdistil.attention(backend="auto") at head dim HEAD_DIM."""
    backend, why = attention_backend_of(device, dtype, HEAD_DIM)
    if backend == "sdpa" and device.type == "cuda" and dtype == torch.bfloat16:
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:  # SDPA's memory-efficient kernel takes fp16/fp32 only before sm80
            why += f"; {compute_capability(device)} has no bf16, so SDPA runs its unfused math kernel"
    return backend, why


def compile_mode() -> str:
    """How torch.compile handles the loss op on CUDA: its Triton kernels traced into the graph, or the op kept
    opaque, and why (fastdistil.kernels.triple_loss.traced_compile_unsupported)."""
    error = triton_kernels_error()
    if error:
        return f"no Triton kernels to compile ({error})"
    from fastdistil.kernels.triple_loss import traced_compile_unsupported

    why = traced_compile_unsupported()
    return f"keeps triple_loss opaque: {why}" if why else "traces triple_loss's Triton kernels into its graph"


def _device_lines(device: torch.device) -> list[str]:
    lines = []
    for op, decide in (("triple_loss", triple_loss_backend), ("fused_linear_triple_loss", fused_linear_backend),
                       ("sparse_triple_loss", sparse_triple_loss_backend), ("attention", attention_backend)):
        for dtype_name, dtype in DTYPES.items():
            impl, why = decide(device, dtype)
            lines.append(f"  {op:<25} {dtype_name}  {impl} -- {why}")
    return lines


def report() -> str:
    triton_version = _triton_version()
    lines = [
        f"fastdistil {__version__}, python {sys.version.split()[0]} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), {torch.get_num_threads()} intra-op threads",
        f"triton {triton_version or 'not installed'}",
    ]
    if extension.AVAILABLE:
        supported = ", ".join(extension._C.supported_cpu_isas())
        chosen = ("set by FASTDISTIL_CPU_ISA" if os.environ.get("FASTDISTIL_CPU_ISA")
                  else "the best of those this CPU runs")
        lines.append(f"fastdistil._C: loaded; CPU kernels use {extension.cpu_isa()}, {chosen} ({supported})")
    else:
        lines.append(f"fastdistil._C: NOT loaded ({extension.ERROR}). {extension.HOW_TO_FIX}")
    lines.append(f"attention lines are for head dim {HEAD_DIM}")
    lines.append("cpu:")
    lines += _device_lines(torch.device("cpu"))
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        lines.append(f"cuda: not available ({why})")
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        device = torch.device("cuda", index)
        lines.append(f"{device}: {torch.cuda.get_device_name(index)}, {compute_capability(device)}")
        lines += _device_lines(device)
    if torch.cuda.is_available():
        lines.append(f"torch.compile on cuda: {compile_mode()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
