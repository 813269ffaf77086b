"""What the triple-loss implementations take and return, by name."""

from typing import NamedTuple

import torch


class TripleLossArgs(NamedTuple):
    """The arguments of torch.ops.fastdistil.triple_loss (and of its private forward), in schema order."""

    student_logits: torch.Tensor  # [..., V]
    teacher_logits: torch.Tensor  # [..., V]
    labels: torch.Tensor  # [...] int64, -100 where a row is not an MLM target
    student_hidden: torch.Tensor  # [..., D]
    teacher_hidden: torch.Tensor  # [..., D]
    attention_mask: torch.Tensor  # [...] bool or integer, 0 = padding
    temperature: float = 2.0
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    restrict_ce_to_mask: bool = False
    alpha_mse: float = 0.0


class TripleLossOutput(NamedTuple):
    """The weighted loss to backpropagate and its four unweighted terms, each a 0-dim fp32 tensor.

    Only `loss` carries a gradient in the fused implementations; the terms are for logging. loss_mse, the
    original distiller's --alpha_mse term, is computed whatever its weight (0 by default, as in the recipe).
    """

    loss: torch.Tensor
    loss_ce: torch.Tensor
    loss_mlm: torch.Tensor
    loss_cos: torch.Tensor
    loss_mse: torch.Tensor


class SparseTripleLossArgs(NamedTuple):
    """The arguments of torch.ops.fastdistil.sparse_triple_loss (and of its private forward), in schema order:
    the triple loss against a cached top-k teacher."""

    student_logits: torch.Tensor  # [..., V]
    teacher_topk_logits: torch.Tensor  # [..., k] the teacher's raw logits at its top-k entries
    teacher_topk_indices: torch.Tensor  # [..., k] int16 / int32 / int64, their indices in [0, V)
    teacher_logsumexp: torch.Tensor  # [..., 2] fp32: logsumexp of all V teacher logits at T = 1 and at T
    labels: torch.Tensor  # [...] int64, -100 where a row is not an MLM target
    student_hidden: torch.Tensor  # [..., D]
    teacher_hidden: torch.Tensor  # [..., D]
    attention_mask: torch.Tensor  # [...] bool or integer, 0 = padding
    temperature: float = 2.0
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    restrict_ce_to_mask: bool = False
    tail: str = "bucket"  # or "renormalize": what becomes of the teacher's mass outside its top-k
