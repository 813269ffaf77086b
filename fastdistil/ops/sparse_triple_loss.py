"""The triple loss against a cached top-k teacher: torch.ops.fastdistil.sparse_triple_loss and its Python API.

The op in the order every op module follows: its schema (csrc/ops.cpp), fake kernel, autograd, then one
implementation per device, and the Python API last.
- fastdistil::sparse_triple_loss, the public op, is CompositeImplicitAutograd: the private
  _sparse_triple_loss_forward on devices with a kernel, the unfused reference elsewhere.
- _sparse_triple_loss_forward reads each student row once per sweep, as the online kernel does, but the teacher
  is k logits, k indices and two log-sum-exps per row instead of a second [V] row: the C++ kernel on CPU
  (csrc/sparse_triple_loss_cpu.cpp), the Triton kernel on CUDA (fastdistil.kernels.sparse_triple_loss). It
  returns the loss terms and their gradient, and its backward only scales that gradient
  (fastdistil/ops/precomputed.py), as the online op's does.

The teacher's top-k probabilities at T are exact (the cache keeps the log-sum-exp of all V logits), so the only
approximation is what `tail` does with the teacher's remaining mass r = 1 - sum_k q_k: "bucket" matches it, as
one more class, against the student's own mass outside the top-k; "renormalize" drops it and rescales the top-k
to sum to 1. With k = V both are the online loss. fastdistil/ops/reference.py's sparse_triple_loss_reference
writes the formulas out.
"""

import functools
import warnings

import torch

from fastdistil.ops import checks, extension, precomputed
from fastdistil.ops.reference import sparse_triple_loss_reference
from fastdistil.ops.triple_loss import (BACKENDS, Backend, auto_backend, check_devices, dispatch_terms,
                                        forward_outputs_fake, triton_unsupported)
from fastdistil.ops import triple_loss as online
from fastdistil.ops.values import SparseTripleLossArgs, TripleLossOutput

GRADIENTS = precomputed.Gradients(n_inputs=len(SparseTripleLossArgs._fields), inputs=(0, 5),
                                  prescaled=(True, False))

# --- fake kernel ---------------------------------------------------------------------------------------------


def _forward_fake(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels,
                  student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos,
                  restrict_ce_to_mask, tail):
    check_devices("sparse_triple_loss", student_logits=student_logits, teacher_topk_logits=teacher_topk_logits,
                  teacher_topk_indices=teacher_topk_indices, teacher_logsumexp=teacher_logsumexp, labels=labels,
                  student_hidden=student_hidden, teacher_hidden=teacher_hidden, attention_mask=attention_mask)
    torch._check(teacher_topk_indices.shape == teacher_topk_logits.shape)
    torch._check(teacher_topk_logits.shape[:-1] == student_logits.shape[:-1])
    torch._check(labels.shape == student_logits.shape[:-1])
    torch._check(teacher_hidden.shape == student_hidden.shape)
    return forward_outputs_fake(student_logits, student_hidden)


if extension.AVAILABLE:
    torch.library.register_fake("fastdistil::_sparse_triple_loss_forward", _forward_fake)

# --- autograd ------------------------------------------------------------------------------------------------

if extension.AVAILABLE:
    precomputed.register("_sparse_triple_loss_forward", GRADIENTS)

# --- implementations ----------------------------------------------------------------------------------------
# CPU: the C++ kernel registers itself when fastdistil._C loads (csrc/sparse_triple_loss_cpu.cpp).
# CUDA: the Triton launcher, registered on first use (triton_kernels_error), as the online op's is.


def triton_forward(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels,
                   student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos,
                   restrict_ce_to_mask, tail, traceable: bool = False):
    """_sparse_triple_loss_forward by the Triton kernel: the CUDA implementation, and backend="triton"'s."""
    from fastdistil.kernels.sparse_triple_loss import sparse_triple_loss_forward

    checks.sparse_triple_loss(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels,
                              student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm,
                              alpha_cos, tail)
    unsupported = triton_unsupported(student_logits.device, student_logits.dtype)
    if unsupported:
        raise ValueError(f"sparse_triple_loss: the Triton kernel cannot run {student_logits.dtype} student_logits "
                         f"on {student_logits.device}: {unsupported}")
    return sparse_triple_loss_forward(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp,
                                      labels, student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce,
                                      alpha_mlm, alpha_cos, restrict_ce_to_mask, tail, traceable=traceable)


@functools.cache
def triton_kernels_error() -> str | None:
    """Why the Triton kernel cannot serve CUDA tensors, or None once it is the op's CUDA implementation."""
    error = online.triton_kernels_error()  # Triton itself, and the kernels this one shares
    if error:
        return error
    try:
        from fastdistil.kernels.sparse_triple_loss import traced_compile_unsupported
        from torch._subclasses.functional_tensor import FunctionalTensorMode
    except Exception as exc:  # a Triton too old for the kernel, a broken install: the kernel cannot run
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    op = "fastdistil::_sparse_triple_loss_forward"
    torch.library.register_kernel(op, "cuda", triton_forward)
    torch.library.register_torch_dispatch(op, FunctionalTensorMode,
                                          online.traced_on_cuda(triton_forward, traced_compile_unsupported))
    return None


if torch.cuda.is_available() and extension.AVAILABLE and triton_kernels_error():
    warnings.warn(f"fastdistil: {triton_kernels_error()}. CUDA tensors will use the unfused reference sparse "
                  "triple loss.", RuntimeWarning, stacklevel=2)


def backend_for(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """backend="auto"'s choice: the online op's support matrix, and this op's own Triton kernel on CUDA."""
    backend, why = auto_backend(device, dtype)
    if backend == "triton" and triton_kernels_error():
        return "reference", triton_kernels_error()
    return backend, why


def _terms(args: SparseTripleLossArgs) -> tuple:
    """All five loss terms (TripleLossOutput's), loss differentiable, from the kernel of the logits' device, or
    the reference where there is none: fastdistil::sparse_triple_loss's body, and backend="auto"'s."""
    # Index and label values are not read here (a data-dependent branch wherever the op is traced); the C++
    # kernel checks them, and the Python API did before the call.
    checks.sparse_triple_loss(*args[:12], args.tail, check_values=False)
    backend = backend_for(args.student_logits.device, args.student_logits.dtype)
    return dispatch_terms("sparse_triple_loss", args, backend, torch.ops.fastdistil._sparse_triple_loss_forward,
                          sparse_triple_loss_reference)


def _composite(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels,
               student_hidden, teacher_hidden, attention_mask, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0,
               alpha_cos=1.0, restrict_ce_to_mask=False, tail="bucket"):
    """fastdistil::sparse_triple_loss: the four terms of its schema (loss_mse, always 0 here, left out)."""
    return _terms(SparseTripleLossArgs(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp,
                                       labels, student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce,
                                       alpha_mlm, alpha_cos, restrict_ce_to_mask, tail))[:4]


if extension.AVAILABLE:
    torch.library.impl("fastdistil::sparse_triple_loss", "CompositeImplicitAutograd", _composite)

_triton_with_autograd = precomputed.function(GRADIENTS, triton_forward)

# --- the Python API -----------------------------------------------------------------------------------------


def sparse_triple_loss(student_logits: torch.Tensor, teacher_topk_logits: torch.Tensor,
                       teacher_topk_indices: torch.Tensor, teacher_logsumexp: torch.Tensor, labels: torch.Tensor,
                       student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
                       temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                       alpha_cos: float = 1.0, restrict_ce_to_mask: bool = False, tail: str = "bucket",
                       backend: Backend = "auto") -> TripleLossOutput:
    """The DistilBERT triple loss against a top-k teacher (a teacher cache's), fused.

    Args:
        student_logits: [..., V] fp32/bf16/fp16, differentiable (float64 as in fastdistil.triple_loss).
        teacher_topk_logits: [..., k] the teacher's raw logits (T = 1) at its k largest entries, 1 <= k <= V.
        teacher_topk_indices: [..., k] int16, int32 or int64: where those entries are, distinct in each row.
        teacher_logsumexp: [..., 2] fp32: logsumexp of all V teacher logits at T = 1 and of logits / T
            (fastdistil.ops.reference.teacher_topk computes all three from dense logits).
        labels, student_hidden, teacher_hidden, attention_mask, temperature, alphas, restrict_ce_to_mask: as in
            fastdistil.triple_loss.
        tail: "bucket" (the teacher's mass outside its top-k is one more class, matched against the student's
            mass there) or "renormalize" (the top-k probabilities rescaled to sum to 1).
        backend: as in fastdistil.triple_loss.

    Returns:
        TripleLossOutput(loss, loss_ce, loss_mlm, loss_cos, loss_mse): fp32 scalars, loss_mse 0 (the MSE term
        needs every teacher logit); only loss carries a gradient.
    """
    if backend not in BACKENDS:
        raise ValueError(f"sparse_triple_loss: backend must be one of {BACKENDS}, got {backend!r}")
    args = SparseTripleLossArgs(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels,
                                student_hidden, teacher_hidden, attention_mask, float(temperature), float(alpha_ce),
                                float(alpha_mlm), float(alpha_cos), bool(restrict_ce_to_mask), tail)
    checks.sparse_triple_loss(*args[:12], tail)
    if backend == "reference" or (backend == "auto" and not extension.AVAILABLE):
        return sparse_triple_loss_reference(*args)
    if backend == "triton":
        return TripleLossOutput(*_triton_with_autograd(*args)[:precomputed.N_TERMS])
    if not extension.AVAILABLE:
        raise RuntimeError(f"sparse_triple_loss: backend={backend!r} needs fastdistil._C ({extension.ERROR}). "
                           f"{extension.HOW_TO_FIX}")
    if backend == "cpp" and student_logits.device.type != "cpu":
        raise ValueError(f"sparse_triple_loss: backend='cpp' runs on CPU tensors, got {student_logits.device}")
    return TripleLossOutput(*_terms(args))
