"""Forward+backward time and peak extra memory of the triple loss at BERT's vocabulary.

Providers, each measured side by side on the same inputs:
  fused      fastdistil.triple_loss(..., backend="cpp"), then loss.backward(): what a user calls every step;
             from the second call on, the op's gradient reuses the buffer the previous one freed.
  fused_cold the same with the op's idle gradient buffer freed before every call: the first step's cost,
             which allocates and page-faults a fresh [N, V] gradient.
  fused_out  torch.ops.fastdistil.triple_loss_out into gradient buffers allocated once outside the timing
             (a trainer reusing its workspace): the kernel without allocating and first-touching [N, V].
  eager      fastdistil.triple_loss_reference forward+backward, the recipe's unfused loss.
  compiled   torch.compile(triple_loss_reference), compiled and warmed up before timing.

    python -m pytest bench/test_bench_triple_loss.py --benchmark-json bench/results/triple_loss.json
    python -m pytest bench/test_bench_triple_loss.py -k "512 or 2048"     # quick subset; N is in every test id
    python -m bench.report    # its triple-loss section, in bench/results/REPORT.md

Every result's extra_info holds N, V, D, dtype, provider, the peak extra memory of one call (bench/memory.py),
the size of one [N, V] fp32 tensor, the traffic floor 3*N*V*itemsize and the machine's copy bandwidth.
"""

import functools

import pytest
import torch

import fastdistil

from bench.machine import CpuContention, load_average
from bench.memory import peak_extra_bytes

V = 30522  # bert-base-uncased's vocabulary: not a multiple of any power-of-two block
D = 768
SEQ_LEN = 128  # N = batch * SEQ_LEN token rows
PAD_FRACTION = 0.10
LABELLED_FRACTION = 0.15
LOGIT_STD = 3.0
NS = (512, 2048, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("fused", "fused_cold", "fused_out", "eager", "compiled")
ARGS = dict(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=False)

# (rounds, warmup_rounds). The unfused reference takes seconds per call at N = 8192, the fused op a fraction.
SLOW_ROUNDS = {512: (10, 2), 2048: (5, 1), 8192: (3, 1)}
FAST_ROUNDS = {512: (30, 3), 2048: (15, 2), 8192: (6, 1)}

CASES = [(n, dtype, provider) for n in NS for dtype in DTYPES for provider in PROVIDERS]


@functools.lru_cache(maxsize=1)  # cases run grouped by (N, dtype); keep only the current inputs alive
def make_inputs(n: int, dtype_name: str) -> dict:
    """Realistic inputs: logits ~ N(0, 3^2), the tail 10 % of each sequence padding, 15 % of the rows labelled
    (drawn among the real tokens), as [batch, seq, ...] tensors the way a model returns them."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(n)
    batch = n // SEQ_LEN
    student_logits = (torch.randn(batch, SEQ_LEN, V, generator=gen) * LOGIT_STD).to(dtype).requires_grad_()
    teacher_logits = (torch.randn(batch, SEQ_LEN, V, generator=gen) * LOGIT_STD).to(dtype)
    student_hidden = torch.randn(batch, SEQ_LEN, D, generator=gen).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(batch, SEQ_LEN, D, generator=gen).to(dtype)
    real_len = SEQ_LEN - round(PAD_FRACTION * SEQ_LEN)
    attention_mask = (torch.arange(SEQ_LEN) < real_len).expand(batch, SEQ_LEN).to(torch.int64)
    real_rows = attention_mask.reshape(-1).nonzero().squeeze(1)
    n_labelled = round(LABELLED_FRACTION * n)
    labelled = real_rows[torch.randperm(real_rows.numel(), generator=gen)[:n_labelled]]
    labels = torch.full((n,), -100, dtype=torch.int64)
    labels[labelled] = torch.randint(0, V, (n_labelled,), generator=gen)
    labels = labels.view(batch, SEQ_LEN)
    return dict(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
                student_hidden=student_hidden, teacher_hidden=teacher_hidden, attention_mask=attention_mask)


def make_step(provider: str, inputs: dict):
    """The callable to time (one forward+backward, or one triple_loss_out call) and its pre-round reset."""
    s, hs = inputs["student_logits"], inputs["student_hidden"]

    def clear_grads():
        s.grad = None
        hs.grad = None

    if provider == "fused_out":
        # The workspace a trainer keeps across steps: allocated and touched once, outside the timing.
        grad_logits = torch.zeros_like(s, memory_format=torch.contiguous_format)
        grad_hidden = torch.zeros_like(hs, memory_format=torch.contiguous_format)
        args = (s.detach(), inputs["teacher_logits"], inputs["labels"], hs.detach(), inputs["teacher_hidden"],
                inputs["attention_mask"], *ARGS.values())

        def step():
            return torch.ops.fastdistil.triple_loss_out(
                *args, grad_student_logits=grad_logits, grad_student_hidden=grad_hidden)[0]

        return step, clear_grads

    if provider in ("fused", "fused_cold"):
        loss_fn = functools.partial(fastdistil.triple_loss, backend="cpp")
    elif provider == "eager":
        loss_fn = fastdistil.triple_loss_reference
    elif provider == "compiled":
        torch._dynamo.reset()  # a fresh, static-shape compile for this (N, dtype), not a dynamic recompile
        loss_fn = torch.compile(fastdistil.triple_loss_reference, dynamic=False)
    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step():
        loss = loss_fn(**inputs, **ARGS).loss
        loss.backward()
        return loss.detach()

    if provider == "fused_cold":
        def clear_grads_and_cache():
            clear_grads()
            fastdistil.extension._C.release_gradient_cache()

        return step, clear_grads_and_cache
    return step, clear_grads


@pytest.mark.parametrize(
    "n,dtype,provider", CASES, ids=[f"N{n}-{dtype}-{provider}" for n, dtype, provider in CASES]
)
def test_triple_loss(benchmark, copy_bandwidth, n, dtype, provider):
    if provider.startswith("fused") and not fastdistil.extension.AVAILABLE:
        pytest.skip(f"fastdistil._C is not loaded ({fastdistil.extension.ERROR})")
    inputs = make_inputs(n, dtype)
    step, clear_grads = make_step(provider, inputs)

    clear_grads()
    loss = float(step())  # compiles (compiled), faults pages in; also a parity glance in the results
    clear_grads()
    # One call under the profiler, after warm-up so compilation is not counted. The gradients the call leaves
    # behind count: they are memory the step holds.
    peak = peak_extra_bytes(step)
    clear_grads()

    itemsize = torch.finfo(DTYPES[dtype]).bits // 8
    floor_bytes = 3 * n * V * itemsize
    mask = inputs["attention_mask"]
    benchmark.group = f"triple_loss {dtype} N={n}"
    benchmark.extra_info.update(
        N=n, V=V, D=D, dtype=dtype, provider=provider,
        peak_extra_bytes=peak,
        nv_fp32_bytes=n * V * 4,
        floor_bytes=floor_bytes,
        copy_bandwidth_bytes_per_s=copy_bandwidth,
        floor_ms=floor_bytes / copy_bandwidth * 1e3,
        padding_fraction=1 - mask.float().mean().item(),
        labelled_fraction=(inputs["labels"] != -100).float().mean().item(),
        loss=loss,
        torch_threads=torch.get_num_threads(),
        cpu_isa=fastdistil.extension.cpu_isa(),
    )

    rounds, warmup = (FAST_ROUNDS if provider.startswith("fused") else SLOW_ROUNDS)[n]
    with CpuContention() as contention:
        benchmark.pedantic(step, setup=clear_grads, rounds=rounds, warmup_rounds=warmup, iterations=1)
    clear_grads()
    # Other processes' share of the CPUs while this ran: timings taken on a busy machine are not the op's.
    benchmark.extra_info.update(other_cpu_fraction=contention.other_fraction, load_average=load_average())
