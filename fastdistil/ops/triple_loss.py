"""The fused DistilBERT triple loss: torch.ops.fastdistil.triple_loss, its Python API and its autograd.

The schema lives in csrc/ops.cpp. The kernels (C++ on CPU, Triton on CUDA) implement
_triple_loss_forward, which returns the loss terms together with the gradient of the weighted loss with
respect to the student logits and hidden states, computed in the same pass. Backward only scales that
gradient by grad_output, in place, so training holds one [N, V] gradient and nothing else of vocabulary size.

For fp16 the forward's gradient is stored in a form that a loss scale cannot underflow (the logits gradient
times a power of two, the hidden-state gradient in fp32; kernels/gradient_scale.py explains why), and backward
applies grad_output and undoes the power of two in one fp32 multiplication: under a GradScaler the result is
the reference's gradient to fp16 rounding.
"""

import functools
import warnings
from typing import Literal

import torch
import torch.nn as nn

from fastdistil.ops import extension
from fastdistil.kernels.gradient_scale import hidden_grad_dtype
from fastdistil.ops.reference import triple_loss_reference
from fastdistil.ops.outputs import TripleLossOutput

Backend = Literal["auto", "cpp", "triton", "reference"]
BACKENDS = ("auto", "cpp", "triton", "reference")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    alpha_ce: float,
    alpha_mlm: float,
    alpha_cos: float,
    check_label_values: bool = True,
) -> None:
    """Raises ValueError/TypeError naming the offending argument; the C++ kernel repeats these checks."""
    tensors = {
        "student_logits": student_logits,
        "teacher_logits": teacher_logits,
        "labels": labels,
        "student_hidden": student_hidden,
        "teacher_hidden": teacher_hidden,
        "attention_mask": attention_mask,
    }
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"triple_loss: {name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in tensors.items():
        if value.device != student_logits.device:
            raise ValueError(
                f"triple_loss: {name} is on {value.device} but student_logits is on {student_logits.device}; "
                "expected all inputs on one device"
            )
    float64 = student_logits.dtype == torch.float64
    for name in ("student_logits", "teacher_logits", "student_hidden", "teacher_hidden"):
        dtype = tensors[name].dtype
        if float64 and dtype != torch.float64:
            raise TypeError(f"triple_loss: {name} must be float64 like student_logits (float64 is for "
                            f"gradient checks), got {dtype}")
        if not float64 and dtype not in LOGIT_DTYPES:
            raise TypeError(f"triple_loss: {name} must be float32, bfloat16 or float16, got {dtype}")
    if student_logits.dim() < 1 or student_logits.size(-1) == 0:
        raise ValueError(
            f"triple_loss: student_logits must be [..., V] with V > 0, got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "triple_loss: teacher_logits must have the shape of student_logits "
            f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    lead = tuple(student_logits.shape[:-1])
    if labels.dtype != torch.int64:
        raise TypeError(f"triple_loss: labels must be int64, got {labels.dtype}")
    if tuple(labels.shape) != lead:
        raise ValueError(
            f"triple_loss: labels must have shape {lead} (student_logits without V), got {tuple(labels.shape)}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"triple_loss: attention_mask must be bool or integer, got {attention_mask.dtype}")
    if tuple(attention_mask.shape) != lead:
        raise ValueError(f"triple_loss: attention_mask must have shape {lead}, got {tuple(attention_mask.shape)}")
    if student_hidden.dim() < 1 or student_hidden.size(-1) == 0 or tuple(student_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"triple_loss: student_hidden must have shape {lead + ('D',)} with D > 0, "
            f"got {tuple(student_hidden.shape)}"
        )
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            "triple_loss: teacher_hidden must have the shape of student_hidden "
            f"{tuple(student_hidden.shape)}, got {tuple(teacher_hidden.shape)}"
        )
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"triple_loss: temperature must be > 0, got {temperature}")
    for name, value in (("alpha_ce", alpha_ce), ("alpha_mlm", alpha_mlm), ("alpha_cos", alpha_cos)):
        if not (value >= 0 and value < float("inf")):
            raise ValueError(f"triple_loss: {name} must be >= 0, got {value}")
    # Reading label values synchronizes a GPU with the host, so it is done on CPU tensors only; the device
    # kernels treat the contract as given.
    # torch.compile cannot trace a branch on values either; the C++ kernel checks them again.
    if (check_label_values and labels.device.type == "cpu" and labels.numel() > 0
            and not torch.compiler.is_compiling()):
        vocab = student_logits.size(-1)
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            value = labels[bad][0].item()
            raise ValueError(f"triple_loss: labels must be in [0, {vocab}) or -100 (not a target), got {value}")


_OP_TENSOR_ARGS = ("student_logits", "teacher_logits", "labels", "student_hidden", "teacher_hidden",
                   "attention_mask", "grad_student_logits", "grad_student_hidden")


def _check_devices(*tensors: torch.Tensor) -> None:
    """A meta tensor among real ones sends a call to the fake kernel, which must then fail as the real kernel
    does rather than invent a result."""
    devices = [t.device for t in tensors]
    common = max(set(devices), key=devices.count)
    for name, device in zip(_OP_TENSOR_ARGS, devices):
        if device != common:
            raise RuntimeError(f"triple_loss: {name} is on {device} but the other inputs are on {common}; "
                               "expected all inputs on one device")


def _loss_dtype(student_logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


if extension.AVAILABLE:

    @torch.library.register_fake("fastdistil::_triple_loss_forward")
    def _(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask, temperature,
          alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask):
        _check_devices(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask)
        torch._check(teacher_logits.shape == student_logits.shape)
        torch._check(labels.shape == student_logits.shape[:-1])
        torch._check(teacher_hidden.shape == student_hidden.shape)
        scalar = student_logits.new_empty((), dtype=_loss_dtype(student_logits))
        return (
            scalar,
            scalar.clone(),
            scalar.clone(),
            scalar.clone(),
            torch.empty_like(student_logits, memory_format=torch.contiguous_format),
            torch.empty_like(student_hidden, dtype=hidden_grad_dtype(student_hidden.dtype),
                             memory_format=torch.contiguous_format),
            scalar.clone(),
        )

    @torch.library.register_fake("fastdistil::triple_loss_out")
    def _(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask, temperature,
          alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, *, grad_student_logits, grad_student_hidden,
          logits_grad_scale=1.0):
        _check_devices(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                       grad_student_logits, grad_student_hidden)
        scalar = student_logits.new_empty((), dtype=_loss_dtype(student_logits))
        return scalar, scalar.clone(), scalar.clone(), scalar.clone()


def _setup_context(ctx, inputs, output):
    loss, loss_ce, loss_mlm, loss_cos, grad_logits, grad_hidden, logits_grad_scale = output
    ctx.mark_non_differentiable(loss_ce, loss_mlm, loss_cos, grad_logits, grad_hidden, logits_grad_scale)
    # Otherwise autograd hands backward a zero [N, V] "gradient" for the grad_logits output.
    ctx.set_materialize_grads(False)
    ctx.hidden_dtype = inputs[3].dtype
    ctx.save_for_backward(grad_logits, grad_hidden, logits_grad_scale)


def scale_gradient_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place, in fp32 with one rounding (torch.ops.fastdistil._scale_gradient_)."""
    if extension.AVAILABLE:
        torch.ops.fastdistil._scale_gradient_(grad, scale)
    else:  # the Triton path without the C++ extension
        grad.mul_(scale)


def _backward(ctx, grad_loss, *_grads_of_outputs_without_gradient):
    if grad_loss is None:
        return (None,) * 11
    grad_logits, grad_hidden, logits_grad_scale = ctx.saved_tensors
    # In place: a second [N, V] buffer would double the op's memory. The bumped version counter turns a second
    # backward through the same graph into autograd's usual error instead of a doubly scaled gradient.
    scale_gradient_(grad_logits, grad_loss / logits_grad_scale)
    scale_gradient_(grad_hidden, grad_loss)
    return grad_logits, None, None, grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None, None, None


if extension.AVAILABLE:
    torch.library.register_autograd(
        "fastdistil::_triple_loss_forward", _backward, setup_context=_setup_context
    )

    @torch.library.register_fake("fastdistil::_scale_gradient_")
    def _(grad, scale):
        return None


@functools.cache
def triton_kernels_error() -> str | None:
    """Why the Triton kernels cannot serve CUDA tensors, or None once they are the CUDA implementations of the
    ops. Registering them compiles nothing yet, but importing them fixes Triton's interpreter/compiler mode, so
    this runs on the first CUDA use (or at import on a machine with CUDA), never before a CPU test can ask for
    the interpreter."""
    if not extension.AVAILABLE:
        return f"fastdistil._C, which defines the op, is not loaded ({extension.ERROR})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    try:
        from fastdistil.kernels.triple_loss import register_cuda_kernel
    except Exception as exc:  # no Triton, one too old for the kernels, a broken install: the kernels cannot run
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    register_cuda_kernel()
    return None


if torch.cuda.is_available() and triton_kernels_error():
    warnings.warn(f"fastdistil: {triton_kernels_error()}. CUDA tensors will use the unfused reference triple "
                  "loss.", RuntimeWarning, stacklevel=2)


class _TritonTripleLoss(torch.autograd.Function):
    """Autograd around the Triton launcher called directly (backend="triton"), which also runs on CPU tensors
    under TRITON_INTERPRET=1; on CUDA the dispatcher reaches the same launcher through the op."""

    @staticmethod
    def forward(ctx, *args):
        from fastdistil.kernels.triple_loss import triple_loss_forward

        output = triple_loss_forward(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def triple_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 2.0,
    alpha_ce: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
    restrict_ce_to_mask: bool = False,
    backend: Backend = "auto",
) -> TripleLossOutput:
    """The DistilBERT triple loss, fused.

    Args:
        student_logits: [..., V] fp32/bf16/fp16, differentiable. (float64, with every floating input float64,
            runs the same formulas in double precision for torch.autograd.gradcheck.)
        teacher_logits: [..., V], any of those dtypes; gets no gradient.
        labels: [...] int64 MLM targets, -100 where a position is not a target.
        student_hidden, teacher_hidden: [..., D] last hidden states; student_hidden is differentiable.
        attention_mask: [...] bool or integer, 0 = padding.
        temperature, alpha_ce, alpha_mlm, alpha_cos: the recipe's T and weights.
        restrict_ce_to_mask: the KL term covers only MLM targets instead of every non-padding token.
        backend: "auto" (the compiled kernel for the tensors' device), "cpp", "triton" or "reference".

    Returns:
        TripleLossOutput(loss, loss_ce, loss_mlm, loss_cos): fp32 scalars; loss = alpha_ce * loss_ce +
        alpha_mlm * loss_mlm + alpha_cos * loss_cos, and only loss carries a gradient.
    """
    if backend not in BACKENDS:
        raise ValueError(f"triple_loss: backend must be one of {BACKENDS}, got {backend!r}")
    args = (student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
            float(temperature), float(alpha_ce), float(alpha_mlm), float(alpha_cos))
    check_inputs(*args)
    args = args + (bool(restrict_ce_to_mask),)
    if backend == "auto":
        backend, why = auto_backend(student_logits.device, student_logits.dtype)
        if backend == "unsupported":
            raise ValueError(f"triple_loss: no implementation for {student_logits.dtype} logits on "
                             f"{student_logits.device}: {why}")
        if backend != "reference":  # the op: its dispatcher reaches the C++ or the Triton kernel
            return TripleLossOutput(*torch.ops.fastdistil.triple_loss(*args))
    if backend == "reference":
        return triple_loss_reference(*args)
    if backend == "triton":
        return TripleLossOutput(*_TritonTripleLoss.apply(*args)[:4])
    if not extension.AVAILABLE:
        raise RuntimeError(f"triple_loss: backend={backend!r} needs fastdistil._C ({extension.ERROR}). "
                           f"{extension.HOW_TO_FIX}")
    if backend == "cpp" and student_logits.device.type != "cpu":
        raise ValueError(f"triple_loss: backend='cpp' runs on CPU tensors, got {student_logits.device}")
    return TripleLossOutput(*torch.ops.fastdistil.triple_loss(*args))


@torch.compiler.assume_constant_result  # a property of the machine: torch.compile calls it once, at trace time
def auto_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, why) of backend="auto" for logits of this device and dtype, by DESIGN.md's support matrix:
    "cpp" or "triton" (both reached through torch.ops.fastdistil.triple_loss), "reference" when no compiled
    kernel exists for the device, "unsupported" when the GPU cannot run the dtype at all."""
    if not extension.AVAILABLE:
        return "reference", "fastdistil._C, which defines the op, is not loaded"
    if device.type == "cpu":
        return "cpp", f"fastdistil._C, {extension.cpu_isa()} code path"
    if device.type != "cuda":
        return "reference", f"no fused kernel for {device.type} tensors"
    kernels_error = triton_kernels_error()
    if kernels_error:
        return "reference", kernels_error
    unsupported = triton_unsupported(device, dtype)
    if unsupported:
        return "unsupported", unsupported
    major, minor = torch.cuda.get_device_capability(device)
    return "triton", f"sm{major}{minor}"


def triton_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton loss kernel cannot run logits of this dtype on this CUDA device, or None if it can."""
    if device.type != "cuda":
        return None  # CPU tensors reach the kernel only under Triton's interpreter, which takes any dtype
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"sm{major}{minor}: Triton runs on sm70 and newer"
    if major < 8 and dtype == torch.bfloat16:
        return f"sm{major}{minor} has no bf16; use fp16 or fp32"
    return None


class TripleLoss(nn.Module):
    """nn.Module form of :func:`triple_loss`, holding the temperature, the weights and the KL row choice."""

    def __init__(
        self,
        temperature: float = 2.0,
        alpha_ce: float = 5.0,
        alpha_mlm: float = 2.0,
        alpha_cos: float = 1.0,
        restrict_ce_to_mask: bool = False,
        backend: Backend = "auto",
    ):
        super().__init__()
        self.temperature = temperature
        self.alpha_ce = alpha_ce
        self.alpha_mlm = alpha_mlm
        self.alpha_cos = alpha_cos
        self.restrict_ce_to_mask = restrict_ce_to_mask
        self.backend = backend

    def forward(self, student_logits, teacher_logits, labels, student_hidden, teacher_hidden,
                attention_mask) -> TripleLossOutput:
        return triple_loss(
            student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
            self.temperature, self.alpha_ce, self.alpha_mlm, self.alpha_cos, self.restrict_ce_to_mask,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha_ce={self.alpha_ce}, alpha_mlm={self.alpha_mlm}, "
                f"alpha_cos={self.alpha_cos}, restrict_ce_to_mask={self.restrict_ce_to_mask}, "
                f"backend={self.backend!r}")
