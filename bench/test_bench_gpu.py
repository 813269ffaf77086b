"""GPU benchmarks of the Triton kernels and the fused paths against their baselines, timed with
triton.testing.do_bench; with FASTDISTIL_BENCH_TINY=1 and no CUDA, their dry run on CPU tensors.

Triple loss, N = 8192 token rows at V = 30522 (test_bench_triple_loss's inputs: 10 % padding, 15 % labelled
rows), fp32, bf16 and fp16, providers:
  triton    fastdistil.triple_loss: the Triton kernel through torch.ops.fastdistil.triple_loss
  eager     fastdistil.triple_loss_reference, the recipe's unfused loss
  compiled  torch.compile(triple_loss_reference), one static-shape compile per dtype shared by both modes
  liger     Liger-Kernel's KL (LigerKLDIVLoss, on log_softmax/softmax at T computed in torch, since it takes
            log-probabilities) and cross-entropy (LigerCrossEntropyLoss), the cosine term in torch; only when
            liger_kernel is importable. Its cross-entropy writes its gradient over the student logits, so it gets
            its own copy of them, and from the second repetition on it reads that gradient: the same bytes,
            values these kernels' time does not depend on.
Modes: forward (for triton this already computes the gradient) and full (forward + backward); backward is their
difference (bench/report.py computes it): the fused op scales its saved gradient in place, so its graph cannot
be backpropagated twice to time backward alone.

Vocabulary projection + triple loss at bert-base's shapes, N = 8192, D = 768, V = 30522
(test_bench_fused_linear's inputs and providers), bf16 and fp16, forward + backward, time and peak extra memory:
  fused_linear   fastdistil.fused_linear_triple_loss, chunks of rows projected and fed to the loss kernel
  project_fused  both models' logits, then fastdistil.triple_loss (the Triton kernel on CUDA)
  reference      both models' logits, then the recipe's unfused loss

Attention at DistilBERT's B x H x L x Dh = 32 x 12 x 512 x 64, fp16/bf16, dense and with a key padding mask (the
last 10 % of every sequence), without dropout and with p = 0.1, providers triton (fastdistil.attention's
kernel), sdpa_flash and sdpa_efficient (PyTorch SDPA restricted to one backend; flash takes no mask); modes
forward and backward (timed alone, retain_graph).

    python -m pytest bench/test_bench_gpu.py --durations=0 --benchmark-json bench/results/gpu.json
    python -m pytest bench/test_bench_gpu.py -k "attention and bf16"     # a subset
    FASTDISTIL_BENCH_TINY=1 python -m pytest bench/test_bench_gpu.py     # the dry run, without a GPU

do_bench clears the L2 cache before every repetition and returns the median and the 20/80 % quantiles, which go
to extra_info (median_ms, p20_ms, p80_ms) with the achieved rate: for the loss GB/s = 3 * N * V * bytes / time
(its traffic floor: both logit tensors read and the gradient written once) and its fraction of the device's
DRAM bandwidth (triton.testing.get_dram_gbps; None where the driver reports no memory clock); for the fused
linear TFLOP/s of its four [N, D] x [D, V] products; for attention TFLOP/s from the dense FLOP count
4 * B * H * L^2 * Dh forward, 2.5x that backward (FlashAttention's convention, also with padding). There is no
peak TFLOP/s: Triton's get_max_tensorcore_tflops models Ampere only; compare against the datasheet. Peak extra
memory (loss and fused linear) is one more call under torch.cuda's peak counter (bench/memory.py).
pytest-benchmark's own statistics are the wall time of one whole measurement (one round), not the op's time.
Every result carries the GPU, driver, CUDA, torch and Triton (bench/gpu.py) and its case's wall time
(case_wall_s).

On CUDA a loss or fused-linear case whose dispatch does not reach the Triton kernel (fastdistil._C not built,
Triton's kernels failing to import) fails, naming the fix, instead of timing the reference under the kernel's
name (test_triton_loss_cases_fail_without_the_extension, not a benchmark, checks that); bf16 on a GPU without
it, flash attention with a mask and a missing Liger-Kernel skip.

Time budget: all of these plus the training step must take at most ~150 s on one H100. Not measured yet (no GPU
so far); estimated from do_bench's defaults, ~0.15-0.3 s per case whatever the op's time (25 ms warm-up, 100 ms
of repetitions, a 256 MB L2 flush before each), plus the one-off work: triple loss ~40 s (18 timed cases ~5 s,
the inputs ~3 s, three inductor compiles of the reference ~10-15 s each, Triton's JIT of the kernel per dtype
~1-2 s each), fused linear ~5 s (6 cases, each ~1.5 TFLOP of products, a few ms), attention ~35 s (40 cases
~10 s; Triton's JIT of 8 forward and 8 backward kernel variants ~25 s), and ~10 s of start-up;
test_bench_train_step.py on CUDA ~30 s more. Left out to fit: every N but 8192 (the kernel's GB/s no longer
changes with N once [N, V] is hundreds of MB), fp32 for the fused linear and attention (training runs
bf16/fp16; fp32 attention goes to SDPA anyway), attention's forward + backward mode (the sum of the two timed),
and the CPU suite's fused_cold/fused_out variants. The first GPU run's case_wall_s replace these estimates
(bench/report.py sums them per group).

Dry run (FASTDISTIL_BENCH_TINY=1, no CUDA; scripts/gpu_check.sh --dry-run): every case at tiny shapes on CPU
tensors (N = 128 rows with a 1021-word vocabulary, attention 2 x 2 x 64 x 64), the Triton kernels in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1 before anything imports Triton), timed with time.perf_counter
(DRY_RUN_CALLS calls after one warm-up: do_bench needs a GPU), the compiled reference through the
aot_eager backend (dynamo and AOT autograd without inductor's code generation, which takes minutes on two
cores), SDPA allowed to fall back to its math kernel (CPU has no memory-efficient kernel and no flash kernel
with dropout), and the peak bandwidth replaced by this CPU's measured copy bandwidth. The fused linear's
chunks run the C++ loss kernel there, not Triton. The JSON has the same fields, with device "cpu"; the numbers
only show that everything runs. It takes ~50 s on two shared cores, most of it the interpreted loss kernel.
"""

import functools
import os
import time

import pytest
import torch

TINY = os.environ.get("FASTDISTIL_BENCH_TINY", "0") == "1"
if not (torch.cuda.is_available() or TINY):
    pytest.skip("GPU benchmarks need CUDA (FASTDISTIL_BENCH_TINY=1 runs their dry run on CPU)",
                allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import fastdistil  # noqa: E402
from fastdistil import env, extension  # noqa: E402
from fastdistil.ops.attention import auto_backend  # noqa: E402

from bench import test_bench_fused_linear as linear_bench  # noqa: E402
from bench.gpu import device_facts  # noqa: E402
from bench.memory import peak_extra_bytes  # noqa: E402
from bench.test_bench_triple_loss import ARGS, V, make_inputs  # noqa: E402

try:
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss
except ImportError:
    LigerCrossEntropyLoss = LigerKLDIVLoss = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DRY_RUN = DEVICE.type != "cuda"
VOCAB = 1021 if TINY else V  # tiny: prime, so that the kernels' tail handling still runs
QUANTILES = [0.5, 0.2, 0.8]
DRY_RUN_CALLS = 1  # the interpreter takes seconds per loss call: the dry run shows that timing works, no more
COMPILE_BACKEND = "aot_eager" if DRY_RUN else "inductor"

LOSS_N = 128 if TINY else 8192
LOSS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_PROVIDERS = ("triton", "eager", "compiled", "liger")
LOSS_MODES = ("forward", "full")

LINEAR_N = 128 if TINY else 8192
LINEAR_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

ATTN_SHAPE = (2, 2, 64, 64) if TINY else (32, 12, 512, 64)  # B, H, L, Dh
ATTN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ATTN_DROPOUTS = {"nodropout": 0.0, "dropout0.1": 0.1}
ATTN_PROVIDERS = ("triton", "sdpa_flash", "sdpa_efficient")
ATTN_MODES = ("forward", "backward")
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
PAD_FRACTION = 0.10


def time_ms(fn, grad_to_none=()) -> dict:
    """median_ms, p20_ms, p80_ms of fn() and the timer that measured them: triton.testing.do_bench on CUDA,
    else the wall time of DRY_RUN_CALLS calls after one warm-up."""
    if not DRY_RUN:
        times = triton.testing.do_bench(fn, quantiles=QUANTILES, grad_to_none=list(grad_to_none))
        timer = "triton.testing.do_bench"
    else:
        calls = []
        for _ in range(1 + DRY_RUN_CALLS):
            for x in grad_to_none:
                x.grad = None
            start = time.perf_counter()
            fn()
            calls.append((time.perf_counter() - start) * 1e3)
        times = torch.tensor(calls[1:], dtype=torch.float64).quantile(
            torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        timer = f"time.perf_counter, {DRY_RUN_CALLS} call(s) after a warm-up (dry run)"
    return dict(zip(("median_ms", "p20_ms", "p80_ms"), times), timer=timer)


def measure(benchmark, group: str, run, **info) -> dict:
    """run() -> time_ms's results, called once under benchmark.pedantic so that the JSON holds them, with the
    device's facts and `info`; out of memory skips."""
    benchmark.group = group
    try:
        result = benchmark.pedantic(run, rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory: {exc}")
    benchmark.extra_info.update(result, **device_facts(DEVICE), tiny=TINY, **info)
    return result


def skip_unsupported_bf16(dtype: torch.dtype) -> None:
    if (not DRY_RUN and dtype == torch.bfloat16
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        pytest.skip(f"no bf16 on {env.compute_capability(DEVICE)}")


def require_triton_loss(dtype: torch.dtype) -> None:
    """Fails the case unless fastdistil.triple_loss reaches the Triton kernel for `dtype` on DEVICE: any other
    choice of the dispatch (the unfused reference, when fastdistil._C is not built) would be timed under the
    kernel's name."""
    impl, why = env.triple_loss_backend(DEVICE, dtype)
    if impl != "Triton kernel":
        fix = f" {extension.HOW_TO_FIX}" if not extension.AVAILABLE else ""
        pytest.fail(f"fastdistil.triple_loss runs the {impl} on {DEVICE}, not the Triton kernel: {why}.{fix}")


@pytest.fixture
def peak_gbps(request) -> tuple[float | None, str]:
    """(GB/s or None, where it comes from) that a bandwidth-bound case is compared with."""
    if not DRY_RUN:
        return device_facts(DEVICE)["peak_dram_gbps"], "triton.testing.get_dram_gbps"
    return request.getfixturevalue("copy_bandwidth") / 1e9, "this CPU's copy bandwidth (bench/bandwidth.py)"


def on_device(inputs: dict, dtype: torch.dtype) -> dict:
    """A CPU suite's fp32 inputs cast to `dtype` on DEVICE (that suite's bf16 inputs are the same values
    cast), the vocabulary cut to VOCAB, and the tensors it differentiates leaves again."""
    moved = {}
    for name, x in inputs.items():
        if name == "labels":
            x = torch.where(x == -100, x, x % VOCAB)
        elif name.endswith("_logits"):
            x = x[..., :VOCAB]
        elif name.endswith(("_weight", "_bias")):
            x = x[:VOCAB]
        y = x.detach().to(DEVICE, dtype=dtype if x.is_floating_point() else x.dtype).contiguous()
        moved[name] = y.requires_grad_(x.requires_grad)
    return moved


def clear_grads(tensors) -> None:
    for x in tensors:
        x.grad = None


# Triple loss ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)  # cases run grouped by dtype: keep one set of device inputs alive
def loss_inputs(dtype_name: str) -> dict:
    return on_device(make_inputs(LOSS_N, "fp32"), LOSS_DTYPES[dtype_name])


@functools.lru_cache(maxsize=1)  # a compile costs tens of seconds on a GPU: one per dtype, for both modes
def compiled_reference(dtype_name: str):
    torch._dynamo.reset()
    return torch.compile(fastdistil.triple_loss_reference, dynamic=False, backend=COMPILE_BACKEND)


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
    # The benchmarks run the recipe (alpha_mse 0): loss_mse is not a term here.
    return fastdistil.TripleLossOutput(loss, loss_ce, loss_mlm, loss_cos, loss.new_zeros(()))


def loss_function(provider: str, dtype_name: str):
    if provider == "triton":
        if DRY_RUN:  # the kernel itself on CPU tensors, in Triton's interpreter
            return functools.partial(fastdistil.triple_loss, backend="triton")
        require_triton_loss(LOSS_DTYPES[dtype_name])
        return fastdistil.triple_loss
    if provider == "eager":
        return fastdistil.triple_loss_reference
    if provider == "compiled":
        return compiled_reference(dtype_name)
    if LigerKLDIVLoss is None:
        pytest.skip("liger_kernel is not installed")
    return liger_triple_loss


LOSS_CASES = [(dtype, provider, mode) for dtype in LOSS_DTYPES for provider in LOSS_PROVIDERS for mode in LOSS_MODES]


@pytest.mark.parametrize("dtype,provider,mode", LOSS_CASES,
                         ids=[f"loss-{dtype}-{provider}-{mode}" for dtype, provider, mode in LOSS_CASES])
def test_triple_loss(benchmark, peak_gbps, dtype, provider, mode):
    skip_unsupported_bf16(LOSS_DTYPES[dtype])
    loss_fn = loss_function(provider, dtype)
    inputs = dict(loss_inputs(dtype))
    if provider == "liger":  # its cross-entropy overwrites the student logits: not the shared ones
        inputs["student_logits"] = inputs["student_logits"].detach().clone().requires_grad_()
    leaves = (inputs["student_logits"], inputs["student_hidden"])

    def forward():
        return loss_fn(**inputs, **ARGS).loss

    def full():
        forward().backward()

    call = forward if mode == "forward" else full
    result = measure(benchmark, f"gpu triple_loss {dtype} N={LOSS_N} {mode}", lambda: time_ms(call, leaves))
    clear_grads(leaves)
    peak = peak_extra_bytes(call, device=DEVICE)  # the gradients a full call leaves count: a step holds them
    clear_grads(leaves)
    floor_bytes = 3 * LOSS_N * VOCAB * LOSS_DTYPES[dtype].itemsize
    gbps = floor_bytes / result["median_ms"] / 1e6
    peak_rate, peak_source = peak_gbps
    benchmark.extra_info.update(
        op="triple_loss", N=LOSS_N, V=VOCAB, dtype=dtype, provider=provider, mode=mode, floor_bytes=floor_bytes,
        gbps=gbps, peak_gbps=peak_rate, peak_source=peak_source,
        fraction_of_peak=gbps / peak_rate if peak_rate else None,
        peak_extra_bytes=peak, compile_backend=COMPILE_BACKEND if provider == "compiled" else None)


def test_triton_loss_cases_fail_without_the_extension(monkeypatch):
    """Without fastdistil._C the dispatch runs the reference; the triton cases must then fail, saying how to
    build it, rather than skip (the defect of the first version of this file)."""
    monkeypatch.setattr(extension, "AVAILABLE", False)
    with pytest.raises(pytest.fail.Exception, match=r"unfused reference.*pip install --no-build-isolation -e \."):
        require_triton_loss(torch.float32)


# Vocabulary projection + triple loss ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def linear_inputs(dtype_name: str) -> dict:
    return on_device(linear_bench.make_inputs(LINEAR_N, "fp32"), LINEAR_DTYPES[dtype_name])


LINEAR_CASES = [(dtype, provider) for dtype in LINEAR_DTYPES for provider in linear_bench.PROVIDERS]


@pytest.mark.parametrize("dtype,provider", LINEAR_CASES,
                         ids=[f"fused_linear-{dtype}-{provider}" for dtype, provider in LINEAR_CASES])
def test_fused_linear(benchmark, dtype, provider):
    skip_unsupported_bf16(LINEAR_DTYPES[dtype])
    if provider != "reference" and not DRY_RUN:
        require_triton_loss(LINEAR_DTYPES[dtype])
    inputs = linear_inputs(dtype)
    step, _ = linear_bench.make_step(provider, inputs)
    leaves = [x for x in inputs.values() if x.requires_grad]
    result = measure(benchmark, f"gpu fused_linear {dtype} N={LINEAR_N}", lambda: time_ms(step, leaves))
    clear_grads(leaves)
    peak = peak_extra_bytes(step, device=DEVICE)
    clear_grads(leaves)
    dim = linear_bench.D
    flops = 8 * LINEAR_N * dim * VOCAB  # both models' logits, the student's input and weight gradients
    benchmark.extra_info.update(
        op="fused_linear", N=LINEAR_N, V=VOCAB, D=dim, dtype=dtype, provider=provider, mode="full",
        peak_extra_bytes=peak, nv_fp32_bytes=LINEAR_N * VOCAB * 4, matmul_flops=flops,
        tflops=flops / result["median_ms"] / 1e9)


# Attention --------------------------------------------------------------------------------------------------


def attention_function(provider: str, dtype: torch.dtype, masked: bool, dropout_p: float):
    """(attend(q, k, v, key_padding_mask), the SDPA backends it may use or None)."""
    if provider == "triton":
        if not DRY_RUN:
            backend, why = auto_backend(DEVICE, dtype, ATTN_SHAPE[-1])
            if backend != "triton":
                pytest.skip(f"attention runs {backend} here: {why}")
        return functools.partial(fastdistil.attention, dropout_p=dropout_p, backend="triton"), None
    if provider == "sdpa_flash":
        if masked:
            pytest.skip("SDPA's flash kernel takes no attention mask")
        if not DRY_RUN and torch.cuda.get_device_capability(DEVICE)[0] < 8:
            pytest.skip(f"SDPA's flash kernel needs sm80, this is {env.compute_capability(DEVICE)}")
    backends = [SDPA_BACKENDS[provider]] + ([SDPBackend.MATH] if DRY_RUN else [])

    def attend(q, k, v, key_padding_mask):
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    return attend, backends


ATTN_CASES = [(dtype, masked, dropout, provider, mode) for dtype in ATTN_DTYPES for masked in (False, True)
              for dropout in ATTN_DROPOUTS for provider in ATTN_PROVIDERS for mode in ATTN_MODES]


@pytest.mark.parametrize("dtype,masked,dropout,provider,mode", ATTN_CASES,
                         ids=[f"attention-{dtype}-{'masked' if masked else 'dense'}-{dropout}-{provider}-{mode}"
                              for dtype, masked, dropout, provider, mode in ATTN_CASES])
def test_attention(benchmark, dtype, masked, dropout, provider, mode):
    skip_unsupported_bf16(ATTN_DTYPES[dtype])
    dropout_p = ATTN_DROPOUTS[dropout]
    attend, backends = attention_function(provider, ATTN_DTYPES[dtype], masked, dropout_p)
    batch, heads, length, head_dim = ATTN_SHAPE
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(ATTN_SHAPE, generator=gen, device=DEVICE, dtype=ATTN_DTYPES[dtype]).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn_like(q)
    real_length = length - round(PAD_FRACTION * length)
    mask = (torch.arange(length, device=DEVICE) < real_length).expand(batch, length) if masked else None

    if mode == "forward":
        call, leaves = (lambda: attend(q, k, v, mask)), ()
    else:
        out = attend(q, k, v, mask)
        call, leaves = (lambda: out.backward(grad_out, retain_graph=True)), (q, k, v)
    group = f"gpu attention {dtype} {'masked' if masked else 'dense'} p={dropout_p} {mode}"
    result = measure(benchmark, group, lambda: time_ms(call, leaves))
    flops = 4 * batch * heads * length**2 * head_dim * (1.0 if mode == "forward" else 2.5)
    benchmark.extra_info.update(
        op="attention", B=batch, H=heads, L=length, Dh=head_dim, dtype=dtype, masked=masked, dropout_p=dropout_p,
        provider=provider, mode=mode, flops=flops, tflops=flops / result["median_ms"] / 1e9,
        sdpa_backends=[b.name for b in backends] if backends else None)
