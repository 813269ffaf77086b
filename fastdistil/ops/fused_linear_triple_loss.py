"""torch.ops.fastdistil.fused_linear_triple_loss: the vocabulary projections of both models and the triple loss,
chunk by chunk over token rows, so that no [N, V] tensor ever exists.

The op in the order every op module follows: its schema (csrc/ops.cpp), fake kernel, autograd, then one
implementation per device, and the Python API last. fastdistil::fused_linear_triple_loss, the public op, is
CompositeImplicitAutograd over the private _fused_linear_triple_loss_forward, which computes the loss and every
gradient (fastdistil/ops/precomputed.py: backward only scales them).

For each chunk of rows, both models' logits are projected into reused [chunk, V] buffers, the triple loss kernel
of the device (C++ on CPU, Triton on CUDA) turns them into the chunk's loss terms and logit gradient, and that
gradient is folded at once into the gradients of the student's projection input, weight and bias.

Normalizers are global: each chunk's loss terms and gradient are normalized by the numbers of selected and
labelled rows of the whole batch, counted on the device. The cosine term needs no projection: the triple loss
op computes it once over all rows. Rows that contribute nothing (padding without a label; under
restrict_ce_to_mask, every row without a label) are dropped before the projection; finding them is the op's one
host synchronization, since the chunk loop needs their number.

fp16: the chunk gradient is stored times the power of two of kernels/gradient_scale.py, so that a GradScaler's
scale, applied only in backward, finds its small entries still there; the gradients folded from it (input,
weight, bias) are accumulated and kept in fp32 until backward, which undoes the power of two, applies
grad_output and rounds once. Stored at the scaled magnitude in fp16 they could overflow. With alpha_mse > 0 the
bound behind that power of two depends on the logits, which exist one chunk at a time: each chunk's gradient
gets the power of two of its own logits, and its folds are brought to the batch's (that of the KL and MLM
terms alone, the largest any chunk can have) in fp32, exactly.
"""

import functools

import torch

from fastdistil.kernels.gradient_scale import hidden_grad_dtype, logits_grad_scale
from fastdistil.ops import checks, extension, precomputed
from fastdistil.ops.triple_loss import triton_kernels_error
from fastdistil.ops.values import TripleLossArgs, TripleLossOutput

# Bytes of the three [chunk, V] buffers (student logits, teacher logits, gradient) when chunk_size=0: a few
# hundred rows at BERT's vocabulary, enough for each chunk's matrix products to run at full speed, and a
# fraction of the 3 x N x V x 4 bytes the materialized path needs at any N worth chunking.
CHUNK_BUFFER_BYTES = 128 * 2**20
CHUNK_ALIGN = 64
ARGS = ("student_input", "student_weight", "student_bias", "teacher_input", "teacher_weight", "teacher_bias",
        "labels", "student_hidden", "teacher_hidden", "attention_mask", "temperature", "alpha_ce", "alpha_mlm",
        "alpha_cos", "restrict_ce_to_mask", "chunk_size", "alpha_mse")
GRADIENTS = precomputed.Gradients(n_inputs=len(ARGS), inputs=(0, 1, 2, 7), prescaled=(True, True, True, False))


def _grad_dtypes(student_input, student_weight, student_bias):
    """The dtypes of the input, weight and bias gradients the forward returns: fp32 for fp16 inputs, else the
    inputs' own (fp32 for a missing bias)."""
    if student_input.dtype == torch.float16:
        return torch.float32, torch.float32, torch.float32
    return (student_input.dtype, student_weight.dtype,
            student_bias.dtype if student_bias is not None else torch.float32)


# --- fake kernel ---------------------------------------------------------------------------------------------

def forward_outputs_fake(student_input, student_weight, student_bias, student_hidden) -> tuple:
    """What a private fused-linear forward returns: the terms, the input, weight, bias and hidden-state
    gradients and logits_grad_scale."""
    scalar = student_input.new_empty((), dtype=torch.float32)
    input_dtype, weight_dtype, bias_dtype = _grad_dtypes(student_input, student_weight, student_bias)
    return (*(scalar.clone() for _ in range(precomputed.N_TERMS)), torch.empty_like(student_input, dtype=input_dtype),
            torch.empty_like(student_weight, dtype=weight_dtype),
            student_input.new_empty(student_weight.size(0), dtype=bias_dtype),
            torch.empty_like(student_hidden, dtype=hidden_grad_dtype(student_hidden.dtype)), scalar.clone())


def _forward_fake(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias,
                  labels, student_hidden, teacher_hidden, attention_mask, temperature=2.0, alpha_ce=5.0,
                  alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=False, chunk_size=0, alpha_mse=0.0):
    return forward_outputs_fake(student_input, student_weight, student_bias, student_hidden)


if extension.AVAILABLE:
    torch.library.register_fake("fastdistil::_fused_linear_triple_loss_forward", _forward_fake)

# --- autograd ------------------------------------------------------------------------------------------------

if extension.AVAILABLE:
    precomputed.register("_fused_linear_triple_loss_forward", GRADIENTS)

# --- implementations: one forward for CPU and CUDA, the chunk's loss kernel chosen by the device -----------


def _cpu_chunk_loss(args: TripleLossArgs, selected, counts):
    # The C++ kernel normalizes by the chunk's own counts: weights scaled by the chunk's share of the global
    # counts turn its means into the chunk's part of the global ones. Reading CPU counts costs nothing. The
    # private forward rather than triple_loss_out: only it returns loss_mse, and the P of this chunk's logits.
    n_sel, n_lab = counts[0].item(), counts[1].item()
    share_sel = int(selected.sum()) / n_sel if n_sel else 0.0
    share_lab = int((args.labels != -100).sum()) / n_lab if n_lab else 0.0
    out = torch.ops.fastdistil._triple_loss_forward(*args._replace(
        alpha_ce=args.alpha_ce * share_sel, alpha_mlm=args.alpha_mlm * share_lab,
        alpha_mse=args.alpha_mse * share_sel))
    _, loss_ce, loss_mlm, _, loss_mse, grad, _, grad_scale = out
    return loss_ce * share_sel, loss_mlm * share_lab, loss_mse * share_sel, grad, grad_scale


def _triton_chunk_loss(args: TripleLossArgs, selected, counts):
    from fastdistil.kernels.triple_loss import logits_loss_chunk

    return logits_loss_chunk(args.student_logits, args.teacher_logits, args.labels, selected, counts,
                             args.temperature, args.alpha_ce, args.alpha_mlm, args.alpha_mse)


def chunk_loss_for(device: torch.device):
    """The loss of one chunk of rows: (its parts of loss_ce, loss_mlm and loss_mse, the gradient of its
    weighted loss wrt its student logits times grad_scale, and grad_scale: the P of kernels/gradient_scale.py
    for this chunk), from the chunk's TripleLossArgs (its hidden states unused), its KL-row flags and the global
    counts. On CPU the C++ kernel writes into the op's reused gradient buffer; on CUDA the Triton kernel
    normalizes by the global counts on the device."""
    return _cpu_chunk_loss if device.type == "cpu" else _triton_chunk_loss


def default_chunk_size(n_rows: int, vocab: int, itemsize: int, n_buffers: int = 3) -> int:
    """Rows per chunk so that the n_buffers [chunk, V] buffers (student logits, teacher logits, gradient) take
    about CHUNK_BUFFER_BYTES."""
    rows = CHUNK_BUFFER_BYTES // (n_buffers * vocab * itemsize)
    rows = max(CHUNK_ALIGN, rows // CHUNK_ALIGN * CHUNK_ALIGN)
    return max(1, min(rows, n_rows))


def _project(x, weight, bias, out):
    """x @ weight.T + bias into out."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


@functools.cache
def _mm_has_out_dtype(device: torch.device) -> bool:
    """Whether torch.mm takes out_dtype (16-bit operands, fp32 result) on this device: CUDA, torch >= 2.8."""
    x = torch.zeros(1, 1, dtype=torch.float16, device=device)
    try:
        torch.mm(x, x, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _matmul(a, b, out_dtype):
    """a @ b in out_dtype. Products of the fp16 chunk gradient are formed in fp32, the only dtype that holds
    all their values at its prescaled magnitude; a bf16 product may be rounded to bf16 first, bf16 having
    fp32's range."""
    if a.dtype == out_dtype:
        return a @ b
    if a.device.type != "cpu" and _mm_has_out_dtype(a.device):
        return torch.mm(a, b, out_dtype=out_dtype)
    if a.dtype == torch.bfloat16:
        return (a @ b).to(out_dtype)
    return a.to(out_dtype) @ b.to(out_dtype)


def _cosine_term(student_hidden, teacher_hidden, attention_mask, alpha_cos):
    """(loss_cos, gradient of alpha_cos * loss_cos wrt student_hidden) from the triple loss op itself, on logits
    of one column that no term weighs: one cosine implementation per language (C++, Triton)."""
    no_logits = student_hidden.new_zeros(*student_hidden.shape[:-1], 1)
    no_labels = torch.full(student_hidden.shape[:-1], -100, dtype=torch.int64, device=student_hidden.device)
    out = torch.ops.fastdistil._triple_loss_forward(no_logits, no_logits, no_labels, student_hidden,
                                                    teacher_hidden, attention_mask, 1.0, 0.0, 0.0, alpha_cos, False)
    return out[3], out[precomputed.N_TERMS + 1]


def project_chunks(student_input, student_weight, student_bias, labels, student_hidden, teacher_hidden,
                   attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, chunk_size,
                   alpha_mse, chunk_loss, n_buffers: int) -> tuple:
    """The chunk loop of the fused-linear ops, whatever the teacher is: the private forward's outputs.
    chunk_loss(idx, student_logits, labels, attention_mask, selected, counts) -> (the chunk's parts of loss_ce,
    loss_mlm and loss_mse, its logit gradient times its P, that P), given the chunk's flat row indices, its
    projected [n, V] student logits, its labels, mask and KL-row flags and the batch's counts. n_buffers: the
    [chunk, V] buffers alive at once, which the default chunk size divides CHUNK_BUFFER_BYTES among."""
    dim, vocab = student_input.size(-1), student_weight.size(0)
    x_s = student_input.reshape(-1, dim)
    flat_labels = labels.reshape(-1)
    valid = attention_mask.reshape(-1) != 0
    labelled = flat_labels != -100
    selected = labelled if restrict_ce_to_mask else valid
    counts = torch.stack([selected, labelled, valid]).sum(dim=1)  # int64 [3], stays on the device
    rows = (selected | labelled).nonzero().squeeze(1)
    chunk = chunk_size or default_chunk_size(rows.numel(), vocab, x_s.element_size(), n_buffers)
    grad_scale = logits_grad_scale(counts, temperature, alpha_ce, alpha_mlm, x_s.dtype)
    input_dtype, weight_dtype, bias_dtype = _grad_dtypes(student_input, student_weight, student_bias)

    grad_input = torch.zeros(x_s.shape, dtype=input_dtype, device=x_s.device)
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=x_s.device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=x_s.device)
    loss_ce = torch.zeros((), dtype=torch.float32, device=x_s.device)
    loss_mlm = torch.zeros((), dtype=torch.float32, device=x_s.device)
    loss_mse = torch.zeros((), dtype=torch.float32, device=x_s.device)
    s_buf = x_s.new_empty(min(chunk, rows.numel()), vocab)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        xs = x_s.index_select(0, idx)
        ce, mlm, mse, grad_logits, chunk_scale = chunk_loss(
            idx, _project(xs, student_weight, student_bias, s_buf[:idx.numel()]), flat_labels.index_select(0, idx),
            valid.index_select(0, idx), selected.index_select(0, idx), counts)
        loss_ce += ce
        loss_mlm += mlm
        loss_mse += mse
        # A power of two, 1 unless fp16 logits with alpha_mse > 0 gave this chunk a smaller P (the module
        # docstring): exact in fp32.
        to_batch_scale = grad_scale / chunk_scale
        grad_input.index_copy_(0, idx, _matmul(grad_logits, student_weight, input_dtype) * to_batch_scale)
        if grad_logits.dtype == torch.float32:  # P = 1
            grad_weight.addmm_(grad_logits.t(), xs)
        else:  # 16-bit products, accumulated over chunks in fp32
            grad_weight.addcmul_(_matmul(grad_logits.t(), xs, torch.float32), to_batch_scale)
        grad_bias.add_(grad_logits.sum(0, dtype=torch.float32) * to_batch_scale)
        del grad_logits  # on CPU, frees the op's gradient buffer for the next chunk to reuse

    loss_cos, grad_hidden = _cosine_term(student_hidden, teacher_hidden, attention_mask, alpha_cos)
    loss = alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_cos * loss_cos + alpha_mse * loss_mse
    return (loss, loss_ce, loss_mlm, loss_cos, loss_mse, grad_input.view(student_input.shape),
            grad_weight.to(weight_dtype), grad_bias.to(bias_dtype), grad_hidden, grad_scale)


def _forward(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
             student_hidden, teacher_hidden, attention_mask, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0,
             alpha_cos=1.0, restrict_ce_to_mask=False, chunk_size=0, alpha_mse=0.0):
    # The dispatcher leaves out trailing arguments equal to the schema's defaults: hence the defaults here.
    x_t = teacher_input.reshape(-1, teacher_input.size(-1))
    loss_kernel = chunk_loss_for(student_input.device)
    buffers = {}

    def chunk_loss(idx, student_logits, chunk_labels, chunk_mask, selected, counts):
        n = idx.numel()
        if not buffers:  # the first chunk is the largest
            buffers["t"] = x_t.new_empty(student_logits.shape, dtype=teacher_weight.dtype)
            buffers["hidden"] = student_logits.new_zeros(n, 1)  # the chunks' loss has no cosine term: _cosine_term's
        no_hidden = buffers["hidden"][:n]
        args = TripleLossArgs(
            student_logits=student_logits,
            teacher_logits=_project(x_t.index_select(0, idx), teacher_weight, teacher_bias, buffers["t"][:n]),
            labels=chunk_labels, student_hidden=no_hidden, teacher_hidden=no_hidden, attention_mask=chunk_mask,
            temperature=temperature, alpha_ce=alpha_ce, alpha_mlm=alpha_mlm, alpha_cos=0.0,
            restrict_ce_to_mask=restrict_ce_to_mask, alpha_mse=alpha_mse)
        return loss_kernel(args, selected, counts)

    return project_chunks(student_input, student_weight, student_bias, labels, student_hidden, teacher_hidden,
                          attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask,
                          chunk_size, alpha_mse, chunk_loss, n_buffers=3)


def _terms(args: tuple, restrict_ce_to_mask: bool, chunk_size: int, alpha_mse: float) -> tuple:
    """All five loss terms (TripleLossOutput's), loss differentiable: fastdistil::fused_linear_triple_loss's body
    and the Python API's. args: the op's arguments up to alpha_cos. Label values are left to the loss kernels:
    reading them here would be a data-dependent branch wherever the op is traced."""
    checks.fused_linear_triple_loss(*args, chunk_size, alpha_mse, check_label_values=False)
    return torch.ops.fastdistil._fused_linear_triple_loss_forward(
        *args, restrict_ce_to_mask, chunk_size, alpha_mse)[:precomputed.N_TERMS]


def _composite(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
               student_hidden, teacher_hidden, attention_mask, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0,
               alpha_cos=1.0, restrict_ce_to_mask=False, chunk_size=0, alpha_mse=0.0):
    """fastdistil::fused_linear_triple_loss: the four terms of its schema, loss_mse left out (it is inside
    loss)."""
    args = (student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
            student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos)
    return _terms(args, restrict_ce_to_mask, chunk_size, alpha_mse)[:4]


if extension.AVAILABLE:
    for _device in ("cpu", "cuda"):
        torch.library.register_kernel("fastdistil::_fused_linear_triple_loss_forward", _device, _forward)
    torch.library.impl("fastdistil::fused_linear_triple_loss", "CompositeImplicitAutograd", _composite)

# --- the Python API -----------------------------------------------------------------------------------------


def fused_linear_triple_loss(student_input: torch.Tensor, student_weight: torch.Tensor,
                             student_bias: torch.Tensor | None, teacher_input: torch.Tensor,
                             teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None, labels: torch.Tensor,
                             student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
                             temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                             alpha_cos: float = 1.0, restrict_ce_to_mask: bool = False,
                             chunk_size: int = 0, alpha_mse: float = 0.0) -> TripleLossOutput:
    """The triple loss of both models' vocabulary projections, without materializing any [N, V] logits.

    Args:
        student_input, teacher_input: [..., D] what each model feeds its vocabulary projection (for DistilBERT
            the output of vocab_transform -> GELU -> vocab_layer_norm; for BERT cls.predictions.transform).
            student_input is differentiable.
        student_weight, teacher_weight: [V, D] projections (student_weight differentiable: a projector tied to
            the word embeddings accumulates this gradient with the embedding's).
        student_bias, teacher_bias: [V] or None.
        labels, student_hidden, teacher_hidden, attention_mask, temperature, alphas, restrict_ce_to_mask: as
            in fastdistil.triple_loss.
        chunk_size: token rows projected at once; 0 picks one from N, V and the dtype.
        alpha_mse: as in fastdistil.triple_loss (after chunk_size, as in the op's schema).

    Returns:
        TripleLossOutput(loss, loss_ce, loss_mlm, loss_cos, loss_mse), equal to projecting both inputs and
        calling fastdistil.triple_loss.
    """
    args = (student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
            student_hidden, teacher_hidden, attention_mask, float(temperature), float(alpha_ce), float(alpha_mlm),
            float(alpha_cos))
    checks.fused_linear_triple_loss(*args, int(chunk_size), float(alpha_mse))
    if not extension.AVAILABLE:
        raise RuntimeError(f"fused_linear_triple_loss needs fastdistil._C ({extension.ERROR}). "
                           f"{extension.HOW_TO_FIX}")
    if student_input.device.type == "cuda" and triton_kernels_error():
        raise RuntimeError(f"fused_linear_triple_loss on CUDA runs the Triton loss kernel: {triton_kernels_error()}")
    return TripleLossOutput(*_terms(args, bool(restrict_ce_to_mask), int(chunk_size), float(alpha_mse)))
