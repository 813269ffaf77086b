"""The value every triple-loss implementation returns."""

from typing import NamedTuple

import torch


class TripleLossOutput(NamedTuple):
    """The weighted loss to backpropagate and its three unweighted terms, each a 0-dim fp32 tensor.

    Only `loss` carries a gradient in the fused implementations; the terms are for logging.
    """

    loss: torch.Tensor
    loss_ce: torch.Tensor
    loss_mlm: torch.Tensor
    loss_cos: torch.Tensor
