"""fastdistil: fused kernels for DistilBERT-style knowledge distillation."""

import importlib.util
import sys
from pathlib import Path

# The Triton kernels live in the checkout's top-level kernels/ and only an install (pyproject's package-dir
# mapping) makes them fastdistil.kernels. Importing a bare checkout (PYTHONPATH pointing at it) would fail below,
# so there the checkout's kernels/ is registered under that name; installs, regular or editable, find it already.
if importlib.util.find_spec(f"{__name__}.kernels") is None:
    _kernels = Path(__file__).resolve().parent.parent / "kernels"
    _spec = importlib.util.spec_from_file_location(f"{__name__}.kernels", _kernels / "__init__.py",
                                                   submodule_search_locations=[str(_kernels)])
    kernels = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(kernels)

from fastdistil.ops import extension
from fastdistil.ops.attention import attention, register_with_transformers
from fastdistil.ops.extension import release_gradient_cache
from fastdistil.ops.fused_linear_sparse_triple_loss import fused_linear_sparse_triple_loss
from fastdistil.ops.fused_linear_triple_loss import fused_linear_triple_loss
from fastdistil.ops.modules import FusedLinearTripleLoss, TripleLoss
from fastdistil.ops.reference import sparse_triple_loss_reference, triple_loss_reference
from fastdistil.ops.sparse_triple_loss import sparse_triple_loss
from fastdistil.ops.triple_loss import triple_loss
from fastdistil.ops.values import SparseTripleLossArgs, TripleLossArgs, TripleLossOutput

__version__ = "0.1.0"

__all__ = ["FusedLinearTripleLoss", "ProjectionInputs", "SparseTripleLossArgs", "TripleLoss", "TripleLossArgs",
           "TripleLossOutput", "attention", "extension", "fused_linear_sparse_triple_loss",
           "fused_linear_triple_loss", "register_with_transformers", "release_gradient_cache",
           "sparse_triple_loss", "sparse_triple_loss_reference", "triple_loss", "triple_loss_reference"]


def __getattr__(name: str):
    # ProjectionInputs wraps transformers' models: importing it on first use keeps `import fastdistil` (and the
    # ops alone) free of transformers.
    if name == "ProjectionInputs":
        from fastdistil.train.heads import ProjectionInputs

        return ProjectionInputs
    raise AttributeError(f"module 'fastdistil' has no attribute {name!r}")
