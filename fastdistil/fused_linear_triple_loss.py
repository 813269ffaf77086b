"""torch.ops.fastdistil.fused_linear_triple_loss: the vocabulary projections of both models and the triple loss,
chunk by chunk over token rows, so that no [N, V] tensor ever exists.

For each chunk of rows, both models' logits are projected into reused [chunk, V] buffers, the fused triple loss
kernel turns them into the chunk's loss terms and logit gradient, and that gradient is folded at once into the
gradients of the student's projection input, weight and bias. The forward pass therefore already holds every
gradient; backward only scales them by grad_output, as for triple_loss.

Normalizers are global: a chunk's KL and MLM weights are scaled by its share of the selected and labelled rows,
so the chunk kernel's per-chunk means add up to the means over all rows. The cosine term needs no projection
and is computed once over all rows. Rows that contribute nothing (padding without a label; under
restrict_ce_to_mask, every row without a label) are dropped before the projection.
"""

import torch

from fastdistil import extension
from fastdistil.triple_loss import LOGIT_DTYPES
from fastdistil.triple_loss_output import TripleLossOutput

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
GRADS = ("Tensor grad_student_input, Tensor grad_student_weight, Tensor grad_student_bias, "
         "Tensor grad_student_hidden")

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
    the non-padding rows, in fp32."""
    s, t = student_hidden.float(), teacher_hidden.float()
    ss = (s * s).sum(-1) + COSINE_EPS
    tt = (t * t).sum(-1) + COSINE_EPS
    denom = torch.sqrt(ss * tt)
    cos = (s * t).sum(-1) / denom
    weight = valid.float() / max(n_valid, 1)
    loss_cos = ((1 - cos) * weight).sum()
    # d(1 - cos)/ds = -(t / denom - cos * s / ss)
    grad = (cos / ss).unsqueeze(-1) * s - t / denom.unsqueeze(-1)
    grad = grad * (alpha_cos * weight).unsqueeze(-1)
    return loss_cos, grad.to(student_hidden.dtype)


def _cpu_chunk_loss(args, grad_buffer):
    grad = grad_buffer[: args[0].size(0)]
    out = torch.ops.fastdistil.triple_loss_out(*args, grad_student_logits=grad,
                                               grad_student_hidden=torch.empty_like(args[3]))
    return out[1], out[2], grad


def _device_chunk_loss(args, grad_buffer):
    out = torch.ops.fastdistil._triple_loss_forward(*args)
    return out[1], out[2], out[4]


def chunk_loss_for(device: torch.device):
    """The loss of one chunk: (loss_ce, loss_mlm, gradient of the chunk's weighted loss wrt its student logits)
    from (loss args, gradient buffer). On CPU the C++ kernel writes into a buffer reused across chunks;
    elsewhere the op's device kernel (the Triton kernel on CUDA) allocates its own and no buffer is made."""
    return _cpu_chunk_loss if device.type == "cpu" else _device_chunk_loss


def _project(x, weight, bias, out):
    """x @ weight.T + bias into out."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


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
    n_sel, n_lab, n_valid = int(selected.sum()), int(labelled.sum()), int(valid.sum())
    rows = (selected | labelled).nonzero().squeeze(1)
    chunk = chunk_size or default_chunk_size(rows.numel(), vocab, x_s.element_size())

    grad_input = torch.zeros_like(x_s)
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=x_s.device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=x_s.device)
    loss_ce = torch.zeros((), dtype=torch.float32, device=x_s.device)
    loss_mlm = torch.zeros((), dtype=torch.float32, device=x_s.device)
    n_buf = min(chunk, rows.numel())
    s_buf = x_s.new_empty(n_buf, vocab)
    t_buf = x_t.new_empty(n_buf, vocab, dtype=teacher_weight.dtype)
    chunk_loss = chunk_loss_for(x_s.device)
    g_buf = torch.empty_like(s_buf) if chunk_loss is _cpu_chunk_loss else None
    hidden_dummy = student_hidden.new_zeros(n_buf, student_hidden.size(-1))
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        n = idx.numel()
        xs = x_s.index_select(0, idx)
        s_logits = _project(xs, student_weight, student_bias, s_buf[:n])
        t_logits = _project(x_t.index_select(0, idx), teacher_weight, teacher_bias, t_buf[:n])
        chunk_labels, chunk_mask = labels.index_select(0, idx), valid.index_select(0, idx)
        # The chunk kernel averages over the chunk's rows; these shares turn its means into global ones.
        share_sel = int(selected.index_select(0, idx).sum()) / n_sel if n_sel else 0.0
        share_lab = int((chunk_labels != -100).sum()) / n_lab if n_lab else 0.0
        ce, mlm, grad_logits = chunk_loss((s_logits, t_logits, chunk_labels, hidden_dummy[:n], hidden_dummy[:n],
                                           chunk_mask, temperature, alpha_ce * share_sel, alpha_mlm * share_lab,
                                           0.0, restrict_ce_to_mask), g_buf)
        loss_ce += ce * share_sel
        loss_mlm += mlm * share_lab
        grad_input.index_copy_(0, idx, grad_logits @ student_weight)
        if grad_logits.dtype == torch.float32:
            grad_weight.addmm_(grad_logits.t(), xs)
        else:  # 16-bit products, accumulated over chunks in fp32
            grad_weight.add_(grad_logits.t() @ xs)
        grad_bias.add_(grad_logits.sum(0, dtype=torch.float32))

    loss_cos, grad_hidden = _cosine_term(student_hidden, teacher_hidden, valid.view(student_hidden.shape[:-1]),
                                         n_valid, alpha_cos)
    loss = alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_cos * loss_cos
    bias_dtype = student_bias.dtype if student_bias is not None else torch.float32
    return (loss, loss_ce, loss_mlm, loss_cos, grad_input.view_as(student_input),
            grad_weight.to(student_weight.dtype), grad_bias.to(bias_dtype), grad_hidden)


for _device in ("CPU", "CUDA"):
    _lib.impl("_fused_linear_triple_loss_forward", _forward, _device)


@torch.library.register_fake("fastdistil::_fused_linear_triple_loss_forward")
def _(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, labels,
      student_hidden, teacher_hidden, attention_mask, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0,
      restrict_ce_to_mask=False, chunk_size=0):
    scalar = student_input.new_empty((), dtype=torch.float32)
    bias_dtype = student_bias.dtype if student_bias is not None else torch.float32
    return (scalar, scalar.clone(), scalar.clone(), scalar.clone(), torch.empty_like(student_input),
            torch.empty_like(student_weight), student_input.new_empty(student_weight.size(0), dtype=bias_dtype),
            torch.empty_like(student_hidden))


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[4:])


def _backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 16
    grad_input, grad_weight, grad_bias, grad_hidden = ctx.saved_tensors
    # In place, as triple_loss does: the forward's gradients are not needed again.
    for grad in (grad_input, grad_weight, grad_bias, grad_hidden):
        if extension.AVAILABLE:
            torch.ops.fastdistil._scale_gradient_(grad, grad_loss)
        else:
            grad.mul_(grad_loss)
    return (grad_input, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None, grad_hidden,
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
    return TripleLossOutput(*torch.ops.fastdistil.fused_linear_triple_loss(
        *args, bool(restrict_ce_to_mask), int(chunk_size)))
