"""GPU benchmarks of the Triton kernels against their baselines, timed with triton.testing.do_bench. Without
CUDA the whole module skips; nothing here has been run yet (the development machine has no GPU).

Triple loss at V = 30522 (the inputs of test_bench_triple_loss: 10 % padding, 15 % labelled rows), providers:
  triton    fastdistil.triple_loss: the Triton kernel through torch.ops.fastdistil.triple_loss
  eager     fastdistil.triple_loss_reference, the recipe's unfused loss
  compiled  torch.compile(triple_loss_reference)
  liger     Liger-Kernel's KL (LigerKLDIVLoss, on log_softmax/softmax at T computed in torch, since it takes
            log-probabilities) and cross-entropy (LigerCrossEntropyLoss), the cosine term in torch; only when
            liger_kernel is importable. Its cross-entropy writes its gradient over the student logits, so it gets
            its own copy of them, and from the second repetition on it reads that gradient: the same bytes,
            values these kernels' time does not depend on.
Modes: forward (for triton this already computes the gradient), full (forward + backward), and backward, which
is full minus forward: the fused op scales its saved gradient in place, so its graph cannot be backpropagated
twice, and all providers are measured the same way.

Attention at DistilBERT's B x H x L x Dh = 32 x 12 x 512 x 64, fp16/bf16, without and with a key padding mask
(the last 10 % of every sequence), providers triton (fastdistil.attention's kernel), sdpa_flash and
sdpa_efficient (PyTorch SDPA restricted to one backend; flash takes no mask); modes forward, backward (timed
alone, retain_graph) and full.

    python -m pytest bench/test_bench_gpu.py --benchmark-json bench/results/gpu.json
    python -m pytest bench/test_bench_gpu.py -k "attention and bf16"     # a subset

do_bench clears the L2 cache before every repetition and returns the median and the 20/80 % quantiles, which go
to extra_info (median_ms, p20_ms, p80_ms) with the achieved rate: for the loss GB/s = 3 * N * V * bytes / time
(its traffic floor: both logit tensors read and the gradient written once) and its fraction of the device's
DRAM bandwidth (triton.testing.get_dram_gbps); for attention TFLOP/s from the dense FLOP count 4 * B * H * L^2
* Dh forward, 2.5x that backward (FlashAttention's convention, also with padding). There is no peak TFLOP/s:
Triton's get_max_tensorcore_tflops models Ampere only; compare against the datasheet. pytest-benchmark's own
statistics are the wall time of the do_bench call (one round), not the op's time.
"""

import functools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import fastdistil  # noqa: E402
from fastdistil import env  # noqa: E402
from fastdistil.attention import auto_backend  # noqa: E402
from test_bench_triple_loss import ARGS, V, make_inputs  # noqa: E402

try:
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss
except ImportError:
    LigerCrossEntropyLoss = LigerKLDIVLoss = None

DEVICE = torch.device("cuda")
MODES = ("forward", "backward", "full")
LOSS_NS = (4096, 16384)
LOSS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSS_PROVIDERS = ("triton", "eager", "compiled", "liger")
ATTN_SHAPE = (32, 12, 512, 64)  # B, H, L, Dh
ATTN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ATTN_PROVIDERS = ("triton", "sdpa_flash", "sdpa_efficient")
PAD_FRACTION = 0.10
QUANTILES = [0.5, 0.2, 0.8]


def do_bench(fn, grad_to_none=()) -> dict:
    median, p20, p80 = triton.testing.do_bench(fn, quantiles=QUANTILES, grad_to_none=list(grad_to_none))
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80)


def gpu_info() -> dict:
    major, minor = torch.cuda.get_device_capability(DEVICE)
    return dict(gpu=torch.cuda.get_device_name(DEVICE), capability=f"sm{major}{minor}", torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton.__version__)


def skip_unsupported_bf16(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f"no bf16 on {env.compute_capability(DEVICE)}")


def measure(benchmark, run) -> dict:
    """run() -> do_bench results, called once under benchmark.pedantic so that the JSON holds them; out of
    memory skips (the unfused reference at N = 16384 in fp32 needs tens of GB)."""
    try:
        result = benchmark.pedantic(run, rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory: {exc}")
    benchmark.extra_info.update(result, **gpu_info())
    return result


# Triple loss ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)  # cases run grouped by (N, dtype): keep one set of GPU inputs alive
def loss_inputs(n: int, dtype_name: str) -> dict:
    inputs = {name: x.detach().to(DEVICE) for name, x in make_inputs(n, dtype_name).items()}
    for name in ("student_logits", "student_hidden"):
        inputs[name].requires_grad_()
    return inputs


def liger_triple_loss(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                      temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask):
    """The reference's terms, KL and cross-entropy by Liger-Kernel (rows as the reference selects them)."""
    vocab = student_logits.size(-1)
    real = attention_mask.reshape(-1).bool()
    selected = labels.reshape(-1) != -100 if restrict_ce_to_mask else real
    s = student_logits.reshape(-1, vocab)
    s_sel, t_sel = s[selected].float(), teacher_logits.reshape(-1, vocab)[selected].float()
    loss_ce = LigerKLDIVLoss(reduction="batchmean")(
        F.log_softmax(s_sel / temperature, dim=-1), F.softmax(t_sel / temperature, dim=-1)) * temperature**2
    loss_mlm = LigerCrossEntropyLoss(ignore_index=-100)(s, labels.reshape(-1))
    hs = student_hidden.reshape(-1, student_hidden.size(-1))[real].float()
    ht = teacher_hidden.reshape(-1, teacher_hidden.size(-1))[real].float()
    loss_cos = F.cosine_embedding_loss(hs, ht, hs.new_ones(hs.size(0)))
    loss = alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_cos * loss_cos
    return fastdistil.TripleLossOutput(loss, loss_ce, loss_mlm, loss_cos)


def loss_function(provider: str, dtype: torch.dtype):
    if provider == "triton":
        impl, why = env.triple_loss_backend(DEVICE, dtype)
        if impl != "Triton kernel":
            pytest.skip(f"triple_loss runs the {impl} here: {why}")
        return fastdistil.triple_loss
    if provider == "eager":
        return fastdistil.triple_loss_reference
    if provider == "compiled":
        torch._dynamo.reset()  # a fresh, static-shape compile for this (N, dtype)
        return torch.compile(fastdistil.triple_loss_reference, dynamic=False)
    if LigerKLDIVLoss is None:
        pytest.skip("liger_kernel is not installed")
    return liger_triple_loss


LOSS_CASES = [(n, dtype, provider, mode) for n in LOSS_NS for dtype in LOSS_DTYPES for provider in LOSS_PROVIDERS
              for mode in MODES]


@pytest.mark.parametrize("n,dtype,provider,mode", LOSS_CASES,
                         ids=[f"loss-N{n}-{dtype}-{provider}-{mode}" for n, dtype, provider, mode in LOSS_CASES])
def test_triple_loss(benchmark, n, dtype, provider, mode):
    skip_unsupported_bf16(LOSS_DTYPES[dtype])
    loss_fn = loss_function(provider, LOSS_DTYPES[dtype])
    inputs = dict(loss_inputs(n, dtype))
    if provider == "liger":  # its cross-entropy overwrites the student logits: not the shared ones
        inputs["student_logits"] = inputs["student_logits"].detach().clone().requires_grad_()
    leaves = (inputs["student_logits"], inputs["student_hidden"])

    def forward():
        return loss_fn(**inputs, **ARGS).loss

    def full():
        forward().backward()

    def run():
        timings = {"forward": do_bench(forward), "full": do_bench(full, grad_to_none=leaves)}
        if mode != "backward":
            return timings[mode]
        return dict(median_ms=timings["full"]["median_ms"] - timings["forward"]["median_ms"])

    benchmark.group = f"gpu triple_loss {dtype} N={n} {mode}"
    result = measure(benchmark, run)
    for leaf in leaves:
        leaf.grad = None
    floor_bytes = 3 * n * V * LOSS_DTYPES[dtype].itemsize
    benchmark.extra_info.update(N=n, V=V, dtype=dtype, provider=provider, mode=mode, floor_bytes=floor_bytes,
                                peak_gbps=triton.testing.get_dram_gbps())
    if mode != "backward":  # the floor is the whole op's traffic; the fused backward moves no [N, V] bytes
        gbps = floor_bytes / result["median_ms"] / 1e6
        benchmark.extra_info.update(gbps=gbps, fraction_of_peak=gbps / benchmark.extra_info["peak_gbps"])


# Attention --------------------------------------------------------------------------------------------------


def sdpa_with(backend: SDPBackend):
    def attend(q, k, v, key_padding_mask):
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return attend


def attention_function(provider: str, dtype: torch.dtype, masked: bool):
    major, _ = torch.cuda.get_device_capability(DEVICE)
    if provider == "triton":
        backend, why = auto_backend(DEVICE, dtype, ATTN_SHAPE[-1])
        if backend != "triton":
            pytest.skip(f"attention runs {backend} here: {why}")
        return functools.partial(fastdistil.attention, backend="triton")
    if provider == "sdpa_efficient":
        return sdpa_with(SDPBackend.EFFICIENT_ATTENTION)
    if major < 8:
        pytest.skip(f"SDPA's flash kernel needs sm80, this is {env.compute_capability(DEVICE)}")
    if masked:
        pytest.skip("SDPA's flash kernel takes no attention mask")
    return sdpa_with(SDPBackend.FLASH_ATTENTION)


ATTN_CASES = [(dtype, masked, provider, mode) for dtype in ATTN_DTYPES for masked in (False, True)
              for provider in ATTN_PROVIDERS for mode in MODES]


@pytest.mark.parametrize("dtype,masked,provider,mode", ATTN_CASES,
                         ids=[f"attention-{dtype}-{'masked' if masked else 'dense'}-{provider}-{mode}"
                              for dtype, masked, provider, mode in ATTN_CASES])
def test_attention(benchmark, dtype, masked, provider, mode):
    skip_unsupported_bf16(ATTN_DTYPES[dtype])
    attend = attention_function(provider, ATTN_DTYPES[dtype], masked)
    batch, heads, length, head_dim = ATTN_SHAPE
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(ATTN_SHAPE, generator=gen, device=DEVICE, dtype=ATTN_DTYPES[dtype]).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn_like(q)
    real_length = length - round(PAD_FRACTION * length)
    mask = (torch.arange(length, device=DEVICE) < real_length).expand(batch, length) if masked else None

    def full():
        attend(q, k, v, mask).backward(grad_out)

    if mode == "forward":
        run = functools.partial(do_bench, lambda: attend(q, k, v, mask))
    elif mode == "full":
        run = functools.partial(do_bench, full, grad_to_none=(q, k, v))
    else:
        out = attend(q, k, v, mask)
        run = functools.partial(do_bench, lambda: out.backward(grad_out, retain_graph=True), grad_to_none=(q, k, v))

    benchmark.group = f"gpu attention {dtype} {'masked' if masked else 'dense'} {mode}"
    result = measure(benchmark, run)
    forward_flops = 4 * batch * heads * length**2 * head_dim
    flops = forward_flops * {"forward": 1.0, "backward": 2.5, "full": 3.5}[mode]
    benchmark.extra_info.update(B=batch, H=heads, L=length, Dh=head_dim, dtype=dtype, masked=masked,
                                provider=provider, mode=mode, flops=flops,
                                tflops=flops / result["median_ms"] / 1e9)
