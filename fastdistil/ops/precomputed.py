"""The autograd of the two losses, whose forward computes the gradient in the same pass as the loss.

Their private forwards (_triple_loss_forward, _fused_linear_triple_loss_forward) return the N_TERMS loss terms
(TripleLossOutput's: loss, loss_ce, loss_mlm, loss_cos, loss_mse), then the gradient of `loss` with respect to
each differentiable input, then logits_grad_scale: the power of two the logits-derived gradients are stored with
(kernels/gradient_scale.py: 1 except in fp16). Backward scales the saved gradients in place by grad_output (and
by 1 / logits_grad_scale where they carry it), in fp32 with one rounding, and hands them over in the inputs'
dtypes. In place, because a second gradient of vocabulary size would double the op's memory; the bumped version
counter turns a second backward through the same graph into autograd's usual error instead of a doubly scaled
gradient.
"""

import functools
from typing import NamedTuple

import torch

from fastdistil.ops import extension
from fastdistil.ops.values import TripleLossOutput

N_TERMS = len(TripleLossOutput._fields)


class Gradients(NamedTuple):
    """Which inputs of an op the gradients in its outputs belong to."""

    n_inputs: int
    inputs: tuple[int, ...]  # input index of each gradient output, in output order (after the N_TERMS terms)
    prescaled: tuple[bool, ...]  # whether that gradient carries logits_grad_scale


def scale_gradient_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place (torch.ops.fastdistil._scale_gradient_: fp32, one rounding, nothing when scale is
    1); plain torch where the extension is missing (the Triton path under the interpreter)."""
    if extension.AVAILABLE:
        torch.ops.fastdistil._scale_gradient_(grad, scale)
    else:
        grad.mul_(scale)


def setup_context(gradients: Gradients, ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])
    # Otherwise autograd hands backward zero "gradients" of vocabulary size for the gradient outputs.
    ctx.set_materialize_grads(False)
    ctx.dtypes = [None if inputs[i] is None else inputs[i].dtype for i in gradients.inputs]
    ctx.save_for_backward(*output[N_TERMS:])


def backward(gradients: Gradients, ctx, grad_loss, *_grads_of_outputs_without_gradient):
    result = [None] * gradients.n_inputs
    if grad_loss is None:
        return tuple(result)
    *saved, logits_grad_scale = ctx.saved_tensors
    unscaled = grad_loss / logits_grad_scale
    for grad, index, prescaled, dtype in zip(saved, gradients.inputs, gradients.prescaled, ctx.dtypes):
        if dtype is None:  # an optional input that was not given (a missing bias)
            continue
        scale_gradient_(grad, unscaled if prescaled else grad_loss)
        result[index] = grad.to(dtype)
    return tuple(result)


def register(op: str, gradients: Gradients) -> None:
    """The autograd of torch.ops.fastdistil.<op>."""
    torch.library.register_autograd(f"fastdistil::{op}", functools.partial(backward, gradients),
                                    setup_context=functools.partial(setup_context, gradients))


def function(gradients: Gradients, forward):
    """The same rule around a forward called directly rather than through an op (the Triton launchers with
    backend="triton", which also run on CPU tensors under TRITON_INTERPRET=1)."""

    class Precomputed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = forward(*args)
            setup_context(gradients, ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(gradients, ctx, *grads)

    return Precomputed.apply
