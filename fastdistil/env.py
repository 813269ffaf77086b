"""`python -m fastdistil.env`: which implementation of each op this machine will run, and why.

Paste its output into a bug report.
"""

import platform
import sys

import torch

from fastdistil import __version__, extension


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def report() -> str:
    triton_version = _triton_version()
    lines = [
        f"fastdistil {__version__}",
        f"python {sys.version.split()[0]} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
        f"triton {triton_version or 'not installed'}",
        f"C++ extension fastdistil._C: {'loaded' if extension.AVAILABLE else 'NOT loaded: ' + str(extension.ERROR)}",
    ]
    if extension.AVAILABLE:
        supported = ", ".join(extension._C.supported_cpu_isas())
        lines.append(f"CPU instruction sets supported: {supported}; kernels use: {extension.cpu_isa()}")
        lines.append("triple_loss on CPU tensors: C++ kernel (fastdistil._C)")
    else:
        lines.append(f"triple_loss on CPU tensors: unfused reference, because {extension.HOW_TO_FIX}")
    if not torch.cuda.is_available():
        lines.append("CUDA: not available")
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if not extension.AVAILABLE:
            impl = "unfused reference (the extension defines the op)"
        elif triton_version is None:
            impl = "unfused reference (Triton is not installed: pip install triton)"
        else:
            bf16 = ", bf16)" if major >= 8 else "; no bf16 on this chip)"
            impl = f"Triton kernel (sm{major}{minor}; fp32/fp16{bf16}"
        lines.append(f"cuda:{index} {name}: triple_loss -> {impl}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
