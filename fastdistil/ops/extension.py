"""Loads fastdistil._C, the compiled CPU kernels, and says loudly when it cannot.

Without the extension, the ops it defines (torch.ops.fastdistil.triple_loss, triple_loss_out and the private ops
behind them) do not exist and fastdistil.triple_loss(backend="auto") falls back to the unfused reference: correct,
but an order of magnitude slower. The ops defined in Python (attention; fused_linear_triple_loss, which then
raises) still exist. With FASTDISTIL_REQUIRE_EXTENSION=1 (CI sets it) a missing extension is an import error
instead.
"""

import os
import warnings

import torch

try:
    from fastdistil import _C  # noqa: F401  (loading the library registers torch.ops.fastdistil)

    AVAILABLE = True
    ERROR = None
except (ImportError, OSError) as exc:  # OSError: built against another torch (undefined symbol)
    _C = None
    AVAILABLE = False
    ERROR = f"{type(exc).__name__}: {exc}"

HOW_TO_FIX = (
    "Rebuild it against the installed torch ("
    + torch.__version__
    + "): `pip install --no-build-isolation -e .` from the fastdistil checkout (needs a C++17 compiler). "
    "Set FASTDISTIL_REQUIRE_EXTENSION=1 to turn this warning into an error."
)

if not AVAILABLE:
    message = f"fastdistil: the C++ extension fastdistil._C failed to load ({ERROR}). {HOW_TO_FIX}"
    if os.environ.get("FASTDISTIL_REQUIRE_EXTENSION", "0") == "1":
        raise ImportError(message)
    warnings.warn(
        message + " Until then torch.ops.fastdistil.triple_loss is unavailable and fastdistil.triple_loss runs "
        "the unfused reference.",
        RuntimeWarning,
        stacklevel=2,
    )


def cpu_isa() -> str:
    """The instruction set the CPU kernels use ('avx512', 'avx2' or 'vec128'), or 'unavailable'."""
    return _C.cpu_isa() if AVAILABLE else "unavailable"


def release_gradient_cache() -> int:
    """Frees the idle [N, V] gradient buffer the CPU op keeps for the next step; returns the bytes freed."""
    return _C.release_gradient_cache() if AVAILABLE else 0
