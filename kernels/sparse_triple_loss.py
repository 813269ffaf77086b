"""Triton implementation of fastdistil::_sparse_triple_loss_forward: the triple loss against a cached top-k
teacher, the CUDA kernel of fastdistil/ops/sparse_triple_loss.py.

Same contract as the C++ CPU kernel (csrc/sparse_triple_loss_cpu.cpp) and the same math as
fastdistil/ops/reference.py's sparse_triple_loss_reference: the teacher of a row is its k top logits t_k, their
indices I and logsumexp(t / T) over all V, so q_k = exp(t_k / T - logsumexp(t / T)) is exact, and its remaining
mass r = 1 - sum q_k is either one more class matched against the student's tail mass S = sum_{v not in I} p_v
(tail="bucket") or dropped, the top-k renormalized (tail="renormalize").

One program per logit row, as in kernels/triple_loss.py, whose cosine kernel, row counts and output assembly
this module reuses. The first sweep over the student row keeps the online-softmax statistics of s/T and s and,
for the bucket, the student's tail sum: entries off the top-k, found in a per-row bitmask of I (built by torch
before the launch), summed with the same running max. S is a sum over the tail itself, never 1 - sum_k p_k,
which cancels to nothing when the student's mass sits in the top-k. Two short loops over the k entries then sum
Q = sum q_k and, with the coefficients it fixes, the top-k part of the KL and the gradient at I; the second sweep
writes the gradient everywhere else (the bitmask keeps the two from writing one entry twice). Nothing waits for
the host; computation is in fp32, in fp64 for fp64 inputs (gradient checks).
"""

import functools

import torch
import triton
import triton.language as tl

from fastdistil.kernels import triple_loss
from fastdistil.kernels.gradient_scale import logits_grad_scale
from fastdistil.kernels.triple_loss import (_LOG2E, _device_guard, _forward_outputs, _gradient_coefficients,
                                            _launch_cosine, _launcher, _mlm_gradient, _mlm_row_loss, _num_warps,
                                            _online_softmax_init, _online_softmax_step, _row_flags,
                                            _zero_gradient_row)

TAILS = ("bucket", "renormalize")
_TAIL_FLOOR = tl.constexpr(2.0**-126)  # fastdistil/ops/reference.py's TAIL_FLOOR: fp32's smallest normal
_BITS = 32  # top-k indices per bitmask word


@triton.jit
def _topk_bit(bits_row, offs, in_row):
    # 1 where offs is one of the row's top-k indices: bit v % 32 of word v // 32 (32 lanes read one word).
    words = tl.load(bits_row + offs // 32, mask=in_row, other=0)
    return (words >> (offs % 32)) & 1


@triton.jit
def _sparse_triple_loss_logits_kernel(
    s_ptr,  # [N, V] student logits, row-major
    topk_ptr,  # [N, K] teacher raw logits (T = 1) at its top-k entries, row-major
    idx_ptr,  # [N, K] int16/int32/int64 their indices in [0, V), distinct within a row
    lse_ptr,  # [N, 2] ACC teacher logsumexp over all V: [:, 0] at T = 1 (unused here), [:, 1] at T
    bits_ptr,  # [N, W] int32 bitmask of each row's indices, W = ceil(V / 32)
    labels_ptr,  # [N] int64 MLM targets, -100 = not a target
    selected_ptr,  # [N] uint8, 1 = the row is in the KL term
    counts_ptr,  # [3] int64: n_selected, n_labelled, n_real
    grad_scale_ptr,  # [] ACC: P of kernels/gradient_scale.py, what the stored gradient is multiplied by
    grad_ptr,  # [N, V] out: P * d loss / d student logits, student dtype
    kl_rows_ptr,  # [N] ACC out: the sparse KL of the row, not yet scaled by T^2
    ce_rows_ptr,  # [N] ACC out: -log softmax(s)[label]
    V,
    K,
    W,
    inv_temp: tl.float64,  # 1 / T
    kl_weight: tl.float64,  # alpha_ce * T: d(alpha_ce * T^2 * KL)/ds = alpha_ce * T * dKL/dz
    ce_weight: tl.float64,  # alpha_mlm
    ACC: tl.constexpr,  # compute dtype: fp32, fp64 for fp64 inputs
    TEMP_POW: tl.constexpr,  # T when it is 1 or 2, else 0
    BUCKET: tl.constexpr,  # tail="bucket" and K < V: the row has a tail term (with K = V there is no tail)
    RENORMALIZE: tl.constexpr,  # tail="renormalize"
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * V overflows int32 once N * V > 2^31
    s_row = s_ptr + row * V
    g_row = grad_ptr + row * V
    bits_row = bits_ptr + row * W
    topk_row = topk_ptr + row * K
    idx_row = idx_ptr + row * K
    cols = tl.arange(0, BLOCK_V)
    kcols = tl.arange(0, BLOCK_K)
    label = tl.load(labels_ptr + row)
    labelled = label != -100
    selected = tl.load(selected_ptr + row) != 0

    if not (selected or labelled):
        _zero_gradient_row(g_row, V, BLOCK_V)
        tl.store(kl_rows_ptr + row, 0.0)
        tl.store(ce_rows_ptr + row, 0.0)
        return

    # Sweep 1: the online kernel's student statistics (max m_s, z_s = sum exp((s - m_s) / T), z_1 = sum
    # exp(s - m_s)) and, for rows with a tail term, the student's tail sum, rescaled with the same running max.
    inv_temp, scale, m_s, z_s, z_1 = _online_softmax_init(inv_temp, ACC)
    z_tail = tl.zeros([], ACC)  # sum exp((s - m_s) / T) over the entries off the top-k
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        s = tl.load(s_row + offs, mask=in_row, other=float("-inf")).to(ACC)
        m_s, z_s, z_1, rescale, es = _online_softmax_step(s, m_s, z_s, z_1, scale, TEMP_POW)
        if BUCKET:
            if selected:
                z_tail = z_tail * rescale + tl.sum(tl.where(_topk_bit(bits_row, offs, in_row) == 0, es, 0.0), 0)

    rzs = 1.0 / z_s
    rz1 = 1.0 / z_1
    grad_scale, kl_coef, ce_coef = _gradient_coefficients(counts_ptr, grad_scale_ptr, kl_weight, ce_weight,
                                                          labelled, ACC)

    # dKL/dz_j = a p_j - c q_j on the top-k and (a - u r / S) p_j off it, with a = c Q + u r (SPEC's names);
    # off_coef is that a - u r / S, the factor of p_j the second sweep writes.
    off_coef = tl.zeros([], ACC)
    kl = tl.zeros([], ACC)
    if selected:
        lse_t = tl.load(lse_ptr + 2 * row + 1).to(ACC)
        q_sum = tl.zeros([BLOCK_K], dtype=ACC)
        for start in range(0, K, BLOCK_K):
            ko = start + kcols
            t = tl.load(topk_row + ko, mask=ko < K, other=float("-inf")).to(ACC)
            q_sum += tl.exp2((t * inv_temp - lse_t) * _LOG2E)
        mass = tl.sum(q_sum, 0)  # Q
        if RENORMALIZE:
            c = 1.0 / mass
        else:
            c = tl.full([], 1.0, ACC)
        if BUCKET:
            r = tl.maximum(1.0 - mass, 0.0)
            tail = z_tail * rzs  # S
            u = tl.where(tail >= _TAIL_FLOOR, 1.0, 0.0)
            tail_bar = tl.maximum(tail, _TAIL_FLOOR)
            a = c * mass + u * r
            off_coef = a - u * r / tail_bar
            kl = tl.where(r > 0.0, r * (tl.log(tl.maximum(r, _TAIL_FLOOR)) - tl.log(tail_bar)), 0.0)
        else:
            a = c * mass
            off_coef = a
        # log(c q_k) - log p_k = (t_k - s_k) / T - log_ratio, the difference taken before the constant, as the
        # online kernel does, so that a small KL keeps its digits.
        log_ratio = lse_t - tl.log(c) - m_s * inv_temp - tl.log(z_s)
        kl_acc = tl.zeros([BLOCK_K], dtype=ACC)
        for start in range(0, K, BLOCK_K):
            ko = start + kcols
            in_k = ko < K
            t = tl.load(topk_row + ko, mask=in_k, other=0.0).to(ACC)
            j = tl.load(idx_row + ko, mask=in_k, other=0).to(tl.int32)
            s = tl.load(s_row + j, mask=in_k, other=0.0).to(ACC)
            _, es, g = _mlm_gradient(s, m_s, scale, rz1, ce_coef, j, label, TEMP_POW)
            cq = c * tl.exp2((t * inv_temp - lse_t) * _LOG2E)
            g += kl_coef * (a * es * rzs - cq)
            tl.store(g_row + j, g.to(grad_ptr.dtype.element_ty), mask=in_k)
            kl_acc += tl.where(in_k, cq * ((t - s) * inv_temp - log_ratio), 0.0)
        kl += tl.sum(kl_acc, 0)
    off_coef = kl_coef * off_coef

    # Sweep 2: the gradient off the top-k (every entry, for rows outside the KL term), rounded once to the
    # student's dtype. Lanes past the end load the row max: finite.
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_row = offs < V
        s = tl.load(s_row + offs, mask=in_row, other=m_s).to(ACC)
        _, es, g = _mlm_gradient(s, m_s, scale, rz1, ce_coef, offs, label, TEMP_POW)
        write = in_row
        if selected:
            # The tail entries only: elsewhere (the top-k, lanes past the end) u r p / S is not bounded by r and
            # may overflow the student's dtype, masked or not.
            write = in_row & (_topk_bit(bits_row, offs, in_row) == 0)
            g += tl.where(write, off_coef * (es * rzs), 0.0)
        tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=write)

    tl.store(kl_rows_ptr + row, kl)
    tl.store(ce_rows_ptr + row, _mlm_row_loss(s_row, label, labelled, z_1, m_s, ACC))


def _topk_bitmask(indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, ceil(V / 32)] int32 words, bit v % 32 of word v // 32 set for each v of the row's [N, k] indices.

    The indices are distinct within a row, so the bits a word receives are distinct and their sum is their OR:
    an integer scatter-add with no overflow (bit 31 is -2^31 and every partial sum of distinct bits fits
    int32). It scatters into the flattened words: a 1-D scatter_add_ is the one CUDA lists as deterministic, so
    the op also runs under torch.use_deterministic_algorithms(True)."""
    idx = indices.long()
    bit = idx % _BITS
    values = torch.where(bit == _BITS - 1, -(2**31), torch.ones_like(bit) << bit).to(torch.int32)
    n_words = triton.cdiv(vocab, _BITS)
    words = torch.zeros(idx.size(0) * n_words, dtype=torch.int32, device=idx.device)
    flat = idx // _BITS + torch.arange(idx.size(0), device=idx.device).unsqueeze(1) * n_words
    return words.scatter_add_(0, flat.reshape(-1), values.reshape(-1)).view(idx.size(0), n_words)


def _launch_logits(s, topk, idx, lse, labels, selected, counts, grad_scale, temperature, alpha_ce, alpha_mlm,
                   tail, traceable):
    """The logits kernel on [N, V] rows: (kl_rows, ce_rows, grad)."""
    n_rows, vocab = s.shape
    k = topk.size(1)
    float64 = s.dtype == torch.float64
    partials = torch.empty((2, n_rows), dtype=torch.float64 if float64 else torch.float32, device=s.device)
    grad = torch.empty_like(s)
    bits = _topk_bitmask(idx, vocab)
    block_v = min(triton.next_power_of_2(vocab), triple_loss._MAX_BLOCK)
    block_k = min(triton.next_power_of_2(k), triple_loss._MAX_BLOCK)
    with _device_guard(s.device):
        _launcher(_sparse_triple_loss_logits_kernel, traceable)[(n_rows,)](
            s, topk, idx, lse, bits, labels, selected, counts, grad_scale, grad, partials[0], partials[1],
            vocab, k, bits.size(1), 1.0 / temperature, alpha_ce * temperature, alpha_mlm,
            ACC=tl.float64 if float64 else tl.float32, TEMP_POW=int(temperature) if temperature in (1.0, 2.0) else 0,
            BUCKET=tail == "bucket" and k < vocab, RENORMALIZE=tail == "renormalize", BLOCK_V=block_v,
            BLOCK_K=block_k, num_warps=_num_warps(block_v),
        )
    return partials[0], partials[1], grad


def sparse_triple_loss_forward(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    alpha_ce: float,
    alpha_mlm: float,
    alpha_cos: float,
    restrict_ce_to_mask: bool,
    tail: str,
    traceable: bool = False,
):
    """fastdistil::_sparse_triple_loss_forward on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), inputs
    as fastdistil/ops/checks.py's sparse_triple_loss passes them.

    Returns (loss, loss_ce, loss_mlm, loss_cos, loss_mse, grad_student_logits, grad_student_hidden,
    logits_grad_scale) as kernels/triple_loss.py's triple_loss_forward does, loss_mse 0.
    """
    if tail not in TAILS:
        raise ValueError(f"sparse_triple_loss: tail must be one of {TAILS}, got {tail!r}")
    vocab, k = student_logits.size(-1), teacher_topk_logits.size(-1)
    n_rows = labels.numel()
    s = student_logits.reshape(n_rows, vocab).contiguous()
    topk = teacher_topk_logits.reshape(n_rows, k).contiguous()
    idx = teacher_topk_indices.reshape(n_rows, k).contiguous()
    lse = teacher_logsumexp.reshape(n_rows, 2).contiguous()
    flat_labels = labels.reshape(n_rows).contiguous()
    row_flags, counts = _row_flags(flat_labels, attention_mask, restrict_ce_to_mask)
    # The online bound holds: |dKL/dz_j| <= 1 here too (a p_j, c q_j and u r p_j / S all lie in [0, 1]).
    grad_scale = logits_grad_scale(counts, temperature, alpha_ce, alpha_mlm, s.dtype)
    kl_rows, ce_rows, grad_logits = _launch_logits(s, topk, idx, lse, flat_labels, row_flags[0], counts, grad_scale,
                                                   temperature, alpha_ce, alpha_mlm, tail, traceable)
    cos_rows, grad_hidden = _launch_cosine(student_hidden, teacher_hidden, row_flags[2], counts, alpha_cos,
                                           traceable)
    return _forward_outputs(kl_rows, ce_rows, cos_rows, torch.zeros_like(kl_rows), counts, temperature, alpha_ce,
                            alpha_mlm, alpha_cos, 0.0, grad_logits, grad_hidden, grad_scale, student_logits,
                            student_hidden)


def sparse_logits_loss_chunk(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels,
                             selected, counts, temperature: float, alpha_ce: float, alpha_mlm: float, tail: str):
    """kernels/triple_loss.py's logits_loss_chunk against a top-k teacher (the fused linear sparse loss's
    chunks): (loss_ce, loss_mlm, loss_mse = 0) as the chunk's shares of the global terms, its logits gradient
    times grad_scale, and grad_scale, normalized by the global counts on the device. Nothing waits for the
    host."""
    vocab, k = student_logits.size(-1), teacher_topk_logits.size(-1)
    s = student_logits.reshape(-1, vocab).contiguous()
    grad_scale = logits_grad_scale(counts, temperature, alpha_ce, alpha_mlm, s.dtype)
    kl_rows, ce_rows, grad = _launch_logits(
        s, teacher_topk_logits.reshape(-1, k).contiguous(), teacher_topk_indices.reshape(-1, k).contiguous(),
        teacher_logsumexp.reshape(-1, 2).contiguous(), labels.reshape(-1).contiguous(),
        selected.reshape(-1).contiguous().view(torch.uint8), counts, grad_scale, temperature, alpha_ce, alpha_mlm,
        tail, traceable=False)
    n_selected, n_labelled = counts[:2].clamp_min(1)
    loss_ce = kl_rows.sum(dtype=torch.float64) * (temperature * temperature) / n_selected
    loss_mlm = ce_rows.sum(dtype=torch.float64) / n_labelled
    no_mse = torch.zeros((), dtype=kl_rows.dtype, device=s.device)
    return loss_ce.to(kl_rows.dtype), loss_mlm.to(kl_rows.dtype), no_mse, grad, grad_scale


# What the kernel writes, by argument name: all a compiled graph may treat as mutated.
_KERNEL_OUTPUTS = {_sparse_triple_loss_logits_kernel: {"grad_ptr", "kl_rows_ptr", "ce_rows_ptr"}}


def _sample_launches():
    """(kernel, kwargs) as the launcher passes them, on small CPU tensors, with a V and k that 16 divides and
    ones it does not (see kernels/triple_loss.py's _sample_launches)."""
    for vocab, k in ((30522, 128), (32000, 5)):
        rows = torch.empty(4)
        yield _sparse_triple_loss_logits_kernel, dict(
            s_ptr=torch.empty(4, vocab), topk_ptr=torch.empty(4, k), idx_ptr=torch.empty(4, k, dtype=torch.int16),
            lse_ptr=torch.empty(4, 2), bits_ptr=torch.empty(4, triton.cdiv(vocab, _BITS), dtype=torch.int32),
            labels_ptr=torch.empty(4, dtype=torch.int64), selected_ptr=torch.empty(4, dtype=torch.uint8),
            counts_ptr=torch.empty(3, dtype=torch.int64), grad_scale_ptr=torch.empty(()),
            grad_ptr=torch.empty(4, vocab), kl_rows_ptr=rows, ce_rows_ptr=rows.clone(), V=vocab, K=k,
            W=triton.cdiv(vocab, _BITS), inv_temp=0.5, kl_weight=10.0, ce_weight=2.0, ACC=tl.float32, TEMP_POW=2,
            BUCKET=True, RENORMALIZE=False, BLOCK_V=triple_loss._MAX_BLOCK, BLOCK_K=triton.next_power_of_2(k))


@functools.cache
def traced_compile_unsupported() -> str | None:
    """kernels/triple_loss.py's traced_compile_unsupported for this op: the shared cosine kernel and the
    backward's scaling kernel, and this module's logits kernel."""
    return triple_loss.traced_compile_unsupported() or triple_loss.kernel_analysis_error(_sample_launches(),
                                                                                         _KERNEL_OUTPUTS)
