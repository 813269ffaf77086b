"""Triton implementation of fastdistil::_triple_loss_forward, the CUDA kernel of the fused triple loss.

Same contract as the C++ CPU kernel (csrc/triple_loss_cpu.cpp): the five loss terms (the weighted loss, the KL,
MLM, cosine and logit-MSE terms) and the gradient of the weighted loss with respect to the student logits and
hidden states, computed in one forward.

One program per logit row. The first sweep keeps online-softmax statistics (running max and sum) of s/T, s and
t/T, and sums (s - t)^2; the second sweep rereads the row (from L2 on A100/H100) and writes the gradient once,
in the student's dtype, and the KL of the row. A second small kernel does the cosine term on the [N, D] hidden
states. Each row writes its loss partials to an [N] buffer and torch sums them, so the result is deterministic,
and the normalizers (numbers of selected, labelled and real rows) are counted by torch on the device and read by
the kernels, so nothing waits for the host. Computation is in fp32, in fp64 for fp64 inputs (gradient checks).

torch.compile: torch.library.triton_op cannot serve here, because it defines its op and the schema is already
defined in C++ (csrc/ops.cpp); a second definition is refused. fastdistil/ops/triple_loss.py therefore does by
hand what triton_op does for the ops it defines: the launchers go through torch.library.wrap_triton when traced
(traceable=True), and a FunctionalTensorMode rule runs them while AOTAutograd traces the op on CUDA tensors, so
the graph Inductor compiles holds the Triton kernels themselves instead of an opaque call, whenever torch's
analysis of these kernels can be trusted (traced_compile_unsupported, below). The launchers take their inputs as
checked (fastdistil/ops/checks.py): this module imports nothing of fastdistil above it.
"""

import contextlib
import functools
import inspect

import torch
import triton
import triton.language as tl

from fastdistil.kernels.gradient_scale import hidden_grad_dtype, logits_grad_scale

_LOG2E = tl.constexpr(1.4426950408889634)
_COS_EPS = tl.constexpr(1e-12)  # EPSILON of at::cosine_embedding_loss, added to both squared norms
_MAX_BLOCK = 4096


@triton.jit
def _softmax1_numerator(e, centred, TEMP_POW: tl.constexpr):
    # exp(centred) from e = exp(centred / T): a power of e when T is 1 or 2 (the default), so no second exp.
    if TEMP_POW == 1:
        num = e
    elif TEMP_POW == 2:
        num = e * e
    else:
        num = tl.exp2(centred * _LOG2E)
    return num


@triton.jit
def _online_softmax_step(s, m_s, z_s, z_1, scale, TEMP_POW: tl.constexpr):
    # One block of the first sweep: the running max m_s of s and the sums z_s of exp((s - m_s) / T) and z_1 of
    # exp(s - m_s), rescaled to the new max. Also returns the rescale factor and the block's exponentials.
    m_s_new = tl.maximum(m_s, tl.max(s, 0))
    rescale = tl.exp2((m_s - m_s_new) * scale)
    es = tl.exp2((s - m_s_new) * scale)
    z_s = z_s * rescale + tl.sum(es, 0)
    z_1 = z_1 * _softmax1_numerator(rescale, m_s - m_s_new, TEMP_POW) + tl.sum(
        _softmax1_numerator(es, s - m_s_new, TEMP_POW), 0
    )
    return m_s_new, z_s, z_1, rescale, es


@triton.jit
def _zero_gradient_row(g_row, V, BLOCK_V: tl.constexpr):
    # A row in no term: its gradient is 0.
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        tl.store(g_row + start + cols, 0.0, mask=start + cols < V)


@triton.jit
def _online_softmax_init(inv_temp, ACC: tl.constexpr):
    # 1 / T and log2(e) / T in ACC, and the running max and sums of _online_softmax_step before the first block.
    # tl.full casts the fp64 argument: .to would on a GPU, but the interpreter passes it as a Python float.
    inv_temp = tl.full([], inv_temp, ACC)
    return inv_temp, inv_temp * _LOG2E, tl.full([], float("-inf"), ACC), tl.zeros([], ACC), tl.zeros([], ACC)


@triton.jit
def _gradient_coefficients(counts_ptr, grad_scale_ptr, kl_weight, ce_weight, labelled, ACC: tl.constexpr):
    # P and the KL and MLM gradient weights times P, normalized by the counts read on the device.
    grad_scale = tl.load(grad_scale_ptr).to(ACC)
    kl_coef = tl.full([], kl_weight, ACC) / tl.maximum(tl.load(counts_ptr).to(ACC), 1.0) * grad_scale
    ce_coef = tl.full([], ce_weight, ACC) / tl.maximum(tl.load(counts_ptr + 1).to(ACC), 1.0) * grad_scale
    ce_coef = tl.where(labelled, ce_coef, 0.0)
    return grad_scale, kl_coef, ce_coef


@triton.jit
def _mlm_gradient(s, m_s, scale, rz1, ce_coef, offs, label, TEMP_POW: tl.constexpr):
    # The second sweep's start at logits s of columns offs: s - m_s, exp((s - m_s) / T) and the MLM gradient
    # ce_coef * (softmax(s) - onehot(label)), the one-hot applied before any rounding (softmax(s)[label] - 1
    # cancels badly if rounded first).
    s_c = s - m_s
    es = tl.exp2(s_c * scale)
    softmax1 = _softmax1_numerator(es, s_c, TEMP_POW) * rz1
    return s_c, es, ce_coef * (softmax1 - tl.where(offs == label, 1.0, 0.0))


@triton.jit
def _mlm_row_loss(s_row, label, labelled, z_1, m_s, ACC: tl.constexpr):
    # -log softmax(s)[label], 0 for a row without a target.
    s_label = tl.load(s_row + label, mask=labelled, other=0.0).to(ACC)
    return tl.where(labelled, tl.log(z_1) - (s_label - m_s), 0.0)


@triton.jit
def _triple_loss_logits_kernel(
    s_ptr,  # [N, V] student logits, row-major
    t_ptr,  # [N, V] teacher logits, row-major
    labels_ptr,  # [N] int64 MLM targets, -100 = not a target
    selected_ptr,  # [N] uint8, 1 = the row is in the KL term
    counts_ptr,  # [3] int64: n_selected, n_labelled, n_real
    grad_scale_ptr,  # [] ACC: P of kernels/gradient_scale.py, what the stored gradient is multiplied by
    grad_ptr,  # [N, V] out: P * d loss / d student logits, student dtype
    kl_rows_ptr,  # [N] ACC out: KL(softmax(t/T) || softmax(s/T)) of the row, not yet scaled by T^2
    ce_rows_ptr,  # [N] ACC out: -log softmax(s)[label]
    mse_rows_ptr,  # [N] ACC out: sum (s - t)^2 over the row
    V,
    inv_temp: tl.float64,  # 1 / T
    kl_weight: tl.float64,  # alpha_ce * T: d(alpha_ce * T^2 * KL)/ds = alpha_ce * T * (q - p)
    ce_weight: tl.float64,  # alpha_mlm
    mse_weight: tl.float64,  # 2 * alpha_mse: d(alpha_mse * sum (s - t)^2)/ds = 2 * alpha_mse * (s - t)
    ACC: tl.constexpr,  # compute dtype: fp32, fp64 for fp64 inputs
    TEMP_POW: tl.constexpr,  # T when it is 1 or 2, else 0
    MSE_GRAD: tl.constexpr,  # alpha_mse > 0: without it the second sweep never reads t for the MSE term
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * V overflows int32 once N * V > 2^31
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    g_row = grad_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    labelled = label != -100
    selected = tl.load(selected_ptr + row) != 0

    if not (selected or labelled):
        _zero_gradient_row(g_row, V, BLOCK_V)
        tl.store(kl_rows_ptr + row, 0.0)
        tl.store(ce_rows_ptr + row, 0.0)
        tl.store(mse_rows_ptr + row, 0.0)
        return

    # Sweep 1. Lanes past the end of the row load -inf, so their exponentials are 0. max(s/T) = max(s)/T, so
    # one running max m_s serves both student softmaxes, z_s = sum exp((s - m_s) / T) and z_1 = sum exp(s - m_s).
    # The teacher row is read only for rows in the KL term.
    inv_temp, scale, m_s, z_s, z_1 = _online_softmax_init(inv_temp, ACC)
    m_t = tl.full([], float("-inf"), ACC)
    z_t = tl.zeros([], ACC)  # sum exp((t - m_t) / T)
    sq = tl.zeros([], ACC)  # sum (s - t)^2
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        s = tl.load(s_row + offs, mask=in_row, other=float("-inf")).to(ACC)
        m_s, z_s, z_1, _, _ = _online_softmax_step(s, m_s, z_s, z_1, scale, TEMP_POW)
        if selected:
            t = tl.load(t_row + offs, mask=in_row, other=float("-inf")).to(ACC)
            m_t_new = tl.maximum(m_t, tl.max(t, 0))
            z_t = z_t * tl.exp2((m_t - m_t_new) * scale) + tl.sum(tl.exp2((t - m_t_new) * scale), 0)
            m_t = m_t_new
            d = tl.where(in_row, s, 0.0) - tl.where(in_row, t, 0.0)  # past the end both are -inf
            sq += tl.sum(d * d, 0)

    # z_t is 0 outside the KL term; 1 keeps its inverse and log finite there (both then go unused).
    z_t = tl.where(selected, z_t, 1.0)
    rzs = 1.0 / z_s
    rzt = 1.0 / z_t
    rz1 = 1.0 / z_1
    # log p - log q = ((t - m_t) - (s - m_s)) / T - log_ratio, with log_ratio subtracted per element rather
    # than after the sum: the summed terms are then as small as the gap between the distributions, which
    # keeps several times more digits of a small KL (below ~1e-6 a row, fp32 loses it anyway, as torch does).
    log_ratio = tl.log(z_t) - tl.log(z_s)
    grad_scale, kl_coef, ce_coef = _gradient_coefficients(counts_ptr, grad_scale_ptr, kl_weight, ce_weight,
                                                          labelled, ACC)
    mse_coef = tl.full([], mse_weight, ACC) / tl.maximum(tl.load(counts_ptr).to(ACC), 1.0) * grad_scale

    # Sweep 2: the gradient, rounded once to the student's dtype, and the KL. Lanes past the end load the row
    # max: finite, so no NaN is made and then masked away.
    kl_acc = tl.zeros([BLOCK_V], dtype=ACC)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        s = tl.load(s_row + offs, mask=in_row, other=m_s).to(ACC)
        s_c, es, g = _mlm_gradient(s, m_s, scale, rz1, ce_coef, offs, label, TEMP_POW)
        if selected:
            t = tl.load(t_row + offs, mask=in_row, other=m_t).to(ACC)
            t_c = t - m_t
            p = tl.exp2(t_c * scale) * rzt
            g += kl_coef * (es * rzs - p)
            if MSE_GRAD:
                g += mse_coef * (s - t)
            kl_acc += tl.where(in_row, p * ((t_c - s_c) * inv_temp - log_ratio), 0.0)
        tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)

    ce_row = _mlm_row_loss(s_row, label, labelled, z_1, m_s, ACC)
    tl.store(kl_rows_ptr + row, tl.sum(kl_acc, 0))
    tl.store(ce_rows_ptr + row, ce_row)
    tl.store(mse_rows_ptr + row, sq)


@triton.jit
def _triple_loss_cosine_kernel(
    hs_ptr,  # [N, D] student hidden states, row-major
    ht_ptr,  # [N, D] teacher hidden states, row-major
    real_ptr,  # [N] uint8, 1 = not padding
    counts_ptr,  # [3] int64: n_selected, n_labelled, n_real
    grad_ptr,  # [N, D] out: d loss / d student hidden, student dtype (fp32 for fp16)
    cos_rows_ptr,  # [N] ACC out: 1 - cos(h_s, h_t)
    D,
    cos_weight: tl.float64,  # alpha_cos
    ACC: tl.constexpr,  # compute dtype: fp32, fp64 for fp64 inputs
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    hs_row = hs_ptr + row * D
    ht_row = ht_ptr + row * D
    g_row = grad_ptr + row * D
    cols = tl.arange(0, BLOCK_D)

    if tl.load(real_ptr + row) == 0:
        for start in range(0, D, BLOCK_D):
            tl.store(g_row + start + cols, 0.0, mask=start + cols < D)
        tl.store(cos_rows_ptr + row, 0.0)
        return

    dot = tl.zeros([BLOCK_D], dtype=ACC)
    ss = tl.zeros([BLOCK_D], dtype=ACC)
    tt = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        offs = start + cols
        in_row = offs < D
        a = tl.load(hs_row + offs, mask=in_row, other=0.0).to(ACC)
        b = tl.load(ht_row + offs, mask=in_row, other=0.0).to(ACC)
        dot += a * b
        ss += a * a
        tt += b * b
    ss_eps = tl.sum(ss, 0) + _COS_EPS
    tt_eps = tl.sum(tt, 0) + _COS_EPS
    # sqrt(ss) * sqrt(tt) rather than sqrt(ss * tt): the product of two large squared norms overflows fp32.
    denom = tl.sqrt(ss_eps) * tl.sqrt(tt_eps)
    cos = tl.sum(dot, 0) / denom
    cos_coef = tl.full([], cos_weight, ACC) / tl.maximum(tl.load(counts_ptr + 2).to(ACC), 1.0)
    # d(1 - cos)/d h_s = cos * h_s / |h_s|^2 - h_t / (|h_s| |h_t|)
    ht_coef = -cos_coef / denom
    hs_coef = cos_coef * cos / ss_eps
    for start in range(0, D, BLOCK_D):
        offs = start + cols
        in_row = offs < D
        a = tl.load(hs_row + offs, mask=in_row, other=0.0).to(ACC)
        b = tl.load(ht_row + offs, mask=in_row, other=0.0).to(ACC)
        tl.store(g_row + offs, (a * hs_coef + b * ht_coef).to(grad_ptr.dtype.element_ty), mask=in_row)
    tl.store(cos_rows_ptr + row, 1.0 - cos)


def _num_warps(block: int) -> int:
    # 4 lanes of each [block] vector per thread: the logits kernel then needs about 60 registers at block
    # 4096 (no spills; checked with ptxas for sm70/80/90), so one 32-warp program fills an SM's register
    # file. Liger-Kernel's cross-entropy also runs 32 warps before Blackwell. Not timed: no GPU here yet.
    return max(1, min(32, block // 128))


def _launcher(kernel, traceable: bool):
    # While torch.compile traces the op, wrap_triton turns each launch into a graph node; in eager it would only
    # add a higher-order-op dispatch to every launch. Under TRITON_INTERPRET=1 it returns the kernel unchanged.
    return torch.library.wrap_triton(kernel) if traceable else kernel


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _flatten_logits(student_logits, teacher_logits, labels):
    vocab = student_logits.size(-1)
    n_rows = labels.numel()
    return (student_logits.reshape(n_rows, vocab).contiguous(), teacher_logits.reshape(n_rows, vocab).contiguous(),
            labels.reshape(n_rows).contiguous())


def _launch_logits(s, t, labels, selected, counts, grad_scale, temperature, alpha_ce, alpha_mlm, alpha_mse,
                   traceable):
    """The logits kernel on [N, V] rows: (kl_rows, ce_rows, mse_rows, grad), normalized by the counts given
    (global ones for a chunk of the fused linear loss) and the gradient times grad_scale."""
    n_rows, vocab = s.shape
    float64 = s.dtype == torch.float64
    partials = torch.empty((3, n_rows), dtype=torch.float64 if float64 else torch.float32, device=s.device)
    grad = torch.empty_like(s)
    block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK)
    with _device_guard(s.device):
        _launcher(_triple_loss_logits_kernel, traceable)[(n_rows,)](
            s, t, labels, selected, counts, grad_scale, grad, partials[0], partials[1], partials[2],
            vocab, 1.0 / temperature, alpha_ce * temperature, alpha_mlm, 2.0 * alpha_mse,
            ACC=tl.float64 if float64 else tl.float32, TEMP_POW=int(temperature) if temperature in (1.0, 2.0) else 0,
            MSE_GRAD=alpha_mse > 0, BLOCK_V=block_v, num_warps=_num_warps(block_v),
        )
    return partials[0], partials[1], partials[2], grad


def _row_flags(labels, attention_mask, restrict_ce_to_mask):
    """[3, N] uint8 (selected, labelled, real) flags of the flattened rows and their int64 [3] counts, which stay
    on the device."""
    real = attention_mask.reshape(labels.numel()) != 0
    labelled = labels != -100
    selected = labelled if restrict_ce_to_mask else real
    row_flags = torch.stack([selected, labelled, real]).view(torch.uint8)
    return row_flags, row_flags.sum(dim=1)


def _launch_cosine(student_hidden, teacher_hidden, real, counts, alpha_cos, traceable):
    """The cosine kernel on [..., D] hidden states: (cos_rows [N], grad_hidden [N, D])."""
    dim = student_hidden.size(-1)
    n_rows = real.numel()
    hs = student_hidden.reshape(n_rows, dim).contiguous()
    ht = teacher_hidden.reshape(n_rows, dim).contiguous()
    float64 = hs.dtype == torch.float64
    cos_rows = torch.empty(n_rows, dtype=torch.float64 if float64 else torch.float32, device=hs.device)
    grad_hidden = torch.empty_like(hs, dtype=hidden_grad_dtype(hs.dtype))
    block_d = min(triton.next_power_of_2(dim), _MAX_BLOCK)
    with _device_guard(hs.device):
        _launcher(_triple_loss_cosine_kernel, traceable)[(n_rows,)](
            hs, ht, real, counts, grad_hidden, cos_rows, dim, alpha_cos,
            ACC=tl.float64 if float64 else tl.float32, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return cos_rows, grad_hidden


def _forward_outputs(kl_rows, ce_rows, cos_rows, mse_rows, counts, temperature, alpha_ce, alpha_mlm, alpha_cos,
                     alpha_mse, grad_logits, grad_hidden, grad_scale, student_logits, student_hidden):
    """The op's eight outputs from the kernels' row partials and gradients."""
    # A term with no rows has a zero sum, so clamping its count to 1 gives 0 rather than NaN. The MSE term is
    # normalized by the KL's rows, as the original divides by the number of selected rows.
    sums = torch.stack([kl_rows, ce_rows, cos_rows, mse_rows]).sum(dim=1, dtype=torch.float64)
    terms = sums / torch.cat([counts, counts[:1]]).clamp_min(1)
    loss_ce = terms[0] * (temperature * temperature)
    loss_mlm = terms[1]
    loss_cos = terms[2]
    loss_mse = terms[3]
    loss = alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_cos * loss_cos + alpha_mse * loss_mse
    loss_dtype = kl_rows.dtype
    return (
        loss.to(loss_dtype),
        loss_ce.to(loss_dtype),
        loss_mlm.to(loss_dtype),
        loss_cos.to(loss_dtype),
        loss_mse.to(loss_dtype),
        grad_logits.view(student_logits.shape),
        grad_hidden.view(student_hidden.shape),
        grad_scale,
    )


def triple_loss_forward(
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
    restrict_ce_to_mask: bool,
    alpha_mse: float = 0.0,
    traceable: bool = False,
):
    """fastdistil::_triple_loss_forward on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

    Returns (loss, loss_ce, loss_mlm, loss_cos, loss_mse, grad_student_logits, grad_student_hidden,
    logits_grad_scale): five fp32 0-dim tensors (float64 for float64 inputs), the gradients of loss in the shapes
    of the student tensors (the logits one in their dtype times logits_grad_scale, the hidden one in
    hidden_grad_dtype), and that 0-dim scale.
    """
    s, t, flat_labels = _flatten_logits(student_logits, teacher_logits, labels)
    row_flags, counts = _row_flags(flat_labels, attention_mask, restrict_ce_to_mask)
    grad_scale = logits_grad_scale(counts, temperature, alpha_ce, alpha_mlm, s.dtype, alpha_mse, (s, t))
    kl_rows, ce_rows, mse_rows, grad_logits = _launch_logits(s, t, flat_labels, row_flags[0], counts, grad_scale,
                                                             temperature, alpha_ce, alpha_mlm, alpha_mse, traceable)
    cos_rows, grad_hidden = _launch_cosine(student_hidden, teacher_hidden, row_flags[2], counts, alpha_cos,
                                           traceable)
    return _forward_outputs(kl_rows, ce_rows, cos_rows, mse_rows, counts, temperature, alpha_ce, alpha_mlm,
                            alpha_cos, alpha_mse, grad_logits, grad_hidden, grad_scale, student_logits,
                            student_hidden)


def logits_loss_chunk(student_logits, teacher_logits, labels, selected, counts, temperature: float,
                      alpha_ce: float, alpha_mlm: float, alpha_mse: float):
    """The KL, MLM and MSE terms of a chunk of rows, normalized by counts of all the rows (the fused linear
    loss's chunks): (loss_ce, loss_mlm, loss_mse) as the chunk's shares of the global terms, the chunk's logits
    gradient times grad_scale, and grad_scale: the P of kernels/gradient_scale.py for the global counts and
    this chunk's logits (which bound its MSE gradient). selected: [N] bool, the chunk's rows in the KL term;
    counts: int64 [>= 2] global (selected, labelled) counts on the device. Nothing waits for the host."""
    s, t, flat_labels = _flatten_logits(student_logits, teacher_logits, labels)
    grad_scale = logits_grad_scale(counts, temperature, alpha_ce, alpha_mlm, s.dtype, alpha_mse, (s, t))
    kl_rows, ce_rows, mse_rows, grad = _launch_logits(
        s, t, flat_labels, selected.reshape(-1).contiguous().view(torch.uint8), counts, grad_scale, temperature,
        alpha_ce, alpha_mlm, alpha_mse, traceable=False)
    n_selected, n_labelled = counts[:2].clamp_min(1)
    loss_ce = kl_rows.sum(dtype=torch.float64) * (temperature * temperature) / n_selected
    loss_mlm = ce_rows.sum(dtype=torch.float64) / n_labelled
    loss_mse = mse_rows.sum(dtype=torch.float64) / n_selected
    return loss_ce.to(kl_rows.dtype), loss_mlm.to(kl_rows.dtype), loss_mse.to(kl_rows.dtype), grad, grad_scale


@triton.jit
def _scale_gradient_kernel(
    grad_ptr,  # [numel] contiguous gradient, scaled in place
    scale_ptr,  # [1] grad_output of the loss
    numel,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    scale = tl.load(scale_ptr).to(ACC)
    # grad_output is 1 in most training loops: then nothing is read or written.
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        grad = tl.load(grad_ptr + offsets, mask=mask).to(ACC)
        tl.store(grad_ptr + offsets, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def scale_gradient_(grad: torch.Tensor, scale: torch.Tensor, traceable: bool = False) -> None:
    """fastdistil::_scale_gradient_ on CUDA: grad *= scale in place, in fp32 with one rounding, read from the
    device so the host never waits."""
    if not grad.is_contiguous():
        raise ValueError("_scale_gradient_: grad must be contiguous")
    if scale.numel() != 1:
        raise ValueError(f"_scale_gradient_: scale must have one element, got shape {tuple(scale.shape)}")
    if grad.numel() == 0:
        return
    block = 4096
    with _device_guard(grad.device):
        _launcher(_scale_gradient_kernel, traceable)[(triton.cdiv(grad.numel(), block),)](
            grad, scale, grad.numel(), ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32, BLOCK=block,
        )


# What each kernel writes, by argument name: all a compiled graph may treat as mutated.
_KERNEL_OUTPUTS = {
    _triple_loss_logits_kernel: {"grad_ptr", "kl_rows_ptr", "ce_rows_ptr", "mse_rows_ptr"},
    _triple_loss_cosine_kernel: {"grad_ptr", "cos_rows_ptr"},
    _scale_gradient_kernel: {"grad_ptr"},
}


def _sample_launches():
    """(kernel, kwargs) as the launchers pass them, on small CPU tensors (the analysis only compiles to Triton
    IR), with a vocabulary and a hidden size that 16 divides and one it does not: Triton specializes integer
    arguments by divisibility, and some versions mishandle the attributes of specialized scalars."""
    for vocab, dim in ((30522, 768), (32000, 100)):
        rows = torch.empty(4)
        yield _triple_loss_logits_kernel, dict(
            s_ptr=torch.empty(4, vocab), t_ptr=torch.empty(4, vocab), labels_ptr=torch.empty(4, dtype=torch.int64),
            selected_ptr=torch.empty(4, dtype=torch.uint8), counts_ptr=torch.empty(3, dtype=torch.int64),
            grad_scale_ptr=torch.empty(()), grad_ptr=torch.empty(4, vocab), kl_rows_ptr=rows, ce_rows_ptr=rows.clone(),
            mse_rows_ptr=rows.clone(), V=vocab, inv_temp=0.5, kl_weight=10.0, ce_weight=2.0, mse_weight=0.0,
            ACC=tl.float32, TEMP_POW=2, MSE_GRAD=False, BLOCK_V=_MAX_BLOCK)
        yield _triple_loss_cosine_kernel, dict(
            hs_ptr=torch.empty(4, dim), ht_ptr=torch.empty(4, dim), real_ptr=torch.empty(4, dtype=torch.uint8),
            counts_ptr=torch.empty(3, dtype=torch.int64), grad_ptr=torch.empty(4, dim), cos_rows_ptr=rows.clone(),
            D=dim, cos_weight=1.0, ACC=tl.float32, BLOCK_D=triton.next_power_of_2(dim))
        yield _scale_gradient_kernel, dict(grad_ptr=torch.empty(4, vocab), scale_ptr=torch.empty(()),
                                           numel=4 * vocab, ACC=tl.float32, BLOCK=4096)


def _written_tensors(kernel, kwargs) -> set[str]:
    """The tensor arguments torch's analysis of a user-defined Triton kernel finds it writes (the function
    moved between torch versions; an unknown torch raises NotImplementedError)."""
    from torch._higher_order_ops import triton_kernel_wrap

    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):  # torch >= 2.12
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, kwargs, {})
        return {dep.name for dep in accesses.read_writes.writes if isinstance(kwargs.get(dep.name), torch.Tensor)}
    if hasattr(triton_kernel_wrap, "identify_mutated_tensors"):  # a third argument, TMA metadata, since ~2.7
        identify = triton_kernel_wrap.identify_mutated_tensors
        extra = ({},) if len(inspect.signature(identify).parameters) > 2 else ()
        return set(identify(kernel, kwargs, *extra))
    raise NotImplementedError(f"torch {torch.__version__} has neither identify_accessed_tensors nor "
                              "identify_mutated_tensors")


def kernel_analysis_error(launches, outputs) -> str | None:
    """Why torch's analysis of the kernels in launches ((kernel, kwargs) pairs) cannot be trusted, or None when
    it finds each writing exactly its outputs (outputs[kernel]: argument names)."""
    for kernel, kwargs in launches:
        try:
            written = _written_tensors(kernel, kwargs)
        except Exception as exc:  # any failure of a private torch API means: do not trust it
            return f"torch's kernel analysis failed on {kernel.fn.__name__} ({type(exc).__name__}: {exc})"
        if written != outputs[kernel]:
            return (f"torch's kernel analysis finds {kernel.fn.__name__} writing {sorted(written)}, not just "
                    f"{sorted(outputs[kernel])} (pytorch#170049)")
    return None


@functools.cache
def traced_compile_unsupported() -> str | None:
    """Why torch.compile must keep the loss op opaque on this torch and Triton, or None if it may trace the
    Triton kernels into its graph.

    torch finds what a user-defined kernel writes by compiling it to Triton IR. When that fails, as with Triton
    3.6's runtime scalars (pytorch#170049), it assumes the kernel writes every input; depending on the version,
    Inductor then clones every input or removes the kernel as dead code (pytorch#170808), which silently skips
    the loss. So the analysis is run once, on the kernels as the launchers call them, and must find exactly
    their outputs."""
    return kernel_analysis_error(_sample_launches(), _KERNEL_OUTPUTS)
