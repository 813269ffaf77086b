"""Triton implementation of fastdistil::_attention_forward / _attention_backward: attention for the student,
bidirectional (DistilBERT, RoBERTa) or causal (GPT-2), with a key padding mask and attention dropout,
FlashAttention-2 style.

Forward: one program per (batch x head, query block); it keeps its query tile and streams the key/value blocks
with an online softmax (running max and sum, base 2), so no [L, L] matrix exists, and stores the row's
logsumexp. Backward: a preprocess kernel computes delta = rowsum(dO * O); then one program per (batch x head,
block) recomputes the probabilities from the saved logsumexp, first accumulating dK and dV of its key block over
every query block, then dQ of its query block over every key block, so no two programs write the same memory
and no atomics are needed. Unlike the Triton tutorial's backward, nothing assumes L a multiple of the block:
keys that are padding or past L are masked in every tile.

Causal (IS_CAUSAL): query i attends to the keys j <= i. The loops' bounds skip every tile entirely above the
diagonal, so a causal launch does about half the work: the forward of query block m and the dQ loop of block m
end with the key block that holds the block's last query; the dK/dV loop of key block n starts with the query
block that holds the block's first key. Each tile visited is masked by j <= i, which only the tiles the diagonal
crosses fail anywhere. Testing it in every tile keeps one loop per phase: splitting a loop into below-diagonal
and diagonal parts would add a loop whose prefetch buffers the compiler need not share with the first one's (for
sm100 it does not), which the shared-memory estimates below would have to count twice; the test is two integer
operations per score, beside the exp2 and the two dots. The estimates and the compiled sizes are the same for
both variants.

Dropout keeps a probability with chance 1 - p, decided by Philox (tl.rand) keyed by a seed read from the
device and countered by the element's index in [B, H, L, L]: the backward regenerates exactly the forward's
mask, which is never stored, and a causal launch drops what a bidirectional one would. A query row without a
real key (a sequence that is all padding) gets output 0, logsumexp +inf (so that exp(s - lse) = 0 in the
backward) and zero gradients; so does a causal query row whose keys up to itself are all padding (left padding).

Products are accumulated in fp32; the probabilities and dS are rounded to the input dtype before their
matmuls, as FlashAttention does, so that fp16/bf16 tiles run on tensor cores.

Each launch picks its block sizes and pipeline depth (num_stages) so that an upper-bound estimate of the kernel's
shared memory fits the device's per-block limit. At Triton's default depth of 3 the fp32 forward at head dim 128
takes 180608 bytes, more than an A100's 163 KB, the fp32 backward at head dim 64 more than the 99 KB of sm86/
sm89/sm120, and the 16-bit forward at head dim 128 takes 90112 of those 99 KB. compiled_shared_memory compiles a
kernel offline for a CUDA target and reports what the compiler allocates; the tests hold the estimates to it.
"""

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastdistil.kernels.layout import empty_bhld

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _scores(q, k, offs_m, offs_n, mask_row, L, qk_scale, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
            PRECISION: tl.constexpr):
    # [BLOCK_M, BLOCK_N] scores in base 2 (times log2 e), -inf where the key is padding, past L or (causal) after
    # the query
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    valid = offs_n < L
    if HAS_MASK:
        valid &= tl.load(mask_row + offs_n, mask=offs_n < L, other=0) != 0
    if IS_CAUSAL:
        return tl.where(valid[None, :] & (offs_n[None, :] <= offs_m[:, None]), s, float("-inf"))
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _causal_key_end(start_m, L, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # One past the last key that the queries [start_m, start_m + BLOCK_M) attend to: causal, one past the block's
    # last query, so that a loop over the key blocks up to it skips the tiles above the diagonal; else L.
    if IS_CAUSAL:
        return tl.minimum(start_m + BLOCK_M, L)
    return L


@triton.jit
def _causal_query_start(start_n, IS_CAUSAL: tl.constexpr):
    # The first query that attends to one of the keys [start_n, ...): causal, the block's first key; else 0.
    if IS_CAUSAL:
        return start_n
    return 0


@triton.jit
def _dropout_scale(seed, bh, offs_m, offs_n, L, dropout_p):
    # [BLOCK_M, BLOCK_N] 1 / (1 - p) where kept, 0 where dropped. bh is int64: the counter passes 2^31 at
    # B * H * L^2 > 2^31 (e.g. 32 x 12 x 2400^2).
    counter = (bh * L + offs_m[:, None]) * L + offs_n[None, :]
    return tl.where(tl.rand(seed, counter) >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _load_rows(ptr, offs, stride, L, HEAD_DIM: tl.constexpr):
    # [len(offs), HEAD_DIM] rows of one head, 0 past L
    cols = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + offs[:, None] * stride + cols[None, :], mask=offs[:, None] < L, other=0.0)


@triton.jit
def _store_rows(ptr, offs, stride, L, value, HEAD_DIM: tl.constexpr):
    cols = tl.arange(0, HEAD_DIM)
    tl.store(ptr + offs[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=offs[:, None] < L)


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, L, HEAD_DIM], last dim contiguous
    mask_ptr,  # [B, L] uint8, 1 = real key (read only with HAS_MASK)
    seed_ptr,  # [1] int64 Philox seed (read only with DROPOUT)
    o_ptr,  # [B, H, L, HEAD_DIM] out, input dtype
    lse_ptr,  # [B, H, L] fp32 out: natural logsumexp of the row's scaled scores over real keys, +inf if none
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    H, L,
    qk_scale,  # scale * log2(e)
    dropout_p,
    HAS_MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,  # query i attends to keys j <= i
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: tf32 would lose fp32's precision
):
    bh = tl.program_id(0).to(tl.int64)  # b * stride_b overflows int32 once a tensor passes 2^31 elements
    b = bh // H
    h = bh % H
    start_m = tl.program_id(1) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_head = k_ptr + b * stride_kb + h * stride_kh
    v_head = v_ptr + b * stride_vb + h * stride_vh
    mask_row = mask_ptr + b * L
    seed = tl.load(seed_ptr) if DROPOUT else 0
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, stride_ql, L, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, _causal_key_end(start_m, L, BLOCK_M, IS_CAUSAL), BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_head, offs_n, stride_kl, L, HEAD_DIM)
        v = _load_rows(v_head, offs_n, stride_vl, L, HEAD_DIM)
        s = _scores(q, k, offs_m, offs_n, mask_row, L, qk_scale, HAS_MASK, IS_CAUSAL, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only masked keys its max is -inf, and s - max would be -inf - -inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normalizer counts dropped entries too
        if DROPOUT:
            p = p * _dropout_scale(seed, bh, offs_m, offs_n, L, dropout_p)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    _store_rows(o_ptr + b * stride_ob + h * stride_oh, offs_m, stride_ol, L, acc / l_safe[:, None], HEAD_DIM)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) / _LOG2E)
    tl.store(lse_ptr + bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _attention_delta_kernel(
    o_ptr,  # [B, H, L, HEAD_DIM] forward output, last dim contiguous
    do_ptr,  # [B, H, L, HEAD_DIM] gradient of the output, last dim contiguous
    delta_ptr,  # [B, H, L] fp32 out: rowsum(dO * O)
    stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    H, L,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(o_ptr + b * stride_ob + h * stride_oh, offs_m, stride_ol, L, HEAD_DIM).to(tl.float32)
    do = _load_rows(do_ptr + b * stride_db + h * stride_dh, offs_m, stride_dl, L, HEAD_DIM).to(tl.float32)
    tl.store(delta_ptr + bh * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _tile_gradients(q, k, v, do, lse2, delta, offs_m, offs_n, bh, mask_row, seed, L, qk_scale, dropout_p,
                    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                    PRECISION: tl.constexpr):
    # The [BLOCK_M, BLOCK_N] tile's dropped-out probabilities P~ (dV = P~^T dO) and dS = P * (dP~ - delta),
    # with dP~ = dO V^T times the dropout scale; dQ = scale * dS K and dK = scale * dS^T Q.
    p = tl.exp2(_scores(q, k, offs_m, offs_n, mask_row, L, qk_scale, HAS_MASK, IS_CAUSAL, PRECISION)
                - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        z = _dropout_scale(seed, bh, offs_m, offs_n, L, dropout_p)
        p_dropped = p * z
        dp = dp * z
    else:
        p_dropped = p
    return p_dropped, p * (dp - delta[:, None])


@triton.jit
def _attention_backward_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, L, HEAD_DIM], last dim contiguous
    do_ptr,  # [B, H, L, HEAD_DIM] gradient of the output, last dim contiguous
    mask_ptr,  # [B, L] uint8, 1 = real key (read only with HAS_MASK)
    seed_ptr,  # [1] int64 Philox seed of the forward (read only with DROPOUT)
    lse_ptr,  # [B, H, L] fp32 logsumexp saved by the forward
    delta_ptr,  # [B, H, L] fp32 rowsum(dO * O)
    dq_ptr, dk_ptr, dv_ptr,  # [B, H, L, HEAD_DIM] out, one layout shared by the three (stride_g*)
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    stride_gb, stride_gh, stride_gl,
    H, L,
    scale,
    dropout_p,
    HAS_MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,  # query i attends to keys j <= i
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,  # both the key block of dK/dV and the query block of dQ: one grid serves both
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    q_head = q_ptr + b * stride_qb + h * stride_qh
    k_head = k_ptr + b * stride_kb + h * stride_kh
    v_head = v_ptr + b * stride_vb + h * stride_vh
    do_head = do_ptr + b * stride_db + h * stride_dh
    g_head = b * stride_gb + h * stride_gh
    mask_row = mask_ptr + b * L
    seed = tl.load(seed_ptr) if DROPOUT else 0
    qk_scale = scale * _LOG2E
    start = tl.program_id(1) * BLOCK
    block = start + tl.arange(0, BLOCK)
    offs0 = tl.arange(0, BLOCK)

    # dK and dV of the keys in `block`, over every query block that attends to them (causal: from the diagonal
    # on). Past-the-end queries load lse = +inf, so P = 0.
    k = _load_rows(k_head, block, stride_kl, L, HEAD_DIM)
    v = _load_rows(v_head, block, stride_vl, L, HEAD_DIM)
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for start_m in range(_causal_query_start(start, IS_CAUSAL), L, BLOCK):
        offs_m = start_m + offs0
        q = _load_rows(q_head, offs_m, stride_ql, L, HEAD_DIM)
        do = _load_rows(do_head, offs_m, stride_dl, L, HEAD_DIM)
        lse2 = tl.load(lse_ptr + bh * L + offs_m, mask=offs_m < L, other=float("inf")) * _LOG2E
        delta = tl.load(delta_ptr + bh * L + offs_m, mask=offs_m < L, other=0.0)
        p_dropped, ds = _tile_gradients(q, k, v, do, lse2, delta, offs_m, block, bh, mask_row, seed, L, qk_scale,
                                        dropout_p, HAS_MASK, IS_CAUSAL, DROPOUT, PRECISION)
        dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_rows(dk_ptr + g_head, block, stride_gl, L, dk * scale, HEAD_DIM)
    _store_rows(dv_ptr + g_head, block, stride_gl, L, dv, HEAD_DIM)

    # dQ of the queries in `block`, over every key block they attend to (causal: up to the diagonal).
    q = _load_rows(q_head, block, stride_ql, L, HEAD_DIM)
    do = _load_rows(do_head, block, stride_dl, L, HEAD_DIM)
    lse2 = tl.load(lse_ptr + bh * L + block, mask=block < L, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + bh * L + block, mask=block < L, other=0.0)
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for start_n in range(0, _causal_key_end(start, L, BLOCK, IS_CAUSAL), BLOCK):
        offs_n = start_n + offs0
        k = _load_rows(k_head, offs_n, stride_kl, L, HEAD_DIM)
        v = _load_rows(v_head, offs_n, stride_vl, L, HEAD_DIM)
        _, ds = _tile_gradients(q, k, v, do, lse2, delta, block, offs_n, bh, mask_row, seed, L, qk_scale,
                                dropout_p, HAS_MASK, IS_CAUSAL, DROPOUT, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(dq_ptr + g_head, block, stride_gl, L, dq * scale, HEAD_DIM)


# Launch configuration ---------------------------------------------------------------------------------------

# The shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin: the SM's shared memory less
# the 1 KB CUDA reserves per block), by compute capability, as NVIDIA's CUDA programming guide and CCCL's
# cuda/__device/arch_traits.h give it. Launches read the device's own figure; this table is for the tests and docs.
SHARED_MEMORY_LIMITS = {
    (8, 0): 166912,  # A100 (163 KB)
    (8, 6): 101376,  # RTX 30xx, A10, A40 (99 KB)
    (8, 9): 101376,  # RTX 40xx, L4, L40 (99 KB)
    (9, 0): 232448,  # H100, H200 (227 KB)
    (10, 0): 232448,  # B200 (227 KB)
    (12, 0): 101376,  # RTX 50xx (99 KB)
}
# CUDA's limits on a launch grid's axes: the number of programs along x, y and z.
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
_NUM_WARPS = 4
# Pipeline depths to try, deepest first: Triton's default of 3 hides most of the loads' latency.
_NUM_STAGES = (3, 2, 1)
# Room for what the estimates leave out: the pipeline's barriers, the prefetched padding-mask bytes and the
# reductions' scratch, a few hundred bytes in the compiled kernels.
_SHARED_SLACK = 1024


class ForwardConfig(NamedTuple):
    block_m: int  # query block
    block_n: int  # key block
    num_stages: int


class BackwardConfig(NamedTuple):
    block: int  # of the delta and backward kernels
    num_stages: int


# The estimates are upper bounds of what Triton allocates, written from the tiles a kernel holds rather than fitted:
# a loop's prefetched loads take num_stages buffers each (the sm90/sm100 pipelines allocate that many, sm8x and
# sm120 one fewer), every dot operand that may sit in shared memory counts once, and nothing is assumed reused.
# At the chosen configurations, compiled with Triton 3.6 and 3.9 for sm80..sm120, they are 1.08x (forward, 16-bit,
# head dim 128, sm90/sm100) to 2.5x (backward on sm8x/sm120) what the compiler allocates; the tests compare.


def forward_shared_memory(head_dim: int, element_size: int, block_m: int, block_n: int, num_stages: int) -> int:
    """Upper bound, in bytes, of _attention_forward_kernel's shared memory: the query tile and the probabilities
    (dot operands) once, the key and value tiles the loop prefetches num_stages times."""
    resident = element_size * block_m * (head_dim + block_n)
    return resident + num_stages * 2 * element_size * block_n * head_dim + _SHARED_SLACK


def delta_shared_memory(head_dim: int, element_size: int, block: int) -> int:
    """Upper bound, in bytes, of _attention_delta_kernel's shared memory: the scratch of a row sum across warps
    (one fp32 partial per row and warp). It has no loop, so no pipeline depth and no tile held in shared memory."""
    return 4 * block * _NUM_WARPS


def backward_shared_memory(head_dim: int, element_size: int, block: int, num_stages: int) -> int:
    """Upper bound, in bytes, of _attention_backward_kernel's shared memory. Each loop holds two resident
    operand tiles (k and v, then q and dO) and two [block, block] ones (P~^T and dS^T, then dS); what the loops
    prefetch (q, dO and their fp32 lse and delta, then k and v) takes num_stages buffers in each loop, both loops
    counted, as the compiler need not reuse one loop's buffers in the other (for sm100 it does not)."""
    tile = element_size * block * head_dim
    resident = 2 * tile + 2 * element_size * block * block
    return resident + num_stages * (4 * tile + 2 * 4 * block) + _SHARED_SLACK


def _first_fit(shared_memory, blocks: tuple[int, ...], limit: int | None) -> tuple[int, int]:
    """(block, num_stages): the largest block that fits limit bytes at some depth, at the deepest depth that
    fits; limit None (the interpreter, which has no shared memory) takes the first. Shrinking the block only
    when even an unpipelined loop overflows keeps the tile shapes the register budget was planned for."""
    for block in blocks:
        for num_stages in _NUM_STAGES:
            if limit is None or shared_memory(block, num_stages) <= limit:
                return block, num_stages
    raise ValueError(f"attention: the Triton kernel needs {shared_memory(blocks[-1], 1)} bytes of shared memory "
                     f"per block at least, the GPU offers {limit}; use backend='sdpa'")


def forward_config(head_dim: int, element_size: int, limit: int | None) -> ForwardConfig:
    """The forward's launch configuration for limit bytes of shared memory per block (None: no limit)."""
    block_m = 64
    block_n, num_stages = _first_fit(
        lambda block_n, stages: forward_shared_memory(head_dim, element_size, block_m, block_n, stages),
        (64, 32, 16), limit)
    return ForwardConfig(block_m, block_n, num_stages)


def backward_config(head_dim: int, element_size: int, limit: int | None) -> BackwardConfig:
    """The delta and backward kernels' launch configuration for limit bytes of shared memory per block (None: no
    limit). Two fp32 [64, 128] accumulators (dK, dV) besides the q, k, v, dO tiles would outgrow the registers of
    4 warps, so head dim 128 starts from block 32 (a register count, not a timing: no GPU here)."""
    blocks = (64, 32, 16) if head_dim <= 64 else (32, 16)
    return BackwardConfig(*_first_fit(
        lambda block, stages: max(backward_shared_memory(head_dim, element_size, block, stages),
                                  delta_shared_memory(head_dim, element_size, block)),
        blocks, limit))


@functools.cache
def _cuda_shared_memory_limit(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _shared_memory_limit(device: torch.device) -> int | None:
    """The device's per-block shared memory in bytes; None for CPU tensors, which only the interpreter runs."""
    return _cuda_shared_memory_limit(device.index) if device.type == "cuda" else None


def _grid(batch: int, heads: int, length: int, block: int) -> tuple[int, int]:
    """(B * H, blocks of the sequence): the batch x head count goes on axis 0, as on axis 1 a batch of 5462
    sequences with DistilBERT's 12 heads would already pass CUDA's 65535."""
    grid = (batch * heads, triton.cdiv(length, block))
    if grid[0] > CUDA_GRID_LIMITS[0]:
        raise ValueError(f"attention: B * H = {grid[0]} exceeds CUDA's {CUDA_GRID_LIMITS[0]} programs per grid axis")
    if grid[1] > CUDA_GRID_LIMITS[1]:
        raise ValueError(f"attention: L = {length} makes {grid[1]} blocks of {block}, more than the "
                         f"{CUDA_GRID_LIMITS[1]} programs CUDA allows on a grid's second axis")
    return grid


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any batch/head/position strides (e.g. heads split off a [B, L, H * Dh] projection by a
    # view and a transpose) but need unit stride along the head dim.
    return x if x.stride(-1) == 1 else x.contiguous()


def _padding_flags(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if key_padding_mask is None:
        return q  # a placeholder pointer: the kernels do not read it without HAS_MASK
    real = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    return real.contiguous().view(torch.uint8)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(q, k, v, key_padding_mask, is_causal: bool, dropout_p: float, scale: float,
                      seed: torch.Tensor):
    """fastdistil::_attention_forward on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); the inputs are
    checked by fastdistil.attention.check_inputs.

    Returns (out [B, H, L, D] in the input dtype, lse [B, H, L] fp32).
    """
    q, k, v = (_rows_contiguous(x) for x in (q, k, v))
    batch, heads, length, dim = q.shape
    config = forward_config(dim, q.element_size(), _shared_memory_limit(q.device))
    out = empty_bhld(q)
    lse = q.new_empty((batch, heads, length), dtype=torch.float32)
    with _device_guard(q.device):
        _attention_forward_kernel[_grid(batch, heads, length, config.block_m)](
            q, k, v, _padding_flags(key_padding_mask, q), seed, out, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            heads, length, scale * _LOG2E.value, dropout_p,
            HAS_MASK=key_padding_mask is not None, IS_CAUSAL=is_causal, DROPOUT=dropout_p > 0, HEAD_DIM=dim,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, PRECISION=_precision(q.dtype), num_warps=_NUM_WARPS,
            num_stages=config.num_stages,
        )
    return out, lse


def attention_backward(grad_out, q, k, v, key_padding_mask, is_causal: bool, seed, out, lse, dropout_p: float,
                       scale: float):
    """fastdistil::_attention_backward on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1): (dq, dk, dv)
    in the input dtype, for the forward that returned out and lse with the same seed."""
    q, k, v, out, grad_out = (_rows_contiguous(x) for x in (q, k, v, out, grad_out))
    batch, heads, length, dim = q.shape
    config = backward_config(dim, q.element_size(), _shared_memory_limit(q.device))
    delta = torch.empty_like(lse)
    dq, dk, dv = empty_bhld(q), empty_bhld(k), empty_bhld(v)
    grid = _grid(batch, heads, length, config.block)
    with _device_guard(q.device):
        _attention_delta_kernel[grid](
            out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, length,
            HEAD_DIM=dim, BLOCK_M=config.block, num_warps=_NUM_WARPS, num_stages=1,  # no loop to pipeline
        )
        _attention_backward_kernel[grid](
            q, k, v, grad_out, _padding_flags(key_padding_mask, q), seed, lse, delta, dq, dk, dv,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3],
            heads, length, scale, dropout_p,
            HAS_MASK=key_padding_mask is not None, IS_CAUSAL=is_causal, DROPOUT=dropout_p > 0, HEAD_DIM=dim,
            BLOCK=config.block, PRECISION=_precision(q.dtype), num_warps=_NUM_WARPS, num_stages=config.num_stages,
        )
    return dq, dk, dv



# Offline compilation, to hold the estimates against the compiler ------------------------------------------


def compiled_shared_memory(kernel: str, dtype: torch.dtype, capability: tuple[int, int], head_dim: int,
                           config: ForwardConfig | BackwardConfig, is_causal: bool = False) -> int:
    """Bytes of shared memory Triton allocates for kernel ("forward", "delta" or "backward") on dtype inputs at
    head dim head_dim, with config, when compiled for a CUDA GPU of this compute capability, bidirectional or
    causal. Needs no GPU (Triton ships ptxas) but does need Triton's compiler mode: call it in a process without
    TRITON_INTERPRET=1.

    The kernel is compiled with a mask and dropout, and with every pointer and integer argument divisible by 16:
    the variant with the most shared memory. A launch specializes that way whenever strides and pointers allow
    (outputs and gradients are [B, L, H, Dh] with Dh in 32/64/128), and only then can Triton prefetch the tiles
    with cp.async, whose buffers are most of the kernels' shared memory.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    precision = _precision(dtype)
    if kernel == "forward":
        fn = _attention_forward_kernel
        constexprs = dict(HAS_MASK=True, IS_CAUSAL=is_causal, DROPOUT=True, HEAD_DIM=head_dim,
                          BLOCK_M=config.block_m, BLOCK_N=config.block_n, PRECISION=precision)
    elif kernel == "delta":
        fn = _attention_delta_kernel
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=config.block)
    elif kernel == "backward":
        fn = _attention_backward_kernel
        constexprs = dict(HAS_MASK=True, IS_CAUSAL=is_causal, DROPOUT=True, HEAD_DIM=head_dim, BLOCK=config.block,
                          PRECISION=precision)
    else:
        raise ValueError(f"compiled_shared_memory: kernel must be 'forward', 'delta' or 'backward', got {kernel!r}")
    element = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    pointer_types = dict(mask_ptr="*u8", seed_ptr="*i64", lse_ptr="*fp32", delta_ptr="*fp32")
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, f"*{element}")
        else:
            signature[name] = "fp32" if name in ("qk_scale", "scale", "dropout_p") else "i32"
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    aligned = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={index[name]: value for name, value in constexprs.items()},
                       attrs={index[name]: aligned for name, kind in signature.items() if kind not in
                              ("constexpr", "fp32")})
    num_stages = 1 if kernel == "delta" else config.num_stages
    compiled = triton.compile(source, target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32),
                              options=dict(num_warps=_NUM_WARPS, num_stages=num_stages))
    return compiled.metadata.shared
