"""fastdistil.attention (the Triton kernel, the SDPA paths and torch.ops.fastdistil.attention), bidirectional and
causal, against a float64 masked-softmax oracle, its dropout, its registration and its use inside transformers'
DistilBERT, RoBERTa and GPT-2.

Without a GPU the Triton kernel runs on CPU tensors in Triton's interpreter, which is slow: shapes stay small
(batch 2, 2 heads), while L covers a single key, one partial block and several blocks with a tail. The full-size
cases run only on CUDA.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Read when @triton.jit runs, i.e. when fastdistil.kernels.attention is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from fastdistil.ops import attention as attention_module  # noqa: E402
from fastdistil.ops.attention import (  # noqa: E402  (fastdistil.attention is also the function's name)
    _transformers_attention,
    _transformers_mask,
    attention,
    auto_backend,
    check_triton,
    register_with_transformers,
)
from fastdistil.kernels import attention as kernel_module  # noqa: E402
from helpers import assert_within_pytorch_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = not isinstance(kernel_module._attention_forward_kernel, triton.runtime.JITFunction)
FP32_RTOL = 1e-5  # of the largest oracle magnitude, in output and gradients


@pytest.fixture(autouse=True)
def _kernels_runnable():
    if not torch.cuda.is_available() and not INTERPRETED:
        pytest.fail("fastdistil.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels were "
                    "compiled for a GPU this machine lacks; set TRITON_INTERPRET=1 in the environment")


def make_qkv(batch=2, heads=2, length=17, dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g).to(DEVICE, dtype).requires_grad_()
            for _ in range(3)]


def padding_mask(batch, length, lengths):
    """[B, L] bool, right padding: sequence b has lengths[b] real tokens (0 = all padding)."""
    return torch.arange(length, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]


def left_padding_mask(batch, length, lengths):
    """[B, L] bool, left padding (as for generation): the last lengths[b] tokens of sequence b are real."""
    return padding_mask(batch, length, lengths).flip(-1)


def oracle(q, k, v, mask=None, keep=None, dropout_p=0.0, scale=None, is_causal=False):
    """softmax(q k^T * scale) over the real keys (causal: those up to the query), times keep / (1 - p), times v,
    in float64; rows without a key to attend to are 0."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) * (q.size(-1) ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    if is_causal:
        length = q.size(2)
        after_the_query = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(diagonal=1)
        scores = scores.masked_fill(after_the_query, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v


def output_and_grads(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype)))


def check_against_oracle(q, k, v, mask=None, backend="triton", keep=None, dropout_p=0.0, is_causal=False):
    """Output and the gradients of <out, grad_out> against the float64 oracle: within FP32_RTOL of the largest
    magnitude in fp32; in fp16 within 2x the error of PyTorch's own fp16 SDPA (the flash-attention rule)."""
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = output_and_grads(attention, q, k, v, grad_out, key_padding_mask=mask, dropout_p=dropout_p,
                           is_causal=is_causal, backend=backend)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    truth = output_and_grads(oracle, q64, k64, v64, grad_out, mask=mask, keep=keep, dropout_p=dropout_p,
                             is_causal=is_causal)
    # The scale of fp32 errors: the largest oracle magnitude among the four, as a tensor's own can be 0 while
    # the kernel computes it as a difference of O(1) terms (dq when a row has one real key: dS = P (dP - delta)).
    scale = max(e.abs().max().item() for e in truth)
    for name, a, e, x in zip(("out", "dq", "dk", "dv"), got, truth, (q, q, k, v)):
        assert a.shape == x.shape and a.dtype == x.dtype, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        if q.dtype == torch.float32:
            err = (a.double() - e).abs().max().item()
            assert err <= FP32_RTOL * scale, f"{name}: max abs error {err:.3e}, largest |oracle| {scale:.3e}"
    if q.dtype != torch.float32:
        assert keep is None, "PyTorch's SDPA cannot be given the kernel's dropout mask"
        pytorch = output_and_grads(attention, q, k, v, grad_out, key_padding_mask=mask, is_causal=is_causal,
                                   backend="sdpa")
        for name, a, p, e in zip(("out", "dq", "dk", "dv"), got, pytorch, truth):
            assert_within_pytorch_error(a, p, e, name)
    return got


@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("length", [1, 17, 33, 70])
def test_fp32_matches_oracle(length, dim):
    """Sequence 0 padded to about half its length (L = 1: unpadded), sequence 1 unpadded."""
    mask = padding_mask(2, length, [max(1, length // 2), length])
    check_against_oracle(*make_qkv(length=length, dim=dim), mask)


@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("length", [17, 70])
def test_fp16_within_twice_pytorch_error(length, dim):
    mask = padding_mask(2, length, [length - 5, length])
    check_against_oracle(*make_qkv(length=length, dim=dim, dtype=torch.float16), mask)


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("backend", ["triton", "sdpa", "auto"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "int-mask"])
def test_backends_match_oracle(backend, masked, is_causal):
    mask = padding_mask(2, 33, [20, 9]).to(torch.int64) if masked else None
    check_against_oracle(*make_qkv(length=33, dim=64), mask, backend=backend, is_causal=is_causal)


# Causal attention (GPT-2 students) ------------------------------------------------------------------------

PADDINGS = {
    "none": lambda length: None,
    # Sequence 0 padded on the right to about half its length, sequence 1 unpadded.
    "right": lambda length: padding_mask(2, length, [max(1, length // 2), length]),
    # Sequence 0 padded on the left, so that its first queries have no key up to themselves; sequence 1 all
    # padding. Both kinds of row must come out 0.
    "left-and-empty": lambda length: left_padding_mask(2, length, [max(1, length - length // 3), 0]),
}


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("length, dim", [(1, 32), (17, 64), (69, 32), (69, 128)])
def test_causal_fp32_matches_oracle(length, dim, backend, padding):
    """L = 1, one partial block, and one block plus a tail (69 = 64 + 5), each with no padding, right padding
    and left padding beside an all-padding sequence."""
    mask = PADDINGS[padding](length)
    out, dq, _, _ = check_against_oracle(*make_qkv(length=length, dim=dim), mask, backend=backend, is_causal=True)
    if padding == "left-and-empty":
        no_key = ~mask.cumsum(-1).bool()[:, None, :].expand(out.shape[:3])  # no real key up to the query
        assert no_key[0].any() or length == 1
        for name, x in (("out", out), ("dq", dq)):
            assert (x[no_key] == 0).all(), name


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("length", [17, 70])
def test_causal_fp16_within_twice_pytorch_error(length, backend):
    mask = padding_mask(2, length, [length - 5, length])
    check_against_oracle(*make_qkv(length=length, dim=64, dtype=torch.float16), mask, backend=backend,
                         is_causal=True)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's max of NaN rows
def test_causal_kernel_skips_the_tiles_above_the_diagonal():
    """Two blocks of queries and keys: a tile the kernel visited, even masked, would spread a NaN of its inputs
    (0 * NaN = NaN in the dots). NaN keys and values of block 1 leave the output and dq of query block 0
    finite, and NaN queries and output gradients of block 0 leave dk and dv of key block 1 finite: each equals
    what the finite inputs give."""
    dim = 32
    limit = kernel_module._shared_memory_limit(torch.device(DEVICE))
    block = max(kernel_module.forward_config(dim, 4, limit).block_m, kernel_module.backward_config(dim, 4, limit).block)
    q, k, v = (x.detach() for x in make_qkv(batch=1, heads=1, length=2 * block, dim=dim))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    finite = output_and_grads(attention, *(x.clone().requires_grad_() for x in (q, k, v)), grad_out,
                              is_causal=True, backend="triton")
    late, early = slice(block, None), slice(None, block)

    k_nan, v_nan = k.clone(), v.clone()
    k_nan[..., late, :], v_nan[..., late, :] = math.nan, math.nan
    out, dq, _, _ = output_and_grads(attention, *(x.clone().requires_grad_() for x in (q, k_nan, v_nan)), grad_out,
                                     is_causal=True, backend="triton")
    torch.testing.assert_close(out[..., early, :], finite[0][..., early, :], rtol=0, atol=0)
    torch.testing.assert_close(dq[..., early, :], finite[1][..., early, :], rtol=0, atol=0)

    q_nan, grad_nan = q.clone(), grad_out.clone()
    q_nan[..., early, :], grad_nan[..., early, :] = math.nan, math.nan
    _, _, dk, dv = output_and_grads(attention, *(x.clone().requires_grad_() for x in (q_nan, k, v)), grad_nan,
                                    is_causal=True, backend="triton")
    torch.testing.assert_close(dk[..., late, :], finite[2][..., late, :], rtol=0, atol=0)
    torch.testing.assert_close(dv[..., late, :], finite[3][..., late, :], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_padding_sequence_gives_zero_output_and_gradient(backend, dtype):
    """Sequence 1 is all padding: its rows are 0 with zero gradients, never NaN; sequence 0 is unaffected."""
    q, k, v = make_qkv(length=17, dim=32, dtype=dtype)
    mask = padding_mask(2, 17, [11, 0])
    out, dq, dk, dv = check_against_oracle(q, k, v, mask, backend=backend)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert (x[1] == 0).all(), name


def test_logsumexp_and_layout_of_the_kernel_outputs():
    """The saved logsumexp is that of the scaled scores over real keys (+inf without any); the output is laid
    out as [B, L, H, Dh] so that merging heads costs no copy."""
    q, k, v = (x.detach() for x in make_qkv(length=33, dim=64))
    mask = padding_mask(2, 33, [20, 0])
    out, lse = kernel_module.attention_forward(q, k, v, mask, False, 0.0, 0.125, q.new_empty(1, dtype=torch.int64))
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.125).masked_fill(~mask[:, None, None, :], -math.inf)
    expected = torch.logsumexp(scores, dim=-1)
    torch.testing.assert_close(lse[0], expected[0].float(), rtol=1e-5, atol=1e-5)
    assert (lse[1] == math.inf).all()
    assert out.transpose(1, 2).is_contiguous() and lse.dtype == torch.float32


def test_strided_inputs():
    """Heads split off [B, L, H * Dh] projections by view + transpose (as DistilBERT does), and a head dim with
    a non-unit stride, give the results of contiguous inputs."""
    q, k, v = make_qkv(length=17, dim=32)
    mask = padding_mask(2, 17, [9, 17])
    views = [x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    views[2] = torch.randn(2, 2, 17, 64, device=DEVICE)[..., ::2].copy_(v.detach())
    for x in views:
        x.requires_grad_()
    grad_out = torch.randn(q.shape, device=DEVICE)
    expected = output_and_grads(attention, q, k, v, grad_out, key_padding_mask=mask, backend="triton")
    actual = output_and_grads(attention, *views, grad_out, key_padding_mask=mask, backend="triton")
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def dropout_keep_mask(batch, heads, length, dim, dropout_p, dtype=torch.float32):
    """The kernel's own keep mask [B, H, L, L], read back from its output: with q = k = 0 the probabilities are
    uniform (1/L), and v = the first L rows of the identity (L <= Dh) makes out[..., i, j] = P~[i, j]."""
    zeros = torch.zeros(batch, heads, length, dim, device=DEVICE, dtype=dtype)
    v = torch.eye(length, dim, device=DEVICE, dtype=dtype).expand(batch, heads, length, dim)
    out = attention(zeros, zeros, v, dropout_p=dropout_p, backend="triton")[..., :length]
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / ((1 - dropout_p) * length)))
    return kept


def test_dropout_backward_is_the_gradient_of_the_forwards_mask():
    """The mask depends only on the seed and the element's index, so it can be read back once (same seed) and
    given to the oracle: output and all three gradients then match, padding included."""
    dropout_p = 0.3
    torch.manual_seed(7)
    keep = dropout_keep_mask(2, 2, 17, 32, dropout_p)
    assert 0 < keep.float().mean() < 1
    q, k, v = make_qkv(length=17, dim=32)
    mask = padding_mask(2, 17, [12, 17])
    torch.manual_seed(7)
    check_against_oracle(q, k, v, mask, keep=keep, dropout_p=dropout_p)


def test_causal_dropout_keeps_the_bidirectional_mask_below_the_diagonal():
    """The keep decision of an element depends on its index only, so a causal launch drops what a bidirectional
    one drops: with q = k = 0 and v = the identity, out[i, j] = keep[i, j] / ((1 - p) (i + 1)) for j <= i and 0
    above the diagonal. The backward is then the gradient of that mask, padding included."""
    dropout_p, length = 0.3, 17
    torch.manual_seed(7)
    keep = dropout_keep_mask(2, 2, length, 32, dropout_p)
    zeros = torch.zeros(2, 2, length, 32, device=DEVICE)
    v = torch.eye(length, 32, device=DEVICE).expand(2, 2, length, 32)
    torch.manual_seed(7)
    out = attention(zeros, zeros, v, dropout_p=dropout_p, is_causal=True, backend="triton")[..., :length]
    rows = torch.arange(1, length + 1, device=DEVICE, dtype=torch.float32)[:, None]
    expected = keep.tril() / ((1 - dropout_p) * rows)
    torch.testing.assert_close(out, expected)
    q, k, v = make_qkv(length=length, dim=32)
    torch.manual_seed(7)
    check_against_oracle(q, k, v, left_padding_mask(2, length, [12, length]), keep=keep, dropout_p=dropout_p,
                         is_causal=True)


def test_dropout_keep_rate():
    """16384 decisions at p = 0.3: the kept fraction is within 4 sigma of 1 - p."""
    dropout_p = 0.3
    keep = dropout_keep_mask(4, 4, 32, 32, dropout_p)
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 4 * sigma


def test_dropout_mask_does_not_depend_on_dtype():
    torch.manual_seed(11)
    fp32 = dropout_keep_mask(2, 2, 17, 32, 0.5)
    torch.manual_seed(11)
    assert torch.equal(dropout_keep_mask(2, 2, 17, 32, 0.5, torch.float16), fp32)


def test_dropout_seed_reproducibility():
    """torch.manual_seed fixes the dropout mask; the next call draws a new one."""
    q, k, v = (x.detach() for x in make_qkv(length=17, dim=32))
    torch.manual_seed(3)
    first = attention(q, k, v, dropout_p=0.2, backend="triton")
    second = attention(q, k, v, dropout_p=0.2, backend="triton")
    torch.manual_seed(3)
    assert torch.equal(attention(q, k, v, dropout_p=0.2, backend="triton"), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("is_causal", [False, True])
def test_opcheck(is_causal):
    """torch.ops.fastdistil.attention on CPU tensors (SDPA): schema, fake tensors, autograd registration."""
    q, k, v = (x.detach().cpu().requires_grad_() for x in make_qkv(length=9, dim=32))
    torch.library.opcheck(torch.ops.fastdistil.attention.default,
                          (q, k, v, padding_mask(2, 9, [5, 0]).cpu(), 0.0, None, is_causal))


@pytest.mark.parametrize("is_causal", [False, True])
def test_fake_kernels_match_the_launchers(is_causal):
    """The fake kernels of the private Triton ops give the shapes, dtypes and strides the launchers return."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (x.detach() for x in make_qkv(length=9, dim=32, dtype=torch.float16))
    mask, seed = padding_mask(2, 9, [5, 9]), q.new_empty(1, dtype=torch.int64)
    out, lse = kernel_module.attention_forward(q, k, v, mask, is_causal, 0.1, 0.2, seed)
    grads = kernel_module.attention_backward(out, q, k, v, mask, is_causal, seed, out, lse, 0.1, 0.2)
    with FakeTensorMode() as mode:
        fq, fk, fv, fmask, fseed, fout, flse = (mode.from_tensor(x) for x in (q, k, v, mask, seed, out, lse))
        fake_forward = torch.ops.fastdistil._attention_forward(fq, fk, fv, fmask, is_causal, 0.1, 0.2, fseed)
        fake_backward = torch.ops.fastdistil._attention_backward(fout, fq, fk, fv, fmask, is_causal, fseed, fout,
                                                                 flse, 0.1, 0.2)
    for real, fake in zip((out, lse, *grads), (*fake_forward, *fake_backward)):
        assert (real.shape, real.dtype, real.stride()) == (fake.shape, fake.dtype, fake.stride())


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.zeros(2, 17, 32)), ValueError, r"q must be \[B, H, L, Dh\]"),
    (dict(k=torch.zeros(2, 2, 16, 32)), ValueError, "q, k and v must have one shape"),
    (dict(v="v"), TypeError, "v must be a torch.Tensor"),
    (dict(q=torch.zeros(2, 2, 17, 32, dtype=torch.float64)), TypeError, "q must be float32, bfloat16 or float16"),
    (dict(k=torch.zeros(2, 2, 17, 32, dtype=torch.float16)), TypeError, "k is torch.float16 but q is torch.float32"),
    (dict(q=torch.zeros(2, 2, 17, 48), k=torch.zeros(2, 2, 17, 48), v=torch.zeros(2, 2, 17, 48)), ValueError,
     r"head dims \(32, 64, 128\)"),
    (dict(key_padding_mask=torch.ones(2, 16, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(2, 17)), TypeError, "key_padding_mask must be bool or integer"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(scale=0.0), ValueError, "scale must be > 0 and finite"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool, got int"),
    (dict(k=torch.zeros(2, 2, 16, 32), v=torch.zeros(2, 2, 16, 32), is_causal=True), ValueError,
     r"is_causal needs q and k of one length L \(query i attends to keys j <= i\), got 17 and 16"),
    (dict(backend="flash"), ValueError, "backend must be one of"),
])
def test_bad_inputs_name_the_argument(change, error, match):
    args = dict(q=torch.zeros(2, 2, 17, 32), k=torch.zeros(2, 2, 17, 32), v=torch.zeros(2, 2, 17, 32),
                key_padding_mask=None, dropout_p=0.0, scale=None, is_causal=False, backend="triton")
    args.update(change)
    with pytest.raises(error, match=match):
        attention(**{name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
                     for name, value in args.items()})


@pytest.mark.parametrize("via", ["triton", "sdpa", "auto", "op"])
def test_causal_with_keys_of_another_length_is_refused_on_every_path(via):
    """The diagonal of queries and keys of different lengths would be ambiguous: every path names is_causal."""
    q, k = torch.zeros(2, 2, 1, 32, device=DEVICE), torch.zeros(2, 2, 5, 32, device=DEVICE)
    with pytest.raises(ValueError, match="attention: is_causal needs q and k of one length L"):
        if via == "op":
            torch.ops.fastdistil.attention(q, k, k, None, 0.0, None, True)
        else:
            attention(q, k, k, is_causal=True, backend=via)


# Launch configuration: shared memory, grid, dtypes per GPU ----------------------------------------------------

KERNELS = ("forward", "delta", "backward")
SHARED_MEMORY_LIMITS = kernel_module.SHARED_MEMORY_LIMITS


def chosen_config(kernel, dim, dtype, limit):
    element_size = torch.empty((), dtype=dtype).element_size()
    if kernel == "forward":
        return kernel_module.forward_config(dim, element_size, limit)
    return kernel_module.backward_config(dim, element_size, limit)  # the delta kernel runs on the backward's grid


def estimate(kernel, dim, dtype, config):
    element_size = torch.empty((), dtype=dtype).element_size()
    if kernel == "forward":
        return kernel_module.forward_shared_memory(dim, element_size, *config)
    if kernel == "delta":
        return kernel_module.delta_shared_memory(dim, element_size, config.block)
    return kernel_module.backward_shared_memory(dim, element_size, *config)


@pytest.mark.parametrize("capability", list(SHARED_MEMORY_LIMITS), ids=lambda c: f"sm{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_chosen_configs_fit_the_shared_memory_of_every_supported_gpu(capability, dtype, dim):
    """Each kernel's estimate at the configuration chosen for the GPU's limit fits it, and the pipeline is as
    deep as fits: one stage more would not."""
    limit = SHARED_MEMORY_LIMITS[capability]
    for kernel in KERNELS:
        config = chosen_config(kernel, dim, dtype, limit)
        assert estimate(kernel, dim, dtype, config) <= limit, (kernel, config)
        if kernel != "delta" and config.num_stages < 3:
            deeper = config._replace(num_stages=config.num_stages + 1)
            assert estimate(kernel, dim, dtype, deeper) > limit, (kernel, config)


# Compiles for a CUDA target offline (Triton ships ptxas), in a process of its own: this one runs the interpreter.
_COMPILE = """
import json, sys
import torch
from fastdistil.kernels.attention import BackwardConfig, ForwardConfig, compiled_shared_memory
cases = json.load(sys.stdin)
print(json.dumps([compiled_shared_memory(kernel, getattr(torch, dtype), tuple(capability), dim,
                                         (ForwardConfig if kernel == "forward" else BackwardConfig)(*config),
                                         is_causal)
                  for kernel, dtype, capability, dim, config, is_causal in cases]))
"""


def check_compiled_shared_memory(capabilities, dtypes, dims, kernels):
    """For each case, bidirectional and causal (the delta kernel has no causal variant), the shared memory
    Triton's compiler allocates at the chosen configuration fits the GPU's limit and is not above the estimate
    the choice relied on: the causal loops' bounds change no tile, so one estimate serves both."""
    cases = [(kernel, str(dtype).removeprefix("torch."), capability, dim,
              chosen_config(kernel, dim, dtype, SHARED_MEMORY_LIMITS[capability]), is_causal)
             for capability in capabilities for dtype in dtypes for dim in dims for kernel in kernels
             for is_causal in ((False,) if kernel == "delta" else (False, True))]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(cases), capture_output=True, text=True,
                          env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wrong = []
    for (kernel, dtype, capability, dim, config, is_causal), shared in zip(
            cases, json.loads(proc.stdout.splitlines()[-1])):
        limit = SHARED_MEMORY_LIMITS[capability]
        expected = estimate(kernel, dim, getattr(torch, dtype), config)
        if not shared <= min(limit, expected):
            wrong.append(f"{kernel} {dtype} sm{capability[0]}{capability[1]} Dh={dim} {config} causal={is_causal}: "
                         f"compiled {shared}, estimate {expected}, limit {limit}")
    assert not wrong, "\n".join(wrong)


def test_compiled_shared_memory_of_the_tightest_cases():
    """The largest head dim in fp32 and bf16, forward and backward, on the 99 KB of sm86 (as sm89 and sm120)."""
    check_compiled_shared_memory([(8, 6)], [torch.float32, torch.bfloat16], [128], ["forward", "backward"])


@pytest.mark.slow
def test_compiled_shared_memory_of_every_case():
    check_compiled_shared_memory(list(SHARED_MEMORY_LIMITS), [torch.float32, torch.float16, torch.bfloat16],
                                 [32, 64, 128], KERNELS)


@pytest.mark.parametrize("dim", [64, 128])
def test_configs_for_99_kb_gpus_match_oracle(dim, monkeypatch):
    """In fp32 a GPU with 99 KB per block gets smaller blocks than the interpreter's default: they compute the
    same attention (L = 70 spans several of the smaller blocks and a tail)."""
    limit = SHARED_MEMORY_LIMITS[(8, 6)]
    small = (kernel_module.forward_config(dim, 4, limit), kernel_module.backward_config(dim, 4, limit))
    default = (kernel_module.forward_config(dim, 4, None), kernel_module.backward_config(dim, 4, None))
    assert small[0].block_n < default[0].block_n or small[1].block < default[1].block, small
    monkeypatch.setattr(kernel_module, "_shared_memory_limit", lambda device: limit)
    check_against_oracle(*make_qkv(length=70, dim=dim), padding_mask(2, 70, [41, 70]))


def test_grid_puts_batch_times_heads_on_the_first_axis():
    """8192 sequences x 12 heads = 98304 programs would overflow CUDA's 65535 on axis 1; on axis 0 they fit."""
    batch_heads, blocks = kernel_module._grid(8192, 12, 509, 64)
    assert (batch_heads, blocks) == (98304, math.ceil(509 / 64))
    assert batch_heads > kernel_module.CUDA_GRID_LIMITS[1]
    assert batch_heads <= kernel_module.CUDA_GRID_LIMITS[0] and blocks <= kernel_module.CUDA_GRID_LIMITS[1]
    with pytest.raises(ValueError, match=r"L = 4194304 makes 65536 blocks of 64"):
        kernel_module._grid(1, 1, 65536 * 64, 64)


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu((7, 0)) makes torch.cuda report one device of that compute capability."""

    def install(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return install


def fake_cuda_qkv(dtype):
    return [torch.empty(2, 2, 17, 32, device="cuda", dtype=dtype) for _ in range(3)]


def test_bf16_before_sm80_is_refused_by_name(fake_gpu):
    """On a faked V100 (fake tensors stand in for its memory, so no kernel can run) backend="triton" refuses bf16
    before touching the device, and still takes fp16; on sm80 it takes bf16."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_gpu((7, 0))
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match=r"bfloat16 on cuda.*sm70 has no bf16; use fp16 or fp32"):
            attention(*fake_cuda_qkv(torch.bfloat16), backend="triton")
        check_triton(fake_cuda_qkv(torch.float16)[0])
        fake_gpu((8, 0))
        check_triton(fake_cuda_qkv(torch.bfloat16)[0])


def test_bf16_on_cpu_stays_allowed_for_the_interpreter():
    q = make_qkv(length=9, dim=32)[0].detach().cpu().to(torch.bfloat16)
    check_triton(q)



# transformers' DistilBERT, RoBERTa and GPT-2 through the attention registry -----------------------------------


@pytest.fixture
def triton_registered():
    register_with_transformers(backend="triton")
    register_with_transformers(backend="triton")  # idempotent
    yield
    register_with_transformers()


def tiny_distilbert(tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    config = DistilBertConfig(vocab_size=100, dim=64, n_heads=2, n_layers=2, hidden_dim=128,
                              max_position_embeddings=32, attn_implementation="sdpa")
    DistilBertForMaskedLM(config).save_pretrained(tmp_path)
    return tmp_path


def logits_and_grads(model, input_ids, attention_mask):
    """The logits of the real tokens and the parameter gradients of a loss over them: what a padding position
    computes is no implementation's contract."""
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    logits = logits[real]
    (logits * torch.linspace(-1, 1, logits.size(-1), device=DEVICE)).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_distilbert_with_fastdistil_attention_matches_sdpa(tmp_path, triton_registered, monkeypatch):
    """from_pretrained(attn_implementation="fastdistil") and set_attn_implementation run the kernel in every
    layer and give SDPA's logits and parameter gradients (eval mode, so no dropout), padding included."""
    from transformers import DistilBertForMaskedLM

    path = tiny_distilbert(tmp_path)
    calls = []
    launcher = kernel_module.attention_forward
    monkeypatch.setattr(kernel_module, "attention_forward", lambda *a: calls.append(1) or launcher(*a))
    input_ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = padding_mask(2, 13, [13, 6]).long()

    sdpa = DistilBertForMaskedLM.from_pretrained(path, attn_implementation="sdpa").to(DEVICE).eval()
    expected_logits, expected_grads = logits_and_grads(sdpa, input_ids, mask)
    fused = DistilBertForMaskedLM.from_pretrained(path, attn_implementation="fastdistil").to(DEVICE).eval()
    assert fused.config._attn_implementation == "fastdistil"
    sdpa.set_attn_implementation("fastdistil")
    for model in (fused, sdpa):
        calls.clear()
        logits, grads = logits_and_grads(model, input_ids, mask)
        assert len(calls) == 2, "the kernel did not run in each of the 2 layers"
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_transformers_hook_hands_other_masks_to_sdpa():
    """A 4-D mask (not a pure key padding mask) goes to transformers' SDPA function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = (x.detach() for x in make_qkv(length=9, dim=32))
    mask = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(0)).to(DEVICE) < 0.7
    mask[..., 0] = True
    module = torch.nn.Module()
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
    actual, _ = _transformers_attention(module, q, k, v, mask, scaling=0.2, backend="triton")
    assert torch.equal(actual, expected)


@pytest.fixture(params=["triton", "sdpa"])
def registered_backend(request):
    """fastdistil's attention registered with transformers on each backend in turn."""
    register_with_transformers(backend=request.param)
    yield request.param
    register_with_transformers()


@pytest.fixture
def attention_calls(registered_backend, monkeypatch):
    """The (padding mask given, is_causal) of each call that reaches fastdistil's Triton launcher or SDPA path."""
    calls = []
    if registered_backend == "triton":
        launcher = kernel_module.attention_forward

        def spy(q, k, v, key_padding_mask, is_causal, *args):
            calls.append((key_padding_mask is not None, is_causal))
            return launcher(q, k, v, key_padding_mask, is_causal, *args)

        monkeypatch.setattr(kernel_module, "attention_forward", spy)
    else:
        sdpa = attention_module._sdpa

        def spy(q, k, v, key_padding_mask, dropout_p, scale, is_causal):
            calls.append((key_padding_mask is not None, is_causal))
            return sdpa(q, k, v, key_padding_mask, dropout_p, scale, is_causal)

        monkeypatch.setattr(attention_module, "_sdpa", spy)
    return calls


FAMILIES = {"gpt2": True, "roberta": False, "distilbert": False}  # is_causal


def tiny_model(family):
    """2 layers, 64 wide (2 heads of 32), a 100-word vocabulary; eval mode, so no dropout."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=2, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(config)
    elif family == "roberta":
        config = transformers.RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=128,
                                            max_position_embeddings=40, attn_implementation="sdpa")
        model = transformers.RobertaForMaskedLM(config)
    else:
        config = transformers.DistilBertConfig(vocab_size=100, dim=64, n_heads=2, n_layers=2, hidden_dim=128,
                                               max_position_embeddings=32, attn_implementation="sdpa")
        model = transformers.DistilBertForMaskedLM(config)
    return model.to(DEVICE).eval()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_models_with_fastdistil_attention_match_sdpa_and_eager(family, padded, registered_backend, attention_calls):
    """attn_implementation="fastdistil" runs fastdistil.attention in both layers, causal for GPT-2 and
    bidirectional for RoBERTa and DistilBERT, with the [B, L] padding mask (None without padding), and gives
    the logits and parameter gradients of transformers' SDPA and eager attention at the real tokens."""
    model = tiny_model(family)
    input_ids = torch.randint(2, 100, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = padding_mask(2, 13, [13, 6]).long() if padded else None
    expected = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        expected[implementation] = logits_and_grads(model, input_ids, mask)
    model.set_attn_implementation("fastdistil")
    logits, grads = logits_and_grads(model, input_ids, mask)
    assert attention_calls == [(padded, FAMILIES[family])] * 2
    for implementation, (expected_logits, expected_grads) in expected.items():
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5, msg=implementation)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=f"{implementation}: {name}")


def test_gpt2_generation_with_a_kv_cache_matches_sdpa(registered_backend, attention_calls, monkeypatch):
    """model.generate on left-padded prompts: the prefill runs fastdistil.attention (causal, with the padding mask)
    in both layers; each decoding step, one query against the cached keys, goes to transformers' SDPA; the
    greedy tokens are those of attn_implementation="sdpa"."""
    from transformers.integrations import sdpa_attention

    model = tiny_model("gpt2")
    input_ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = left_padding_mask(2, 7, [7, 4]).long()
    generate = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(**generate)
    decoding = []
    sdpa = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda module, query, key, *args, **kwargs: decoding.append((query.size(2), key.size(2)))
                        or sdpa(module, query, key, *args, **kwargs))
    model.set_attn_implementation("fastdistil")
    assert torch.equal(model.generate(**generate), expected)
    assert attention_calls == [(True, True)] * 2
    assert decoding == [(1, length) for length in (8, 9, 10) for _ in range(2)]


def test_transformers_mask_builder_passes_only_plain_self_attention():
    """Causal and bidirectional self-attention without a cache offset get the [B, L] padding mask itself (None
    without one); decoding with a cache, a sliding window, or a caller that needs the 4-D mask get SDPA's."""
    from transformers import masking_utils

    padding = padding_mask(2, 6, [6, 3])
    for function in (masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function):
        assert _transformers_mask(2, 6, 6, mask_function=function, attention_mask=padding) is padding
        assert _transformers_mask(2, 6, 6, mask_function=function) is None
    causal = masking_utils.causal_mask_function
    for case in (dict(q_length=1, q_offset=5, mask_function=causal),
                 dict(q_length=6, mask_function=masking_utils.sliding_window_causal_mask_function(3)),
                 dict(q_length=6, mask_function=causal, allow_is_causal_skip=False),
                 dict(q_length=6, mask_function=masking_utils.bidirectional_mask_function,
                      allow_is_bidirectional_skip=False)):
        args = dict(batch_size=2, kv_length=6, attention_mask=padding, device=DEVICE) | case
        mask = _transformers_mask(**args)
        assert mask.dim() == 4 and torch.equal(mask, masking_utils.sdpa_mask(**args)), case


# Full size, GPU only ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_full_size_on_cuda(dtype, dim, is_causal):
    """DistilBERT-like shapes (16 x 12 heads x L = 509, ragged padding, one empty sequence); bf16 is held to the
    same 2x rule as fp16. backend="auto" takes the kernel for fp16/bf16 on sm80+ and matches the direct call."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this GPU")
    q, k, v = make_qkv(batch=16, heads=12, length=509, dim=dim, dtype=dtype)
    lengths = torch.randint(1, 510, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths[3] = 0
    mask = padding_mask(16, 509, lengths)
    got = check_against_oracle(q, k, v, mask, is_causal=is_causal)
    if auto_backend(q.device, dtype, dim)[0] == "triton":
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        for a, b in zip(output_and_grads(attention, q, k, v, grad_out, key_padding_mask=mask, is_causal=is_causal),
                        got):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
def test_dropout_on_cuda(is_causal):
    """The keep mask read back from a bidirectional launch is the causal one's too (it depends on the element's
    index only)."""
    dropout_p = 0.1
    torch.manual_seed(5)
    keep = dropout_keep_mask(8, 12, 128, 128, dropout_p)
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 4 * sigma
    q, k, v = make_qkv(batch=8, heads=12, length=128, dim=128)
    torch.manual_seed(5)
    check_against_oracle(q, k, v, padding_mask(8, 128, [128, 77, 1, 0, 128, 5, 100, 64]), keep=keep,
                         dropout_p=dropout_p, is_causal=is_causal)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_on_cuda(requires_grad, is_causal):
    q, k, v = (x.detach().requires_grad_(requires_grad) for x in make_qkv(length=70, dim=64, dtype=torch.float16))
    mask = padding_mask(2, 70, [33, 0])
    torch.library.opcheck(torch.ops.fastdistil.attention.default, (q, k, v, mask, 0.0, None, is_causal))
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.fastdistil._attention_forward.default,
                          (q, k, v, mask, is_causal, 0.1, 0.125, seed))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compile_fullgraph_matches_eager_on_cuda(dtype, is_causal):
    """torch.compile keeps the op's Triton kernels (opaque custom ops) in the graph, forward and backward."""
    q, k, v = make_qkv(batch=2, heads=4, length=100, dim=64, dtype=dtype)
    mask = padding_mask(2, 100, [100, 37])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def fn(q, k, v, key_padding_mask):
        return torch.ops.fastdistil.attention(q, k, v, key_padding_mask, is_causal=is_causal)

    compiled = output_and_grads(torch.compile(fn, fullgraph=True), q, k, v, grad_out, key_padding_mask=mask)
    for a, b in zip(compiled, output_and_grads(fn, q, k, v, grad_out, key_padding_mask=mask)):
        torch.testing.assert_close(a, b)
