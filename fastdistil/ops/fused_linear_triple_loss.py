"""torch.ops.fastdistil.fused_linear_triple_loss: the vocabulary projections of both models and the triple loss,
chunk by chunk over token rows, so that no [N, V] tensor ever exists.

For each chunk of rows, both models' logits are projected into reused [chunk, V] buffers, the fused triple loss
kernel turns them into the chunk's loss terms and logit gradient, and that gradient is folded at once into the
gradients of the student's projection input, weight and bias. The forward pass therefore already holds every
gradient; backward only scales them by grad_output, as for triple_loss.

Normalizers are global: each chunk's loss terms and gradient are normalized by the numbers of selected and
labelled rows of the whole batch, counted on the device. The cosine term needs no projection and is computed
once over all rows. Rows that contribute nothing (padding without a label; under restrict_ce_to_mask, every row
without a label) are dropped before the projection; finding them is the op's one host synchronization, since the
chunk loop needs their number.

fp16: the chunk gradient is stored times the power of two of kernels/gradient_scale.py, so that a GradScaler's
scale, applied only in backward, finds its small entries still there; the gradients folded from it (input,
weight, bias) are accumulated and kept in fp32 until backward, which undoes the power of two, applies
grad_output and rounds once. Stored at the scaled magnitude in fp16 they could overflow.
"""

import functools

import torch

from fastdistil.ops import extension
from fastdistil.kernels.gradient_scale import hidden_grad_dtype, logits_grad_scale
from fastdistil.ops.triple_loss import LOGIT_DTYPES, scale_gradient_, triton_kernels_error
from fastdistil.ops.outputs import TripleLossOutput

# Bytes of the three [chunk, V] buffers (student logits, teacher logits, gradient) when chunk_size=0: a few
# hundred rows at BERT's vocabulary, enough for each chunk's matrix products to run at full speed, and a
# fraction of the 3 x N x V x 4 bytes the materialized path needs at any N worth chunking.
CHUNK_BUFFER_BYTES = 128 * 2**20
CHUNK_ALIGN = 64
COSINE_EPS = 1e-12  # CosineEmbeddingLoss adds it to the squared norms

SCHEMA_ARGS = (
    "Tensor student_input, Tensor student_weight, Tensor? student_bias, Tensor teacher_input, "
    "Tensor teacher_weight, Tensor? teacher_bias, Tensor labels, Tensor student_hidden, Tensor teacher_hidden, "
    "Tensor attention_mask, float temperature=2.0, float alpha_ce=5.0, float alpha_mlm=2.0, float alpha_cos=1.0, "
    "bool restrict_ce_to_mask=False, int chunk_size=0"
)
LOSSES = "Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos"
# The gradients of the forward, in the inputs' dtypes (fp32 for fp16 inputs), the first three times
# logits_grad_scale.
GRADS = ("Tensor grad_student_input, Tensor grad_student_weight, Tensor grad_student_bias, "
         "Tensor grad_student_hidden, Tensor logits_grad_scale")

_lib = torch.library.Library("fastdistil", "FRAGMENT")
_lib.define(f"fused_linear_triple_loss({SCHEMA_ARGS}) -> ({LOSSES})")
_lib.define(f"_fused_linear_triple_loss_forward({SCHEMA_ARGS}) -> ({LOSSES}, {GRADS})")


def check_inputs(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
                 student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos,
                 chunk_size) -> None:
    """Raises ValueError/TypeError naming the offending argument."""
    name = "fused_linear_triple_loss"
    for arg, x in (("student_input", student_input), ("teacher_input", teacher_input),
                   ("student_weight", student_weight), ("teacher_weight", teacher_weight),
                   ("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name}: {arg} must be float32, bfloat16 or float16, got {x.dtype}")
    for arg, x, dims in (("student_weight", student_weight, 2), ("teacher_weight", teacher_weight, 2),
                         ("student_input", student_input, None), ("teacher_input", teacher_input, None)):
        if (dims and x.dim() != dims) or x.dim() < 1:
            raise ValueError(f"{name}: {arg} must be {'[V, D]' if dims else '[..., D]'}, got shape {tuple(x.shape)}")
    vocab = student_weight.size(0)
    if student_weight.size(1) != student_input.size(-1):
        raise ValueError(f"{name}: student_weight must be [V, {student_input.size(-1)}] (student_input's D), got "
                         f"{tuple(student_weight.shape)}")
    if teacher_weight.shape != (vocab, teacher_input.size(-1)):
        raise ValueError(f"{name}: teacher_weight must be [{vocab}, {teacher_input.size(-1)}] (student_weight's V, "
                         f"teacher_input's D), got {tuple(teacher_weight.shape)}")
    for arg, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and bias.shape != (vocab,):
            raise ValueError(f"{name}: {arg} must be [{vocab}] or None, got {tuple(bias.shape)}")
    lead = tuple(student_input.shape[:-1])
    for arg, x, has_feature_dim in (("teacher_input", teacher_input, True), ("labels", labels, False),
                                    ("attention_mask", attention_mask, False),
                                    ("student_hidden", student_hidden, True), ("teacher_hidden", teacher_hidden, True)):
        if tuple(x.shape[:-1] if has_feature_dim else x.shape) != lead:
            raise ValueError(f"{name}: {arg} must have the leading shape {lead} of student_input, got "
                             f"{tuple(x.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"{name}: teacher_hidden must have the shape of student_hidden "
                         f"{tuple(student_hidden.shape)}, got {tuple(teacher_hidden.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}: labels must be int64, got {labels.dtype}")
    if attention_mask.is_floating_point():
        raise TypeError(f"{name}: attention_mask must be bool or integer, got {attention_mask.dtype}")
    tensors = (student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
               student_hidden, teacher_hidden, attention_mask)
    if any(t is not None and t.device != student_input.device for t in tensors):
        raise ValueError(f"{name}: every tensor must be on {student_input.device} like student_input")
    if temperature <= 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    for arg, alpha in (("alpha_ce", alpha_ce), ("alpha_mlm", alpha_mlm), ("alpha_cos", alpha_cos)):
        if alpha < 0:
            raise ValueError(f"{name}: {arg} must be >= 0, got {alpha}")
    if chunk_size < 0:
        raise ValueError(f"{name}: chunk_size must be >= 0 (0 picks one), got {chunk_size}")


def default_chunk_size(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk so that the three [chunk, V] buffers take about CHUNK_BUFFER_BYTES."""
    rows = CHUNK_BUFFER_BYTES // (3 * vocab * itemsize)
    rows = max(CHUNK_ALIGN, rows // CHUNK_ALIGN * CHUNK_ALIGN)
    return max(1, min(rows, n_rows))


def _cosine_term(student_hidden, teacher_hidden, valid, n_valid, alpha_cos):
    """(loss_cos, gradient of alpha_cos * loss_cos wrt student_hidden): CosineEmbeddingLoss with target 1 over
    the non-padding rows, in fp32. n_valid: 0-dim count on the device."""
    s, t = student_hidden.float(), teacher_hidden.float()
    ss = (s * s).sum(-1) + COSINE_EPS
    tt = (t * t).sum(-1) + COSINE_EPS
    # sqrt(ss) * sqrt(tt) rather than sqrt(ss * tt): the product of two large squared norms overflows fp32.
    denom = ss.sqrt() * tt.sqrt()
    cos = (s * t).sum(-1) / denom
    weight = valid.float() / n_valid.clamp_min(1)
    loss_cos = ((1 - cos) * weight).sum()
    # d(1 - cos)/ds = -(t / denom - cos * s / ss)
    grad = (cos / ss).unsqueeze(-1) * s - t / denom.unsqueeze(-1)
    grad = grad * (alpha_cos * weight).unsqueeze(-1)
    return loss_cos, grad.to(hidden_grad_dtype(student_hidden.dtype))


def _cpu_chunk_loss(s_logits, t_logits, labels, mask, selected, counts, temperature, alpha_ce, alpha_mlm,
                    restrict_ce_to_mask, grad_scale, grad_buffer):
    # The C++ kernel normalizes by the chunk's own counts: weights scaled by the chunk's share of the global
    # counts turn its means into the chunk's part of the global ones. Reading CPU counts costs nothing.
    n_sel, n_lab = counts[0].item(), counts[1].item()
    share_sel = int(selected.sum()) / n_sel if n_sel else 0.0
    share_lab = int((labels != -100).sum()) / n_lab if n_lab else 0.0
    n = s_logits.size(0)
    grad = grad_buffer[:n]
    no_hidden = s_logits.new_zeros(n, 1)  # the cosine term is computed once, outside the chunks
    out = torch.ops.fastdistil.triple_loss_out(
        s_logits, t_logits, labels, no_hidden, no_hidden, mask, temperature, alpha_ce * share_sel,
        alpha_mlm * share_lab, 0.0, restrict_ce_to_mask, grad_student_logits=grad,
        grad_student_hidden=torch.empty_like(no_hidden), logits_grad_scale=grad_scale.item())
    return out[1] * share_sel, out[2] * share_lab, grad


def _triton_chunk_loss(s_logits, t_logits, labels, mask, selected, counts, temperature, alpha_ce, alpha_mlm,
                       restrict_ce_to_mask, grad_scale, grad_buffer):
    from fastdistil.kernels.triple_loss import logits_loss_chunk

    return logits_loss_chunk(s_logits, t_logits, labels, selected, counts, temperature, alpha_ce, alpha_mlm,
                             grad_scale)


def chunk_loss_for(device: torch.device):
    """The loss of one chunk of rows: (its part of loss_ce, its part of loss_mlm, the gradient of its weighted
    loss wrt its student logits times grad_scale), from the chunk's logits, labels, padding mask and KL-row
    flags, the global counts, the loss arguments, grad_scale and a gradient buffer. On CPU the C++ kernel writes
    into a buffer reused across chunks; on CUDA the Triton kernel allocates its own, normalizes by the global
    counts on the device and no buffer is made."""
    return _cpu_chunk_loss if device.type == "cpu" else _triton_chunk_loss


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


def _forward(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
             student_hidden, teacher_hidden, attention_mask, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0,
             alpha_cos=1.0, restrict_ce_to_mask=False, chunk_size=0):
    # The dispatcher leaves out trailing arguments equal to the schema's defaults: hence the defaults here.
    dim, vocab = student_input.size(-1), student_weight.size(0)
    x_s = student_input.reshape(-1, dim)
    x_t = teacher_input.reshape(-1, teacher_input.size(-1))
    labels = labels.reshape(-1)
    valid = attention_mask.reshape(-1) != 0
    labelled = labels != -100
    selected = labelled if restrict_ce_to_mask else valid
    counts = torch.stack([selected, labelled, valid]).sum(dim=1)  # int64 [3], stays on the device
    rows = (selected | labelled).nonzero().squeeze(1)
    chunk = chunk_size or default_chunk_size(rows.numel(), vocab, x_s.element_size())
    grad_scale = logits_grad_scale(counts, temperature, alpha_ce, alpha_mlm, x_s.dtype)
    grad_dtype = torch.float32 if x_s.dtype == torch.float16 else x_s.dtype

    grad_input = torch.zeros(x_s.shape, dtype=grad_dtype, device=x_s.device)
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=x_s.device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=x_s.device)
    loss_ce = torch.zeros((), dtype=torch.float32, device=x_s.device)
    loss_mlm = torch.zeros((), dtype=torch.float32, device=x_s.device)
    n_buf = min(chunk, rows.numel())
    s_buf = x_s.new_empty(n_buf, vocab)
    t_buf = x_t.new_empty(n_buf, vocab, dtype=teacher_weight.dtype)
    chunk_loss = chunk_loss_for(x_s.device)
    g_buf = torch.empty_like(s_buf) if chunk_loss is _cpu_chunk_loss else None
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        n = idx.numel()
        xs = x_s.index_select(0, idx)
        s_logits = _project(xs, student_weight, student_bias, s_buf[:n])
        t_logits = _project(x_t.index_select(0, idx), teacher_weight, teacher_bias, t_buf[:n])
        ce, mlm, grad_logits = chunk_loss(s_logits, t_logits, labels.index_select(0, idx), valid.index_select(0, idx),
                                          selected.index_select(0, idx), counts, temperature, alpha_ce, alpha_mlm,
                                          restrict_ce_to_mask, grad_scale, g_buf)
        loss_ce += ce
        loss_mlm += mlm
        grad_input.index_copy_(0, idx, _matmul(grad_logits, student_weight, grad_dtype))
        if grad_logits.dtype == torch.float32:
            grad_weight.addmm_(grad_logits.t(), xs)
        else:  # 16-bit products, accumulated over chunks in fp32
            grad_weight.add_(_matmul(grad_logits.t(), xs, torch.float32))
        grad_bias.add_(grad_logits.sum(0, dtype=torch.float32))

    loss_cos, grad_hidden = _cosine_term(student_hidden, teacher_hidden, valid.view(student_hidden.shape[:-1]),
                                         counts[2], alpha_cos)
    loss = alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_cos * loss_cos
    weight_dtype, bias_dtype = _weight_and_bias_grad_dtypes(student_input, student_weight, student_bias)
    return (loss, loss_ce, loss_mlm, loss_cos, grad_input.view(student_input.shape), grad_weight.to(weight_dtype),
            grad_bias.to(bias_dtype), grad_hidden, grad_scale)


def _weight_and_bias_grad_dtypes(student_input, student_weight, student_bias):
    """What the forward returns the weight and bias gradients in: fp32 for fp16 inputs, else their own."""
    if student_input.dtype == torch.float16:
        return torch.float32, torch.float32
    return student_weight.dtype, student_bias.dtype if student_bias is not None else torch.float32


for _device in ("CPU", "CUDA"):
    _lib.impl("_fused_linear_triple_loss_forward", _forward, _device)


@torch.library.register_fake("fastdistil::_fused_linear_triple_loss_forward")
def _(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
      student_hidden, teacher_hidden, attention_mask, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0,
      restrict_ce_to_mask=False, chunk_size=0):
    scalar = student_input.new_empty((), dtype=torch.float32)
    input_dtype = torch.float32 if student_input.dtype == torch.float16 else student_input.dtype
    weight_dtype, bias_dtype = _weight_and_bias_grad_dtypes(student_input, student_weight, student_bias)
    return (scalar, scalar.clone(), scalar.clone(), scalar.clone(), torch.empty_like(student_input, dtype=input_dtype),
            torch.empty_like(student_weight, dtype=weight_dtype),
            student_input.new_empty(student_weight.size(0), dtype=bias_dtype),
            torch.empty_like(student_hidden, dtype=hidden_grad_dtype(student_hidden.dtype)), scalar.clone())


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.dtypes = [None if x is None else x.dtype for x in (inputs[0], inputs[1], inputs[2], inputs[7])]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[4:])


def _backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 16
    grad_input, grad_weight, grad_bias, grad_hidden, logits_grad_scale = ctx.saved_tensors
    # In place, as triple_loss does: the forward's gradients are not needed again.
    logits_scale = grad_loss / logits_grad_scale
    for grad in (grad_input, grad_weight, grad_bias):
        scale_gradient_(grad, logits_scale)
    scale_gradient_(grad_hidden, grad_loss)
    input_dtype, weight_dtype, bias_dtype, hidden_dtype = ctx.dtypes
    return (grad_input.to(input_dtype), grad_weight.to(weight_dtype),
            grad_bias.to(bias_dtype) if ctx.has_bias else None, None, None, None, None, grad_hidden.to(hidden_dtype),
            *(None,) * 8)


torch.library.register_autograd("fastdistil::_fused_linear_triple_loss_forward", _backward,
                                setup_context=_setup_context)


def _composite(*args):
    return torch.ops.fastdistil._fused_linear_triple_loss_forward(*args)[:4]


_lib.impl("fused_linear_triple_loss", _composite, "CompositeImplicitAutograd")


def fused_linear_triple_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 2.0,
    alpha_ce: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
    restrict_ce_to_mask: bool = False,
    chunk_size: int = 0,
) -> TripleLossOutput:
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

    Returns:
        TripleLossOutput, equal to projecting both inputs and calling fastdistil.triple_loss.
    """
    args = (student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
            student_hidden, teacher_hidden, attention_mask, float(temperature), float(alpha_ce), float(alpha_mlm),
            float(alpha_cos))
    check_inputs(*args, int(chunk_size))
    if not extension.AVAILABLE:
        raise RuntimeError(f"fused_linear_triple_loss needs fastdistil._C ({extension.ERROR}). "
                           f"{extension.HOW_TO_FIX}")
    if student_input.device.type == "cuda" and triton_kernels_error():
        raise RuntimeError(f"fused_linear_triple_loss on CUDA runs the Triton loss kernel: {triton_kernels_error()}")
    return TripleLossOutput(*torch.ops.fastdistil.fused_linear_triple_loss(
        *args, bool(restrict_ce_to_mask), int(chunk_size)))
