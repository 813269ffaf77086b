"""Attention for the student, bidirectional (DistilBERT, RoBERTa) or causal (GPT-2): torch.ops.fastdistil.attention,
its Python API, its autograd and its hook into transformers' attention registry.

    out = softmax(q k^T * scale, keys where key_padding_mask is 0 excluded, and with is_causal the keys j > i of
          query i), dropped out with probability dropout_p and rescaled by 1 / (1 - dropout_p), times v

A query row without a key to attend to (a sequence that is all padding; causal, a query whose keys up to itself
are all padding, as left padding makes them) gets output 0 and gradient 0, never NaN.

The op in the order every op module follows: its schemas (csrc/ops.cpp), fake kernels, autograd, then one
implementation per device, and the Python API last. fastdistil::attention decomposes (CompositeImplicitAutograd)
into, per the support matrix (README, "The student's attention, and GPUs"):
- the fused Triton kernel (kernels/attention.py) for fp16/bf16 on CUDA GPUs of compute capability 8.0 and
  newer, through the private ops fastdistil::_attention_forward / _attention_backward (CUDA kernels, fake
  kernels and autograd registered here, so torch.compile sees them as opaque ops);
- PyTorch's scaled_dot_product_attention elsewhere: on CPU, on Volta (its memory-efficient kernel; Triton
  runs tl.dot on CUDA cores there), for fp32 (the kernel keeps fp32's precision with exact "ieee" dots, which
  run about 10x slower than SDPA's fp32 kernels) and for head dims the kernel does not cover.
backend="triton" runs the kernel in any of fp32/fp16/bf16, except bf16 on GPUs older than sm80, which have none.
The dropout of the Triton kernel is keyed by a seed drawn on the device from torch's generator, so
torch.manual_seed makes it reproducible and nothing waits for the host. Without fastdistil._C (which defines the
ops) the Python API runs SDPA, or the launchers directly with backend="triton".
"""

import functools
from typing import Literal

import torch
import torch.nn.functional as F

from fastdistil.kernels.layout import empty_bhld
from fastdistil.ops import checks, extension

Backend = Literal["auto", "triton", "sdpa"]
BACKENDS = ("auto", "triton", "sdpa")
HEAD_DIMS = (32, 64, 128)  # of the Triton kernel
DTYPES = checks.LOGIT_DTYPES


def check_triton(q: torch.Tensor) -> None:
    """The Triton kernel's own limits, beyond the checks every attention call passes (checks.attention)."""
    if q.size(-1) not in HEAD_DIMS:
        raise ValueError(f"attention: the Triton kernel takes head dims {HEAD_DIMS}, got q.size(-1) = {q.size(-1)}")
    if q.dtype == torch.bfloat16 and q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            raise ValueError(f"attention: q is {q.dtype} on {q.device}, but sm{major}{minor} has no bf16; "
                             "use fp16 or fp32")


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.size(-1) ** -0.5 if scale is None else float(scale)


def _sdpa(q, k, v, key_padding_mask, dropout_p: float, scale: float | None, is_causal: bool) -> torch.Tensor:
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, is_causal=is_causal)
    real = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    allowed = real[:, None, None, :]  # [B, 1, 1, L]
    if is_causal:
        # SDPA refuses is_causal together with attn_mask: the causal pattern joins the padding in one mask.
        length = q.size(2)
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()  # [B, 1, L, L]
    # Some SDPA kernels give NaN rows (and gradients) when every key is masked: such a row attends to all keys
    # instead and its output is then set to the documented 0, which also zeroes its gradient.
    empty = ~allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty, 0.0)


def _seed(q: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """[1] int64 Philox seed on q's device, from torch's generator; without dropout the kernels never read it."""
    if dropout_p == 0:
        return q.new_empty(1, dtype=torch.int64)
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)


# --- fake kernels (schemas: csrc/ops.cpp) ------------------------------------------------------------------

def _forward_fake(q, k, v, key_padding_mask, is_causal, dropout_p, scale, seed):
    return empty_bhld(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward_fake(grad_out, q, k, v, key_padding_mask, is_causal, seed, out, lse, dropout_p, scale):
    return empty_bhld(q), empty_bhld(k), empty_bhld(v)


if extension.AVAILABLE:
    torch.library.register_fake("fastdistil::_attention_forward", _forward_fake)
    torch.library.register_fake("fastdistil::_attention_backward", _backward_fake)

# --- autograd: the backward recomputes the probabilities from the saved logsumexp ---------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, is_causal, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, key_padding_mask, seed, out, lse)
    ctx.is_causal = is_causal
    ctx.dropout_p = dropout_p
    ctx.scale = scale


def _backward_with(backward_fn, ctx, grad_out, _grad_lse):
    q, k, v, key_padding_mask, seed, out, lse = ctx.saved_tensors
    dq, dk, dv = backward_fn(grad_out, q, k, v, key_padding_mask, ctx.is_causal, seed, out, lse, ctx.dropout_p,
                             ctx.scale)
    return dq, dk, dv, None, None, None, None, None


if extension.AVAILABLE:
    torch.library.register_autograd(
        "fastdistil::_attention_forward",
        functools.partial(_backward_with, torch.ops.fastdistil._attention_backward), setup_context=_setup_context)

# --- implementations: the Triton launchers on CUDA ------------------------------------------------------------
# Imported on first call: importing kernels.attention compiles nothing yet but fixes Triton's interpreter or
# compiler mode, which a CPU test may still need to set.


def _triton_forward(q, k, v, key_padding_mask, is_causal, dropout_p, scale, seed):
    from fastdistil.kernels.attention import attention_forward

    return attention_forward(q, k, v, key_padding_mask, is_causal, dropout_p, scale, seed)


def _triton_backward(grad_out, q, k, v, key_padding_mask, is_causal, seed, out, lse, dropout_p, scale):
    from fastdistil.kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, key_padding_mask, is_causal, seed, out, lse, dropout_p, scale)


if extension.AVAILABLE:
    torch.library.register_kernel("fastdistil::_attention_forward", "cuda", _triton_forward)
    torch.library.register_kernel("fastdistil::_attention_backward", "cuda", _triton_backward)


class _TritonAttention(torch.autograd.Function):
    """The same autograd around the launchers called directly (backend="triton"), which also run on CPU
    tensors under TRITON_INTERPRET=1."""

    @staticmethod
    def forward(ctx, *args):
        output = _triton_forward(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward_with(_triton_backward, ctx, *grads)


def auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    """(backend, why) that backend="auto" picks for inputs of this device, dtype and head dim."""
    if device.type != "cuda":
        return "sdpa", f"{device.type} tensors"
    if not extension.AVAILABLE:
        return "sdpa", "fastdistil._C, which defines the kernel's op, is not loaded"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return "sdpa", f"sm{major}{minor}: Triton has no tensor-core matmul before sm80"
    if dtype not in DTYPES or head_dim not in HEAD_DIMS:
        return "sdpa", f"the Triton kernel takes {HEAD_DIMS} x fp32/fp16/bf16, got {head_dim} x {dtype}"
    if dtype == torch.float32:
        return "sdpa", "fp32: the Triton kernel's exact (ieee) fp32 dots run about 10x slower than SDPA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "sdpa", "Triton is not installed (pip install triton)"
    return "triton", f"sm{major}{minor}"


def _composite(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, is_causal=False):
    """fastdistil::attention: the Triton kernel where auto_backend picks it, SDPA elsewhere."""
    checks.attention(q, k, v, key_padding_mask, dropout_p, scale, is_causal)
    if auto_backend(q.device, q.dtype, q.size(-1))[0] == "triton":
        return torch.ops.fastdistil._attention_forward(q, k, v, key_padding_mask, is_causal, dropout_p,
                                                        _scale(q, scale), _seed(q, dropout_p))[0]
    return _sdpa(q, k, v, key_padding_mask, dropout_p, scale, is_causal)


if extension.AVAILABLE:
    torch.library.impl("fastdistil::attention", "CompositeImplicitAutograd", _composite)

# --- the Python API -----------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: Backend = "auto",
    is_causal: bool = False,  # after backend, which callers from before it existed may pass by position
) -> torch.Tensor:
    """Multi-head self-attention, bidirectional or causal, with a key padding mask, fused on GPUs.

    Args:
        q, k, v: [B, H, L, Dh], one dtype (fp32, fp16 or bf16) and device. The Triton kernel takes Dh in
            (32, 64, 128) and accumulates in fp32.
        key_padding_mask: [B, L] bool or integer, transformers' attention_mask convention: 1/True = real token,
            0 = padding (never attended to). None: every key is real.
        dropout_p: attention dropout probability in [0, 1); pass 0 in evaluation.
        scale: multiplies q k^T; None means 1 / sqrt(Dh).
        is_causal: query i attends only to the keys j <= i (GPT-2 students), besides the padding mask; q and k
            have one length, so the diagonal is the same top-left one as SDPA's is_causal. On the Triton kernel
            the tiles above the diagonal are skipped, about half the work.
        backend: "auto" (torch.ops.fastdistil.attention: Triton for fp16/bf16 on sm80+ GPUs, else SDPA),
            "triton" (the kernel on any tensors Triton accepts, CPU ones under TRITON_INTERPRET=1; bf16 needs
            sm80+) or "sdpa".

    Returns:
        [B, H, L, Dh] in q's dtype; rows without a key to attend to (all of a sequence that is all padding;
        causal, the queries before a left-padded sequence's first real token) are 0.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    dropout_p = float(dropout_p)
    checks.attention(q, k, v, key_padding_mask, dropout_p, scale, is_causal)
    if backend == "triton":
        check_triton(q)
    if backend == "auto" and extension.AVAILABLE:
        return torch.ops.fastdistil.attention(q, k, v, key_padding_mask, dropout_p, scale, is_causal)
    if backend != "triton":
        return _sdpa(q, k, v, key_padding_mask, dropout_p, scale, is_causal)
    return _TritonAttention.apply(q, k, v, key_padding_mask, is_causal, dropout_p, _scale(q, scale),
                                  _seed(q, dropout_p))[0]


# transformers integration ----------------------------------------------------------------------------------


def _transformers_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, **kwargs):
    """The mask builder transformers calls for attn_implementation="fastdistil": the [B, L] bool padding mask
    itself (or None) when the mask is plain self-attention, bidirectional (create_bidirectional_mask) or causal
    (create_causal_mask: GPT-2) with padding at most, no cache offset and q and k of one length; the usual 4-D
    SDPA mask otherwise (a KV cache's decoding steps, sliding windows, packed sequences, extra mask functions),
    which _transformers_attention then hands to SDPA. Which of the two plain patterns applies, the attention
    function reads from the layer (module.is_causal), as transformers' flash attention does with its [B, L] mask.
    A caller that passes allow_is_causal_skip / allow_is_bidirectional_skip = False needs the 4-D mask itself
    (e.g. to concatenate it) and gets it."""
    from transformers import masking_utils

    if mask_function is masking_utils.causal_mask_function:
        plain = kwargs.get("allow_is_causal_skip", True)
    elif mask_function is masking_utils.bidirectional_mask_function:
        plain = kwargs.get("allow_is_bidirectional_skip", True)
    else:
        plain = False
    # The lengths first: a static cache's q_offset is a tensor, which the comparison would read from the device.
    if (plain and q_length == kv_length and not isinstance(q_offset, torch.Tensor) and q_offset == 0
            and kv_offset == 0 and (attention_mask is None or attention_mask.shape[-1] == kv_length)):
        return attention_mask
    return masking_utils.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                   attention_mask, **kwargs)


def _transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            *, backend: Backend = "auto", **kwargs):
    """transformers' attention-function signature: [B, H, L, Dh] inputs, returns ([B, L, H, Dh], None).

    With what _transformers_mask returns for plain self-attention (None or a [B, L] mask) and one shape for q, k
    and v, fastdistil.attention runs, causal as transformers' SDPA decides it: the is_causal argument, else
    module.is_causal, else causal. Anything else (a 4-D mask, a cached key longer than the query, grouped
    key/value heads, T5's position_bias, a softcap) goes to transformers' SDPA function."""
    if ((attention_mask is not None and attention_mask.dim() != 2) or not (query.shape == key.shape == value.shape)
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                      is_causal=is_causal, **kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if backend == "triton" and query.size(-1) not in HEAD_DIMS:
        backend = "sdpa"
    out = attention(query, key, value, attention_mask, dropout, scaling, is_causal=bool(causal), backend=backend)
    return out.transpose(1, 2).contiguous(), None


def register_with_transformers(backend: Backend = "auto") -> None:
    """Registers attn_implementation="fastdistil" with transformers, so that e.g.
    DistilBertForMaskedLM.from_pretrained(path, attn_implementation="fastdistil") or
    model.set_attn_implementation("fastdistil") runs this attention: bidirectional in DistilBERT and RoBERTa,
    causal in GPT-2 (whose generate() decoding steps, against a KV cache, run transformers' SDPA). Idempotent;
    calling it again with another backend replaces the registration."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if backend not in BACKENDS:
        raise ValueError(f"register_with_transformers: backend must be one of {BACKENDS}, got {backend!r}")
    AttentionInterface.register("fastdistil", functools.partial(_transformers_attention, backend=backend))
    AttentionMaskInterface.register("fastdistil", _transformers_mask)
