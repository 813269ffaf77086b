"""The fused DistilBERT triple loss on logits: torch.ops.fastdistil.triple_loss and its Python API.

The op in the order every op module follows: its schema (csrc/ops.cpp), fake kernels, autograd, then one
implementation per device, and the Python API last.
- fastdistil::triple_loss, the public op, is CompositeImplicitAutograd: the private _triple_loss_forward on
  devices with a kernel, the unfused reference elsewhere. It returns four terms (loss, loss_ce, loss_mlm,
  loss_cos; loss includes alpha_mse * loss_mse), the private forward and the Python API five (loss_mse too).
- _triple_loss_forward computes the loss terms and their gradient with respect to the student logits and hidden
  states in the same pass: the C++ kernel on CPU (csrc/triple_loss_cpu.cpp), the Triton kernel on CUDA
  (fastdistil.kernels.triple_loss). Its backward only scales that gradient (fastdistil/ops/precomputed.py), so
  training holds one [N, V] gradient and nothing else of vocabulary size.
- triple_loss_out writes the same gradient into buffers the caller owns (CPU); _scale_gradient_ is the
  backward's in-place scaling (CPU, CUDA).
Without fastdistil._C none of the ops exist and the Python API runs the reference.
"""

import functools
import warnings
from typing import Literal

import torch

from fastdistil.kernels.gradient_scale import hidden_grad_dtype
from fastdistil.ops import checks, extension, precomputed
from fastdistil.ops.reference import triple_loss_reference
from fastdistil.ops.values import TripleLossArgs, TripleLossOutput

Backend = Literal["auto", "cpp", "triton", "reference"]
BACKENDS = ("auto", "cpp", "triton", "reference")
GRADIENTS = precomputed.Gradients(n_inputs=len(TripleLossArgs._fields), inputs=(0, 3), prescaled=(True, False))


def _loss_dtype(student_logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


def check_devices(op: str, **named) -> None:
    """A meta tensor among real ones sends a call to the fake kernel, which must then fail as the real kernel
    does rather than invent a result."""
    devices = [t.device for t in named.values()]
    common = max(set(devices), key=devices.count)
    for name, device in zip(named, devices):
        if device != common:
            raise RuntimeError(f"{op}: {name} is on {device} but the other inputs are on {common}; "
                               "expected all inputs on one device")


# --- fake kernels --------------------------------------------------------------------------------------------

def forward_outputs_fake(student_logits: torch.Tensor, student_hidden: torch.Tensor) -> tuple:
    """What a private loss forward on logits returns: the terms, the logits and hidden-state gradients and
    logits_grad_scale."""
    scalar = student_logits.new_empty((), dtype=_loss_dtype(student_logits))
    return (*(scalar.clone() for _ in range(precomputed.N_TERMS)),
            torch.empty_like(student_logits, memory_format=torch.contiguous_format),
            torch.empty_like(student_hidden, dtype=hidden_grad_dtype(student_hidden.dtype),
                             memory_format=torch.contiguous_format),
            scalar.clone())


def _forward_fake(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                  temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, alpha_mse=0.0):
    check_devices("triple_loss", student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
                  student_hidden=student_hidden, teacher_hidden=teacher_hidden, attention_mask=attention_mask)
    torch._check(teacher_logits.shape == student_logits.shape)
    torch._check(labels.shape == student_logits.shape[:-1])
    torch._check(teacher_hidden.shape == student_hidden.shape)
    return forward_outputs_fake(student_logits, student_hidden)


def _out_fake(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask, temperature,
              alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, alpha_mse=0.0, *, grad_student_logits,
              grad_student_hidden, logits_grad_scale=1.0):
    check_devices("triple_loss", student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
                  student_hidden=student_hidden, teacher_hidden=teacher_hidden, attention_mask=attention_mask,
                  grad_student_logits=grad_student_logits, grad_student_hidden=grad_student_hidden)
    scalar = student_logits.new_empty((), dtype=_loss_dtype(student_logits))
    return scalar, scalar.clone(), scalar.clone(), scalar.clone()


if extension.AVAILABLE:
    torch.library.register_fake("fastdistil::_triple_loss_forward", _forward_fake)
    torch.library.register_fake("fastdistil::triple_loss_out", _out_fake)
    torch.library.register_fake("fastdistil::_scale_gradient_", lambda grad, scale: None)

# --- autograd ------------------------------------------------------------------------------------------------

if extension.AVAILABLE:
    precomputed.register("_triple_loss_forward", GRADIENTS)

# --- implementations ----------------------------------------------------------------------------------------
# CPU: the C++ kernels register themselves when fastdistil._C loads (csrc/triple_loss_cpu.cpp).
# CUDA: the Triton launchers, registered on first use (triton_kernels_error) or at import on a machine with
# CUDA; importing them any earlier would fix Triton's interpreter/compiler mode before a CPU test asks for it.


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


def triton_forward(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                   temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, alpha_mse=0.0,
                   traceable: bool = False):
    """_triple_loss_forward by the Triton kernel: the CUDA implementation, and backend="triton"'s."""
    from fastdistil.kernels.triple_loss import triple_loss_forward

    checks.triple_loss(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                       temperature, alpha_ce, alpha_mlm, alpha_cos, alpha_mse)
    unsupported = triton_unsupported(student_logits.device, student_logits.dtype)
    if unsupported:
        raise ValueError(f"triple_loss: the Triton kernel cannot run {student_logits.dtype} student_logits on "
                         f"{student_logits.device}: {unsupported}")
    return triple_loss_forward(student_logits, teacher_logits, labels, student_hidden, teacher_hidden,
                               attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask,
                               alpha_mse, traceable=traceable)


def _triton_scale_gradient_(grad, scale, traceable: bool = False):
    from fastdistil.kernels.triple_loss import scale_gradient_

    scale_gradient_(grad, scale, traceable=traceable)


def traced_on_cuda(implementation, compile_unsupported=None):
    """The FunctionalTensorMode rule (what triton_op registers for the ops it defines): AOTAutograd traces the
    Triton launcher on CUDA tensors, so the graph Inductor compiles holds the kernels themselves instead of an
    opaque call. CPU tensors, torch.export (which should keep the op whole rather than Triton source) and a torch
    whose analysis of the kernels cannot be trusted (compile_unsupported, by default the online kernels'
    traced_compile_unsupported) get the mode's usual handling: the fake kernel, and the op stays opaque in the
    graph."""

    def rule(mode, op, types, args, kwargs):
        from fastdistil.kernels.triple_loss import traced_compile_unsupported

        unsupported = compile_unsupported or traced_compile_unsupported
        if args[0].device.type != "cuda" or torch.compiler.is_exporting() or unsupported():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return implementation(*args, **kwargs, traceable=True)

    return rule


@functools.cache
def triton_kernels_error() -> str | None:
    """Why the Triton kernels cannot serve CUDA tensors, or None once they are the CUDA implementations of the
    ops."""
    if not extension.AVAILABLE:
        return f"fastdistil._C, which defines the op, is not loaded ({extension.ERROR})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    try:
        _register_triton_kernels()
    except Exception as exc:  # no Triton, one too old for the kernels, a broken install: the kernels cannot run
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    return None


@functools.cache  # the dispatcher takes one Python kernel (and one rule) per key
def _register_triton_kernels() -> None:
    import fastdistil.kernels.triple_loss  # noqa: F401  (what fails here is what triton_kernels_error reports)
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for op, implementation in (("fastdistil::_triple_loss_forward", triton_forward),
                               ("fastdistil::_scale_gradient_", _triton_scale_gradient_)):
        torch.library.register_kernel(op, "cuda", implementation)
        torch.library.register_torch_dispatch(op, FunctionalTensorMode, traced_on_cuda(implementation))


if torch.cuda.is_available() and triton_kernels_error():
    warnings.warn(f"fastdistil: {triton_kernels_error()}. CUDA tensors will use the unfused reference triple "
                  "loss.", RuntimeWarning, stacklevel=2)


@torch.compiler.assume_constant_result  # a property of the machine: torch.compile calls it once, at trace time
def auto_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, why) of backend="auto" for logits of this device and dtype, by the support matrix (README,
    "The student's attention, and GPUs"): "cpp" or "triton" (reached through torch.ops.fastdistil.triple_loss),
    "reference" when no compiled kernel exists for the device, "unsupported" when the GPU cannot run the dtype at
    all."""
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


def dispatch_terms(op: str, args: tuple, backend: tuple[str, str], forward, reference) -> tuple:
    """All five loss terms (TripleLossOutput's), loss differentiable, of a loss op on logits: its private
    `forward` where `backend` (auto_backend's (backend, why) for the logits) has a kernel, its `reference`
    where none exists."""
    name, why = backend
    if name == "unsupported":
        raise ValueError(f"{op}: no implementation for {args[0].dtype} logits on {args[0].device}: {why}")
    if name == "reference":
        return tuple(reference(*args))
    return forward(*args)[:precomputed.N_TERMS]


def _terms(args: TripleLossArgs) -> tuple:
    """All five loss terms, from the kernel of the logits' device, or the reference where there is none:
    fastdistil::triple_loss's body, and backend="auto"'s."""
    # Label values are not read here: that would be a data-dependent branch wherever the op is traced, and the
    # C++ kernel checks them (the Python API checked them before the call).
    checks.triple_loss(*args[:10], args.alpha_mse, check_label_values=False)
    return dispatch_terms("triple_loss", args, auto_backend(args.student_logits.device, args.student_logits.dtype),
                          torch.ops.fastdistil._triple_loss_forward, triple_loss_reference)


def _composite(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
               temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=False,
               alpha_mse=0.0):
    """fastdistil::triple_loss: the four terms of its schema, loss_mse left out (it is inside loss). (The
    dispatcher leaves out trailing arguments equal to the schema's defaults: hence the defaults here.)"""
    return _terms(TripleLossArgs(student_logits, teacher_logits, labels, student_hidden, teacher_hidden,
                                 attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask,
                                 alpha_mse))[:4]


if extension.AVAILABLE:
    torch.library.impl("fastdistil::triple_loss", "CompositeImplicitAutograd", _composite)

_triton_with_autograd = precomputed.function(GRADIENTS, triton_forward)

# --- the Python API -----------------------------------------------------------------------------------------


def triple_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
                temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0,
                restrict_ce_to_mask: bool = False, alpha_mse: float = 0.0,
                backend: Backend = "auto") -> TripleLossOutput:
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
        alpha_mse: weight of the original distiller's --alpha_mse term, the summed squared difference of the
            raw student and teacher logits over the KL term's rows, divided by their number (0 in the recipe).
        backend: "auto" (torch.ops.fastdistil.triple_loss's implementation: the compiled kernel for the tensors'
            device), "cpp", "triton" (the Triton launcher on any tensors it accepts, CPU ones under
            TRITON_INTERPRET=1) or "reference".

    Returns:
        TripleLossOutput(loss, loss_ce, loss_mlm, loss_cos, loss_mse): fp32 scalars; loss = alpha_ce * loss_ce +
        alpha_mlm * loss_mlm + alpha_cos * loss_cos + alpha_mse * loss_mse, and only loss carries a gradient.
    """
    if backend not in BACKENDS:
        raise ValueError(f"triple_loss: backend must be one of {BACKENDS}, got {backend!r}")
    args = TripleLossArgs(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                          float(temperature), float(alpha_ce), float(alpha_mlm), float(alpha_cos),
                          bool(restrict_ce_to_mask), float(alpha_mse))
    checks.triple_loss(*args[:10], args.alpha_mse)
    if backend == "reference" or (backend == "auto" and not extension.AVAILABLE):
        return triple_loss_reference(*args)
    if backend == "triton":
        return TripleLossOutput(*_triton_with_autograd(*args)[:precomputed.N_TERMS])
    if not extension.AVAILABLE:
        raise RuntimeError(f"triple_loss: backend={backend!r} needs fastdistil._C ({extension.ERROR}). "
                           f"{extension.HOW_TO_FIX}")
    if backend == "cpp" and student_logits.device.type != "cpu":
        raise ValueError(f"triple_loss: backend='cpp' runs on CPU tensors, got {student_logits.device}")
    return TripleLossOutput(*_terms(args))
