"""Time and peak extra memory of the vocabulary projection + triple loss, fused chunk by chunk or not.

Providers, each measured side by side on the same inputs, forward + backward through the projections:
  fused_linear   fastdistil.fused_linear_triple_loss: chunks of rows projected and fed to the fused loss
                 kernel, no [N, V] tensor (what `python -m fastdistil.train` runs by default).
  project_fused  both models' logits (x @ W.T + b), then fastdistil.triple_loss (the C++ kernel).
  reference      both models' logits, then the recipe's unfused loss (fastdistil.triple_loss_reference).

    python -m pytest bench/test_bench_fused_linear.py --benchmark-json bench/results/fused_linear.json
    python -m bench.report    # its fused-linear section, in bench/results/REPORT.md

Defaults: fp32 at N = 2048 and 8192, bf16 at N = 2048. FASTDISTIL_BENCH_LARGE=1 adds N = 32768 (fp32) and
bf16 at N = 8192: on 2 cores a single call there takes minutes (bf16 matrix products run at a sixth of the fp32
rate on a CPU without native bf16), and the unfused reference at N = 32768 would need ~35 GB, so it is left out.
"""

import os

import pytest
import torch

import fastdistil

from bench.machine import CpuContention, load_average
from bench.memory import peak_extra_bytes

V = 30522
D = 768
SEQ_LEN = 128
PAD_FRACTION = 0.10
LABELLED_FRACTION = 0.15
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("fused_linear", "project_fused", "reference")
ARGS = dict(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, restrict_ce_to_mask=False)
LARGE = os.environ.get("FASTDISTIL_BENCH_LARGE", "0") == "1"
SIZES = [(2048, "fp32"), (8192, "fp32"), (2048, "bf16")] + ([(32768, "fp32"), (8192, "bf16")] if LARGE else [])
# (rounds, warmup rounds): matrix products take seconds; bf16 ones six times longer on CPUs without native bf16
ROUNDS = {(2048, "fp32"): (3, 1), (8192, "fp32"): (2, 1), (2048, "bf16"): (2, 0), (32768, "fp32"): (1, 0),
          (8192, "bf16"): (1, 0)}
CASES = [(n, dtype, provider) for n, dtype in SIZES for provider in PROVIDERS
         if not (n == 32768 and provider == "reference")]


def make_inputs(n: int, dtype_name: str) -> dict:
    """BERT-base-shaped inputs: [B, 128, 768] projection inputs and hidden states, [30522, 768] projections,
    the tail 10 % of each sequence padding, 15 % of the real rows labelled."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(n)
    batch = n // SEQ_LEN

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(grad)

    attention_mask = (torch.arange(SEQ_LEN) < SEQ_LEN - round(PAD_FRACTION * SEQ_LEN)).expand(batch, SEQ_LEN)
    real = attention_mask.reshape(-1).nonzero().squeeze(1)
    chosen = real[torch.randperm(real.numel(), generator=gen)[:round(LABELLED_FRACTION * n)]]
    labels = torch.full((n,), -100, dtype=torch.int64)
    labels[chosen] = torch.randint(0, V, (chosen.numel(),), generator=gen)
    return dict(student_input=randn(batch, SEQ_LEN, D, grad=True), student_weight=randn(V, D, scale=0.1, grad=True),
                student_bias=randn(V, scale=0.1, grad=True), teacher_input=randn(batch, SEQ_LEN, D),
                teacher_weight=randn(V, D, scale=0.1), teacher_bias=randn(V, scale=0.1),
                labels=labels.view(batch, SEQ_LEN), student_hidden=randn(batch, SEQ_LEN, D, grad=True),
                teacher_hidden=randn(batch, SEQ_LEN, D), attention_mask=attention_mask.to(torch.int64))


def make_step(provider: str, inputs: dict):
    """One forward + backward of `provider`, and the reset of the gradients it leaves."""
    x = inputs
    differentiable = [x["student_input"], x["student_weight"], x["student_bias"], x["student_hidden"]]

    def loss():
        if provider == "fused_linear":
            return fastdistil.fused_linear_triple_loss(**x, **ARGS).loss
        s_logits = torch.nn.functional.linear(x["student_input"], x["student_weight"], x["student_bias"])
        t_logits = torch.nn.functional.linear(x["teacher_input"], x["teacher_weight"], x["teacher_bias"])
        loss_fn = fastdistil.triple_loss if provider == "project_fused" else fastdistil.triple_loss_reference
        return loss_fn(s_logits, t_logits, x["labels"], x["student_hidden"], x["teacher_hidden"],
                       x["attention_mask"], **ARGS).loss

    def step():
        value = loss()
        value.backward()
        return value.detach()

    def clear_grads():
        for t in differentiable:
            t.grad = None

    return step, clear_grads


@pytest.mark.parametrize("n,dtype,provider", CASES, ids=[f"N{n}-{dtype}-{provider}" for n, dtype, provider in CASES])
def test_fused_linear(benchmark, n, dtype, provider):
    if not fastdistil.extension.AVAILABLE:
        pytest.skip(f"fastdistil._C is not loaded ({fastdistil.extension.ERROR})")
    inputs = make_inputs(n, dtype)
    step, clear_grads = make_step(provider, inputs)
    clear_grads()
    # One call under the profiler, the gradients it leaves (held by the training step anyway) included.
    losses = []
    peak = peak_extra_bytes(lambda: losses.append(float(step())))
    clear_grads()
    rounds, warmup = ROUNDS[n, dtype]
    benchmark.group = f"fused_linear {dtype} N={n}"
    with CpuContention() as contention:
        benchmark.pedantic(step, setup=clear_grads, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update(
        N=n, V=V, D=D, dtype=dtype, provider=provider, peak_extra_bytes=peak, nv_fp32_bytes=n * V * 4,
        loss=losses[0],
        other_cpu_fraction=contention.other_fraction, load_average=load_average(),
        torch_threads=torch.get_num_threads(), cpu_isa=fastdistil.extension.cpu_isa())
