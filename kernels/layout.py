"""Memory layouts shared by the attention launchers and the fake kernels that stand in for them. Imports only
torch, so that fastdistil.attention can use it without importing Triton (which would fix Triton's
interpreter/compiler mode before a CPU test sets it)."""

import torch


def empty_bhld(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [B, H, L, D] tensor laid out as [B, L, H, D] in memory, for the kernels' outputs and
    gradients (and their fake versions, which must match stride for stride): merging the heads back into
    [B, L, H * D] is then free."""
    batch, heads, length, dim = like.shape
    return like.new_empty((batch, length, heads, dim)).transpose(1, 2)
