"""fastdistil: fused kernels for DistilBERT-style knowledge distillation."""

from fastdistil import extension
from fastdistil.reference import triple_loss_reference
from fastdistil.triple_loss import TripleLoss, triple_loss
from fastdistil.triple_loss_output import TripleLossOutput

__version__ = "0.1.0"

__all__ = ["TripleLoss", "TripleLossOutput", "extension", "triple_loss", "triple_loss_reference"]
