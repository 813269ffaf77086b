"""fastdistil: fused kernels for DistilBERT-style knowledge distillation."""

from fastdistil import extension
from fastdistil.attention import attention, register_with_transformers
from fastdistil.extension import release_gradient_cache
from fastdistil.fused_linear_triple_loss import fused_linear_triple_loss
from fastdistil.reference import triple_loss_reference
from fastdistil.triple_loss import TripleLoss, triple_loss
from fastdistil.triple_loss_output import TripleLossOutput

__version__ = "0.1.0"

__all__ = ["TripleLoss", "TripleLossOutput", "attention", "extension", "fused_linear_triple_loss",
           "register_with_transformers", "release_gradient_cache", "triple_loss", "triple_loss_reference"]
