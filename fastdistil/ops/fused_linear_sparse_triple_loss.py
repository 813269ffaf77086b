"""torch.ops.fastdistil.fused_linear_sparse_triple_loss: the student's vocabulary projection and the triple loss
against a cached top-k teacher, chunk by chunk over token rows, so that no [N, V] tensor ever exists.

The op in the order every op module follows: its schema (csrc/ops.cpp), fake kernel, autograd, then one
implementation per device, and the Python API last. It is fused_linear_triple_loss with the teacher's projection
gone: the chunk loop is that op's (project_chunks: global normalizers, rows that contribute nothing dropped, the
cosine term computed once, fp16's power of two), and each chunk's loss is sparse_triple_loss's kernel on the
chunk's projected student logits and its rows of the cached teacher. Two [chunk, V] buffers are alive at once
instead of three; the default chunk is the online op's all the same (n_buffers=3), so that the cache's step
holds a third less for them rather than filling the same bytes with larger chunks.

On CUDA the Triton kernel normalizes each chunk by the batch's counts on the device; on CPU the C++ kernel
normalizes by the chunk's own, and weights scaled by the chunk's share of the batch's counts turn its means into
its part of the batch's.
"""

import torch

from fastdistil.ops import checks, extension, precomputed
from fastdistil.ops.fused_linear_triple_loss import forward_outputs_fake, project_chunks
from fastdistil.ops.sparse_triple_loss import triton_kernels_error
from fastdistil.ops.values import TripleLossOutput

ARGS = ("student_input", "student_weight", "student_bias", "teacher_topk_logits", "teacher_topk_indices",
        "teacher_logsumexp", "labels", "student_hidden", "teacher_hidden", "attention_mask", "temperature",
        "alpha_ce", "alpha_mlm", "alpha_cos", "restrict_ce_to_mask", "tail", "chunk_size")
GRADIENTS = precomputed.Gradients(n_inputs=len(ARGS), inputs=(0, 1, 2, 7), prescaled=(True, True, True, False))

# --- fake kernel ---------------------------------------------------------------------------------------------


def _forward_fake(student_input, student_weight, student_bias, teacher_topk_logits, teacher_topk_indices,
                  teacher_logsumexp, labels, student_hidden, teacher_hidden, attention_mask, temperature=2.0,
                  alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=False, tail="bucket",
                  chunk_size=0):
    return forward_outputs_fake(student_input, student_weight, student_bias, student_hidden)


if extension.AVAILABLE:
    torch.library.register_fake("fastdistil::_fused_linear_sparse_triple_loss_forward", _forward_fake)

# --- autograd ------------------------------------------------------------------------------------------------

if extension.AVAILABLE:
    precomputed.register("_fused_linear_sparse_triple_loss_forward", GRADIENTS)

# --- implementations: one forward for CPU and CUDA, the chunk's loss kernel chosen by the device -----------


def _cpu_chunk_loss(student_logits, topk_logits, topk_indices, logsumexp, labels, selected, counts, temperature,
                    alpha_ce, alpha_mlm, tail):
    # The C++ kernel normalizes by the chunk's own counts: weights scaled by the chunk's share of the global
    # counts turn its means into the chunk's part of the global ones (reading CPU counts costs nothing).
    n_sel, n_lab = counts[0].item(), counts[1].item()
    share_sel = int(selected.sum()) / n_sel if n_sel else 0.0
    share_lab = int((labels != -100).sum()) / n_lab if n_lab else 0.0
    no_hidden = student_logits.new_zeros(labels.numel(), 1)  # project_chunks computes the cosine term
    out = torch.ops.fastdistil._sparse_triple_loss_forward(
        student_logits, topk_logits, topk_indices, logsumexp, labels, no_hidden, no_hidden, selected, temperature,
        alpha_ce * share_sel, alpha_mlm * share_lab, 0.0, False, tail)
    _, loss_ce, loss_mlm, _, loss_mse, grad, _, grad_scale = out
    return loss_ce * share_sel, loss_mlm * share_lab, loss_mse, grad, grad_scale


def _triton_chunk_loss(*args):
    from fastdistil.kernels.sparse_triple_loss import sparse_logits_loss_chunk

    return sparse_logits_loss_chunk(*args)


def chunk_loss_for(device: torch.device):
    """The loss of one chunk of rows against its rows of the cached teacher, as project_chunks wants it (its
    parts of the three terms, the gradient times P, P), by the device's kernel: on CUDA the Triton one, which
    normalizes by the global counts on the device."""
    return _cpu_chunk_loss if device.type == "cpu" else _triton_chunk_loss


def _forward(student_input, student_weight, student_bias, teacher_topk_logits, teacher_topk_indices,
             teacher_logsumexp, labels, student_hidden, teacher_hidden, attention_mask, temperature=2.0,
             alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=False, tail="bucket", chunk_size=0):
    # The dispatcher leaves out trailing arguments equal to the schema's defaults: hence the defaults here.
    k = teacher_topk_logits.size(-1)
    topk_logits = teacher_topk_logits.reshape(-1, k)
    topk_indices = teacher_topk_indices.reshape(-1, k)
    logsumexp = teacher_logsumexp.reshape(-1, 2)
    loss_kernel = chunk_loss_for(student_input.device)

    def chunk_loss(idx, student_logits, chunk_labels, chunk_mask, selected, counts):
        # selected doubles as the chunk's mask: the kernel's KL rows are then exactly the batch's KL rows.
        return loss_kernel(student_logits, topk_logits.index_select(0, idx), topk_indices.index_select(0, idx),
                           logsumexp.index_select(0, idx), chunk_labels, selected, counts, temperature, alpha_ce,
                           alpha_mlm, tail)

    return project_chunks(student_input, student_weight, student_bias, labels, student_hidden, teacher_hidden,
                          attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask,
                          chunk_size, 0.0, chunk_loss, n_buffers=3)


def _terms(args: tuple, restrict_ce_to_mask: bool, tail: str, chunk_size: int) -> tuple:
    """All five loss terms (TripleLossOutput's), loss differentiable: the public op's body and the Python API's.
    args: the op's arguments up to alpha_cos. Index and label values are left to the loss kernels."""
    _check(*args, tail, chunk_size, check_values=False)
    return torch.ops.fastdistil._fused_linear_sparse_triple_loss_forward(
        *args, restrict_ce_to_mask, tail, chunk_size)[:precomputed.N_TERMS]


def _check(student_input, student_weight, student_bias, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp,
           labels, student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos, tail,
           chunk_size, check_values: bool = True) -> None:
    """fused_linear_triple_loss's checks of the student's side, sparse_triple_loss's of the teacher's."""
    op = "fused_linear_sparse_triple_loss"
    checks.projection(op, student_input, student_weight, student_bias)
    lead, vocab = tuple(student_input.shape[:-1]), student_weight.size(0)
    checks.tensors(op, dict(student_input=student_input, teacher_topk_logits=teacher_topk_logits,
                            teacher_topk_indices=teacher_topk_indices, teacher_logsumexp=teacher_logsumexp,
                            labels=labels, student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                            attention_mask=attention_mask))
    checks.floating(op, dict(teacher_topk_logits=teacher_topk_logits, student_hidden=student_hidden,
                             teacher_hidden=teacher_hidden))
    checks.sparse_teacher(op, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, lead, vocab, False, tail,
                          check_values)
    checks.labels(op, labels, lead, vocab, check_values)
    checks.mask(op, "attention_mask", attention_mask, lead)
    checks.hidden_pair(op, student_hidden, teacher_hidden, lead)
    checks.loss_scalars(op, temperature, alpha_ce, alpha_mlm, alpha_cos, 0.0)
    if chunk_size < 0:
        raise ValueError(f"{op}: chunk_size must be >= 0 (0 picks one), got {chunk_size}")


def _composite(student_input, student_weight, student_bias, teacher_topk_logits, teacher_topk_indices,
               teacher_logsumexp, labels, student_hidden, teacher_hidden, attention_mask, temperature=2.0,
               alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=False, tail="bucket", chunk_size=0):
    """fastdistil::fused_linear_sparse_triple_loss: the four terms of its schema."""
    args = (student_input, student_weight, student_bias, teacher_topk_logits, teacher_topk_indices,
            teacher_logsumexp, labels, student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce,
            alpha_mlm, alpha_cos)
    return _terms(args, restrict_ce_to_mask, tail, chunk_size)[:4]


if extension.AVAILABLE:
    for _device in ("cpu", "cuda"):
        torch.library.register_kernel("fastdistil::_fused_linear_sparse_triple_loss_forward", _device, _forward)
    torch.library.impl("fastdistil::fused_linear_sparse_triple_loss", "CompositeImplicitAutograd", _composite)

# --- the Python API -----------------------------------------------------------------------------------------


def fused_linear_sparse_triple_loss(student_input: torch.Tensor, student_weight: torch.Tensor,
                                    student_bias: torch.Tensor | None, teacher_topk_logits: torch.Tensor,
                                    teacher_topk_indices: torch.Tensor, teacher_logsumexp: torch.Tensor,
                                    labels: torch.Tensor, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                                    attention_mask: torch.Tensor, temperature: float = 2.0, alpha_ce: float = 5.0,
                                    alpha_mlm: float = 2.0, alpha_cos: float = 1.0,
                                    restrict_ce_to_mask: bool = False, tail: str = "bucket",
                                    chunk_size: int = 0) -> TripleLossOutput:
    """The triple loss of the student's vocabulary projection against a cached top-k teacher, without
    materializing any [N, V] logits.

    Args:
        student_input, student_weight, student_bias: as in fastdistil.fused_linear_triple_loss.
        teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, tail: as in fastdistil.sparse_triple_loss.
        labels, student_hidden, teacher_hidden, attention_mask, temperature, alphas, restrict_ce_to_mask,
            chunk_size: as in fastdistil.fused_linear_triple_loss.

    Returns:
        TripleLossOutput, equal to projecting student_input and calling fastdistil.sparse_triple_loss.
    """
    args = (student_input, student_weight, student_bias, teacher_topk_logits, teacher_topk_indices,
            teacher_logsumexp, labels, student_hidden, teacher_hidden, attention_mask, float(temperature),
            float(alpha_ce), float(alpha_mlm), float(alpha_cos))
    _check(*args, tail, int(chunk_size))
    if not extension.AVAILABLE:
        raise RuntimeError(f"fused_linear_sparse_triple_loss needs fastdistil._C ({extension.ERROR}). "
                           f"{extension.HOW_TO_FIX}")
    if student_input.device.type == "cuda" and triton_kernels_error():
        raise RuntimeError("fused_linear_sparse_triple_loss on CUDA runs the Triton loss kernel: "
                           f"{triton_kernels_error()}")
    return TripleLossOutput(*_terms(args, bool(restrict_ce_to_mask), tail, int(chunk_size)))
