"""Non-padding tokens/s and peak extra memory of one training step: fastdistil against the original distiller.

Providers, each from the same weights on the same batches, one optimizer step per round:
  distiller                  the original Hugging Face distiller's step (bench/distiller_step.py): the
                             unfused loss on masked_select copies, default (foreach) AdamW, .item() logs; in
                             its MLM mode for BERT, its CLM mode for GPT-2.
  fastdistil                 what `python -m fastdistil.train` does per step: fastdistil.train.train_step with
                             --loss fused (vocabulary projection and loss fused, chunk by chunk: no [N, V]
                             logits), make_optimizer's fused AdamW.
  fastdistil_fused_logits    the same with --loss fused-logits: both models' logits, then the fused loss op.
  fastdistil_reference_loss  the same with --loss reference: the logits, then the recipe's unfused loss.
  fastdistil_cache           what `python -m fastdistil.train --teacher-cache DIR` does per step: no teacher
                             forward, the student's projection fused with the sparse triple loss against the
                             teacher's top-k (k = fastdistil.cache_teacher's default, fp16 logits and hidden
                             states, as the cache stores them), the bucket tail. The cached rows of each batch
                             are computed once, before the timing, by the cache's own code (teacher_rows); a run
                             reads them from its shards (~2 MB a batch here).
  matmul_floor               the distiller step's matrix products alone (bench/matmul_floor.py), replayed at
                             their shapes and in their order: a floor for the time of any exact step of these
                             models, so distiller / matmul_floor bounds the speed-up any implementation can
                             show on this machine.

Two model rows, each teacher with seeded random weights and its student make_student(teacher), 6 layers from
teacher layers 0, 2, 4, 7, 9, 11:
  bert   (ids "fp32-distiller", ...) BertForMaskedLM with bert-base's config (V = 30,522) -> DistilBERT, masked
         LM: batches masked as the trainer masks them. fp32, bf16 and fp16 (torch.autocast around both
         forwards; fp16 with a torch.amp.GradScaler on both sides, as `--precision fp16` trains and as the
         original distiller scaled its loss with apex).
  gpt2   (ids "gpt2-fp32-distiller", ...) GPT2LMHeadModel with GPT-2 small's config (12 layers, hidden 768, 12
         heads, V = 50,257, 1,024 positions) -> a 6-layer GPT-2 (DistilGPT2's shape), causal LM: labels the
         next tokens, CausalShift's for fastdistil, the original's prepare_batch_clm labels (shifted inside its
         step) for the distiller. fp32 only. No GPT-2 tokenizer ships with fastdistil and nothing is downloaded
         here, so its batches hold the same token ids as the BERT row's (the bundled BERT tokenizer's, unmasked,
         [CLS] ... [SEP]): ids < 30,522 index real rows of the 50,257-row embedding, and with random weights the
         text's meaning plays no part in a step's time; the shapes (and the [N, 50257] logits) are GPT-2's.
Batches: 8 x 128 on CPU, 32 x 128 on CUDA, from the bundled Wikipedia sample. Both rows use the loss weights of
fastdistil.train's defaults for the family (alpha_ce 5, alpha_mlm or alpha_clm 2, alpha_cos 1, T = 2), on both
sides.

    python -m pytest bench/test_bench_train_step.py -k "fp32 and not gpt2" \
        --benchmark-json bench/results/train_step.json
    python -m pytest bench/test_bench_train_step.py -k "gpt2 and fp32" --benchmark-json \
        bench/results/train_step_gpt2.json
    python -m pytest bench/test_bench_train_step.py -k "bf16 or fp16" --durations=0 \
        --benchmark-json bench/results/train_step_gpu.json     # on a GPU machine: the CUDA run
    FASTDISTIL_BENCH_TINY=1 python -m pytest bench/test_bench_train_step.py      # smoke test: tiny models
    python -m bench.report    # its training-step sections, in bench/results/REPORT.md

The device is CUDA when there is one, else the CPU; FASTDISTIL_BENCH_DEVICE=cpu (or cuda:1, ...) overrides it.
Precision and provider are in every test id, the device in the group and the results. On CUDA every timed
step ends with torch.cuda.synchronize (the step's kernels are part of its time) and memory comes from
torch.cuda's peak counter (bench/memory.py); the results carry the GPU, driver, CUDA, torch and Triton
(bench/gpu.py). The CUDA run of 10 cases (bf16 and fp16, every provider) is estimated at ~30 s on an H100,
not measured yet: bert-base construction ~3 s, the batches ~3 s, then per case the student, 2 warm-up and 10
timed steps of ~20-50 ms (the models' ~2.5 TFLOP at a fraction of the tensor cores' rate, launch-bound
kernels) and one more for memory, ~1-2 s each. In fp16 each case first runs steps until two in a row keep the
loss scale (settle_loss_scale): the first steps overflow the initial 2^16 and skip their update; the results
record those steps (settle_steps), the final scale and any update skipped after them (skipped_steps).

FASTDISTIL_BENCH_ROUNDS=N sets the timed rounds of every case (default on CPU: fp32 5, bf16 and fp16 2; a
full-size fp32 step takes 10-14 s on two idle AVX2 cores, a bf16 one about 6 min there, without bf16
arithmetic in the CPU, so fp16 runs on a CPU only in tiny runs; on CUDA 10; the matmul_floor case first records
one distiller step, outside the timing). The GPT-2 fp32 row took 10 min (cases 1.5-2.7 min, distiller steps
~21 s) on two AVX-512 cores of which other processes took ~65 %; idle, expect a fraction of that.
FASTDISTIL_BENCH_TINY=1 swaps in tiny teachers (hidden 64, 4 layers, each row's full vocabulary) and 2 x 32
batches: with -k "bf16 or fp16" on a CPU it is the dry run of the CUDA run (scripts/gpu_check.sh --dry-run),
~15 s on two shared cores.
test_distiller_step_matches_fastdistil, not a benchmark, checks on CPU for each row that the baseline computes
what fastdistil computes.

Every result's extra_info holds the model row, device, precision, provider, batch shape, vocabulary size,
non-padding tokens per batch and per second (mean tokens of the timed batches / median step time), the peak
extra memory of one step (bench/memory.py), the models' sizes and the other processes' share of the CPUs while
it ran.
"""

import dataclasses
import functools
import itertools
import math
import os
import statistics

import pytest
import torch
from torch.nn.utils import clip_grad_norm_
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel,
                          get_linear_schedule_with_warmup)

import fastdistil
from fastdistil.cache_teacher.command import DEFAULT_TOP_K
from fastdistil.train import data, teacher_cache
from fastdistil.train.heads import ProjectionInputs
from fastdistil.train.student import make_student
from fastdistil.train import TrainConfig, make_optimizer, train_step
from fastdistil.train.config import for_family
from fastdistil.train.families import family_of

from bench import matmul_floor
from bench.distiller_step import Distiller
from bench.gpu import device_facts
from bench.machine import CpuContention, load_average
from bench.memory import peak_extra_bytes

TINY = os.environ.get("FASTDISTIL_BENCH_TINY", "0") == "1"
DEVICE = torch.device(os.environ.get("FASTDISTIL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
CUDA = DEVICE.type == "cuda"
CPU = torch.device("cpu")
SEED = 0
VOCAB = 30522  # the bundled tokenizer's: the ids of real text index the teacher's embeddings


@dataclasses.dataclass(frozen=True)
class Row:
    """A model row: the teacher's class and config (its defaults the full-size model, `tiny` the smoke test's
    overrides) and its precisions."""
    model_class: type
    config: functools.partial
    tiny: dict
    precisions: tuple[str, ...]

    @property
    def causal(self) -> bool:
        """Whether the row trains as a causal LM: its fastdistil family's answer."""
        return family_of(self.config()).causal


ROWS = {
    # BertConfig's defaults are bert-base (hidden 768, 12 layers, 12 heads, intermediate 3072).
    "bert": Row(BertForMaskedLM, functools.partial(BertConfig, vocab_size=VOCAB, layer_norm_eps=1e-12),
                dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128),
                precisions=("fp32", "bf16", "fp16")),
    # GPT2Config's defaults are GPT-2 small (n_embd 768, 12 layers, 12 heads, n_inner 4 x 768, 1,024 positions).
    # fp32 only: the row, and no growth of the CUDA run (-k "bf16 or fp16").
    "gpt2": Row(GPT2LMHeadModel, functools.partial(GPT2Config, vocab_size=50257),
                dict(n_embd=64, n_layer=4, n_head=2, n_inner=128), precisions=("fp32",)),
}
TINY_BATCH = (2, 32)  # (batch size, sequence length)
BATCH = TINY_BATCH if TINY else (32, 128) if CUDA else (8, 128)  # a GPU needs more rows to be busy
N_BATCHES = 8  # the fixed batches every provider cycles through, in the same order
# autocast dtype, as fastdistil.train maps --precision
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("distiller", "fastdistil", "fastdistil_fused_logits", "fastdistil_reference_loss", "fastdistil_cache",
             "matmul_floor")
ORIGINAL_PROVIDERS = ("distiller", "matmul_floor")  # they take the original's labels (the same for a masked LM)
LOSS_OF = {"fastdistil": "fused", "fastdistil_fused_logits": "fused-logits", "fastdistil_reference_loss": "reference",
           "fastdistil_cache": "fused"}
CACHE_DTYPE = torch.float16  # of the cached top-k logits and hidden states (cache_teacher's defaults)
ROUNDS = dict.fromkeys(PRECISIONS, 10) if CUDA else {"fp32": 5, "bf16": 2, "fp16": 2}
if "FASTDISTIL_BENCH_ROUNDS" in os.environ:
    ROUNDS = dict.fromkeys(ROUNDS, int(os.environ["FASTDISTIL_BENCH_ROUNDS"]))
SETTLED_STEPS, MAX_SETTLE_STEPS = 2, 20
WARMUP_ROUNDS = 2 if CUDA else 1  # CUDA: the first steps also pick cuBLAS kernels and grow the allocator's pool
# The schedule of a run this long; the benchmark times its first steps (in warm-up, where lr is small: the
# optimizer does the same work at any lr).
SCHEDULE_STEPS = 1000
RECIPE_LR = 5e-4  # the distiller's default, given to both sides

# A full-size fp16 step on a CPU takes minutes, like bf16, and nobody trains so there: fp16 runs on CUDA and in
# tiny runs (which include the CUDA run's dry run).
CASES = [(model, precision, provider) for model, row in ROWS.items() for precision in row.precisions
         if precision != "fp16" or CUDA or TINY for provider in PROVIDERS]


def case_id(model: str, precision: str, provider: str) -> str:
    """BERT's ids are the ones its committed results carry (fp32-distiller, ...); other rows are prefixed."""
    return f"{precision}-{provider}" if model == "bert" else f"{model}-{precision}-{provider}"


@functools.lru_cache(maxsize=None)
def tokenized_corpus(seq_len: int):
    """(the bundled tokenizer, the bundled corpus's training sequences): every row's token ids."""
    tokenizer = AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER)
    return tokenizer, data.tokenize_corpus(data.load_corpus(), tokenizer, seq_len)


@functools.lru_cache(maxsize=None)
def load_batches(model: str, batch_size: int, seq_len: int, original: bool = False
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels) of the first N_BATCHES full batch_size x seq_len batches of the
    trainer's first epoch (fastdistil.train's pipeline and seed; for a masked LM its masking). Length grouping
    also yields shorter batches; skipping them gives every round the same work, so that the median of a few
    rounds is the time of a step. Labels: fastdistil's, or with `original` the original distiller's (they
    differ for a causal LM only: the distiller shifts its labels inside the step)."""
    if original and not ROWS[model].causal:
        return load_batches(model, batch_size, seq_len)  # the same masked batches, not a second draw
    cfg = TrainConfig()
    tokenizer, sequences = tokenized_corpus(seq_len)
    if ROWS[model].causal:
        shift = data.CausalShift()

        def label(ids, mask, generator):
            return (ids, Distiller.prepare_batch_clm(ids, mask)) if original else shift(ids, mask)
    else:
        label = data.DynamicMasker(
            data.masking_probabilities(sequences, len(tokenizer), tokenizer.all_special_ids, cfg.mlm_smoothing),
            tokenizer.mask_token_id, len(tokenizer), cfg.mlm_prob)
    full = []
    epoch = data.batches(sequences, batch_size, cfg.seed, 0, tokenizer.pad_token_id)
    for index, (ids, mask) in enumerate(epoch):
        if ids.shape == (batch_size, seq_len):
            inputs, labels = label(ids, mask, data.rng(cfg.seed, 0, index))
            full.append((inputs, mask, labels))
            if len(full) == N_BATCHES:
                break
    return full


@functools.lru_cache(maxsize=None)
def batches_on(device: torch.device, model: str, batch_size: int, seq_len: int, original: bool = False
               ) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.to(device) for t in batch) for batch in load_batches(model, batch_size, seq_len, original)]


@functools.lru_cache(maxsize=None)
def make_teacher(model: str, tiny: bool, device: torch.device) -> torch.nn.Module:
    """The same seeded weights on any device: built on CPU, then moved."""
    row = ROWS[model]
    torch.manual_seed(SEED)
    config = row.config(**(row.tiny if tiny else {}))
    return row.model_class(config).eval().requires_grad_(False).to(device)


def loss_config(teacher, **settings) -> TrainConfig:
    """fastdistil.train's config for the teacher's family (its LM weight filled in as the trainer fills it),
    from which both sides take the loss weights."""
    return for_family(TrainConfig(**settings), family_of(teacher), teacher.config)


def make_step(model: str, provider: str, precision: str, student, teacher, warmup: float = TrainConfig.warmup):
    """(the callable that runs one optimizer step of `provider` on a batch and returns the loss, its
    GradScaler or None)."""
    amp_dtype = PRECISIONS[precision]
    if provider == "distiller":
        cfg = loss_config(teacher)
        distiller = Distiller(student, teacher, SCHEDULE_STEPS, mlm=not ROWS[model].causal,
                              temperature=cfg.temperature, alpha_ce=cfg.alpha_ce, alpha_mlm=cfg.alpha_mlm,
                              alpha_clm=cfg.alpha_clm, alpha_mse=cfg.alpha_mse, alpha_cos=cfg.alpha_cos,
                              learning_rate=RECIPE_LR, warmup_prop=warmup, amp_dtype=amp_dtype)

        def distiller_step(batch):
            distiller.step(*batch)
            return distiller.last_loss

        return distiller_step, distiller.scaler

    if provider == "matmul_floor":
        distiller_step, _ = make_step(model, "distiller", precision, student, teacher, warmup)
        device = next(student.parameters()).device
        first = batches_on(device, model, *BATCH, original=True)[0]
        return matmul_floor.Replay(matmul_floor.record(distiller_step, first)), None

    if provider not in LOSS_OF:
        raise ValueError(f"unknown provider {provider!r}")
    # fastdistil.train's optimizer, schedule and loss, with its defaults (the recipe's).
    cfg = loss_config(teacher, precision=precision, warmup=warmup, loss=LOSS_OF[provider], lr=RECIPE_LR)
    optimizer = make_optimizer(student, cfg.lr, cfg.weight_decay, cfg.adam_eps)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup * SCHEDULE_STEPS),
                                                SCHEDULE_STEPS)
    student_inputs, teacher_inputs = ProjectionInputs(student), ProjectionInputs(teacher)
    scaler = torch.amp.GradScaler(next(student.parameters()).device.type, enabled=precision == "fp16")
    if provider == "fastdistil_cache":
        teacher_of = cached_teacher(model, teacher_inputs, cfg, amp_dtype)
    else:
        def teacher_of(batch):
            return teacher_inputs

    # The trainer's step at grad-accum 1 on one process (its GradScaler is a pass-through unless fp16).
    def fastdistil_step(batch):
        terms = train_step(student_inputs, teacher_of(batch), batch, cfg, amp_dtype)
        scaler.scale(terms.loss).backward()
        logged = torch.stack([t.detach().float().cpu() for t in terms])  # what it keeps for its log
        if torch.isfinite(logged[0]):  # it skips the update of a NaN/inf step
            scaler.unscale_(optimizer)
            clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return logged[0]

    fastdistil_step.teacher_of = teacher_of
    return fastdistil_step, scaler


def cached_teacher(model: str, teacher_inputs: ProjectionInputs, cfg: TrainConfig, amp_dtype):
    """batch -> its TeacherRows, what a teacher cache holds for it, for every batch the cases cycle through."""
    device = next(teacher_inputs.model.parameters()).device
    rows = {}
    for batch in batches_on(device, model, *BATCH):
        rows[id(batch[0])] = teacher_cache.teacher_rows(
            teacher_inputs, batch[0], batch[1], DEFAULT_TOP_K, cfg.temperature, amp_dtype, CACHE_DTYPE,
            CACHE_DTYPE if cfg.alpha_cos > 0 else None)
    return lambda batch: rows[id(batch[0])]


def cache_bytes_per_token(teacher_rows: teacher_cache.TeacherRows) -> float:
    """Bytes the cache holds per non-padding token of a batch (its shards' tensors, without their headers)."""
    return sum(t.numel() * t.element_size() for t in teacher_rows if t is not None) / teacher_rows.logsumexp.size(0)


def settle_loss_scale(step, scaler, batches) -> int:
    """Runs steps until SETTLED_STEPS in a row keep the loss scale (at most MAX_SETTLE_STEPS), and returns how
    many it ran: in fp16 the first steps overflow GradScaler's initial 2^16 (as they did under apex) and skip
    their update, which would make the timed steps of one side cheaper than the other's. The scale only grows
    after 2000 clean steps, so from here on every halving is a skipped step."""
    kept = 0
    for n in range(1, MAX_SETTLE_STEPS + 1):
        scale = scaler.get_scale()
        step(next(batches))
        kept = kept + 1 if scaler.get_scale() == scale else 0
        if kept == SETTLED_STEPS:
            break
    return n


def synchronized(step):
    """step, waiting for the kernels it queued: on CUDA they are part of its time."""
    def step_and_wait(batch):
        loss = step(batch)
        torch.cuda.synchronize(DEVICE)
        return loss

    return step_and_wait


@pytest.mark.parametrize("model", ROWS)
def test_distiller_step_matches_fastdistil(model):
    """The baseline computes what fastdistil computes: two steps of each from the same weights on the same
    batches (each side's labels) give the same losses and the same updated weights (fp32, tiny models).
    Dropout is the one random part of a step, so both students run in eval mode here."""
    teacher = make_teacher(model, True, CPU)
    initial = {name: p.clone() for name, p in make_student(teacher).named_parameters()}
    losses, weights = {}, {}
    for provider in ("distiller", "fastdistil"):
        batches = load_batches(model, *TINY_BATCH, original=provider in ORIGINAL_PROVIDERS)[:2]
        student = make_student(teacher).eval()
        step, _ = make_step(model, provider, "fp32", student, teacher, warmup=0.0)  # lr > 0 from the first step
        losses[provider] = [float(step(batch)) for batch in batches]
        weights[provider] = {name: p.detach() for name, p in student.named_parameters()}

    torch.testing.assert_close(losses["fastdistil"], losses["distiller"], rtol=1e-4, atol=0)
    # Adam moves each weight by about lr per step whatever its gradient's scale, so weights are compared in
    # units of lr: the kernel's rounding and fused vs foreach AdamW stay below 1e-3 lr here.
    lr = RECIPE_LR
    moved = max((weights["distiller"][name] - before).abs().max() for name, before in initial.items())
    assert moved > lr / 2, f"the distiller's steps did not update the student (largest change {moved:.3g})"
    for name, expected in weights["distiller"].items():
        torch.testing.assert_close(weights["fastdistil"][name], expected, rtol=0, atol=1e-2 * lr,
                                   msg=lambda m, name=name: f"{name} after two steps: {m}")


@pytest.mark.parametrize("model,precision,provider", CASES, ids=[case_id(*case) for case in CASES])
def test_train_step(benchmark, copy_bandwidth, model, precision, provider):
    teacher = make_teacher(model, TINY, DEVICE)
    student = make_student(teacher).to(DEVICE).train()  # every provider starts from the teacher's weights
    step, scaler = make_step(model, provider, precision, student, teacher)
    timed = synchronized(step) if CUDA else step
    batches = itertools.cycle(batches_on(DEVICE, model, *BATCH, original=provider in ORIGINAL_PROVIDERS))
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        settle_steps = settle_loss_scale(timed, scaler, batches)
        scale = scaler.get_scale()
    tokens = []  # non-padding tokens of each batch handed to a round

    def next_batch():
        batch = next(batches)
        tokens.append(int(batch[1].sum()))
        return (batch,), {}

    rounds = ROUNDS[precision]
    benchmark.group = f"train_step {model} {DEVICE.type} {precision}"
    with CpuContention() as contention:
        benchmark.pedantic(timed, setup=next_batch, rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    # Other processes' share of the CPUs while this ran: timings taken on a busy machine are not the step's.
    benchmark.extra_info.update(other_cpu_fraction=contention.other_fraction, load_average=load_average())
    # After the timing, on the next batch: the AdamW moments exist by now, so this is what a step allocates
    # over what training holds between steps (weights and moments; zero_grad frees the gradients).
    peak = peak_extra_bytes(timed, next(batches), device=DEVICE)

    # What training keeps between steps: the student's weights and AdamW's two moments, and the frozen teacher's
    # weights unless the teacher is a cache (the distiller's and fastdistil's online steps both hold it).
    def weight_bytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    held = None if provider == "matmul_floor" else (
        3 * weight_bytes(student) + (0 if provider == "fastdistil_cache" else weight_bytes(teacher)))
    if provider == "fastdistil_cache":
        benchmark.extra_info.update(top_k=DEFAULT_TOP_K,
                                    cache_bytes_per_token=cache_bytes_per_token(step.teacher_of(next(batches))))
    tokens_per_batch = statistics.mean(tokens[-rounds:])
    stats = benchmark.stats.stats if benchmark.stats else None  # None under --benchmark-disable
    benchmark.extra_info.update(
        **device_facts(DEVICE), model=model, precision=precision, provider=provider, tiny=TINY,
        batch_size=BATCH[0], seq_len=BATCH[1], vocab_size=teacher.config.vocab_size,
        tokens_per_batch=tokens_per_batch,
        tokens_per_s=tokens_per_batch / stats.median if stats else None,
        peak_extra_mb=peak / 1e6,
        held_mb=None if held is None else held / 1e6,
        peak_total_mb=None if held is None else (held + peak) / 1e6,
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        teacher_layers=teacher.config.num_hidden_layers,
        student_layers=student.config.num_hidden_layers,  # the generic name: n_layers in DistilBERT, n_layer in GPT-2
        hidden_size=teacher.config.hidden_size,
        copy_bandwidth_bytes_per_s=copy_bandwidth,
        torch_threads=torch.get_num_threads(),
        cpu_isa=fastdistil.extension.cpu_isa(),
    )
    if scaling:
        # Steps whose update the scaler skipped after the settling: warm-up, timed and memory steps.
        benchmark.extra_info.update(settle_steps=settle_steps, loss_scale=scaler.get_scale(),
                                    skipped_steps=round(math.log2(scale / scaler.get_scale())))
    if isinstance(step, matmul_floor.Replay):
        benchmark.extra_info["matmul_gflop"] = matmul_floor.flops(step.calls) / 1e9
