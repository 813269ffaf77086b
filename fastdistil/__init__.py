"""fastdistil: fused kernels for DistilBERT-style knowledge distillation."""

from fastdistil import extension
from fastdistil.extension import release_gradient_cache
from fastdistil.reference import triple_loss_reference
from fastdistil.triple_loss import TripleLoss, triple_loss
from fastdistil.triple_loss_output import TripleLossOutput

__version__ = "0.1.0"

__all__ = ["TripleLoss", "TripleLossOutput", "extension", "release_gradient_cache", "triple_loss",
           "triple_loss_reference"]
