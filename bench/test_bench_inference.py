"""Size and inference latency of teacher and student: the paper's Table 3 (110 M vs 66 M parameters, 668 s vs 410 s
for a pass over STS-B on CPU at batch 1), measured here with three attention implementations.

Model pairs, each a teacher and its student from make_student (half the layers, initialized from the teacher):
  bert-base  BertForMaskedLM with bert-base's shape (12 layers, hidden 768, 12 heads, vocabulary 30522) and seeded
             random weights (latency does not depend on the values), and its 6-layer student.
  tiny       the built-in teacher (fastdistil/assets/tiny-bert-teacher: 4 layers, hidden 128) and its 2-layer student.
What is timed is the encoder (teacher.bert, student.distilbert) in eval mode under torch.inference_mode: what a
downstream task such as the paper's STS-B runs, without the masked-LM head over the vocabulary.

Attention: "fastdistil" (fastdistil.attention through transformers' registry; PyTorch SDPA on CPU, behind
fastdistil's mask handling), "sdpa" and "eager" (transformers' own).

Inputs: a fixed set of N_SEQUENCES sequences drawn with a fixed seed from the bundled Wikipedia sample, tokenized
and chunked as the trainer does (128 tokens at most), so their lengths follow the corpus's. One timed round runs
all of them: one sequence at a time at batch 1 (no padding, as in the paper), or in batches of 32 padded to the
longest of each batch.

    python -m pytest bench/test_bench_inference.py --benchmark-json bench/results/inference.json
    python -m pytest bench/test_bench_inference.py -k "tiny and b32"   # pair, role, attention, batch in every id
    FASTDISTIL_BENCH_TINY=1 python -m pytest bench/test_bench_inference.py    # smoke test: the tiny pair only
    python -m bench.report

FASTDISTIL_BENCH_ROUNDS=N sets the timed rounds of every case (default: bert-base 3, tiny 10; one warm-up round
each). A bert-base round takes seconds (teacher at batch 32: ~10 s on two cores). FASTDISTIL_BENCH_TINY=1 runs
the tiny pair only, on 8 sequences at batch 1 and 8, 2 rounds.

Every result's extra_info holds the pair, role, attention, batch size, the encoder's parameters (and the masked
LM's), both models' parameters and their ratio, the sequences' lengths and tokens (real and padded), seconds per
sequence, non-padding tokens/s, and the other processes' share of the CPUs while it ran.
"""

import functools
import os
import statistics

import pytest
import torch
import transformers
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

import fastdistil
from fastdistil import assets
from fastdistil.train import data
from fastdistil.ops.attention import register_with_transformers
from fastdistil.train.student import make_student

from bench.machine import CpuContention, load_average

TINY = os.environ.get("FASTDISTIL_BENCH_TINY", "0") == "1"
SEED = 0
MAX_SEQ_LEN = 128  # the trainer's default, and the built-in teacher's position table
# Every batch size runs the same sequences in a round: at the largest batch size, one batch.
N_SEQUENCES = 8 if TINY else 32
BATCH_SIZES = (1, N_SEQUENCES)
PAD_ID = 0  # [PAD] of the bert-base-uncased vocabulary, which both pairs use
ATTENTIONS = ("fastdistil", "sdpa", "eager")
ROLES = ("teacher", "student")
PAIRS = ("tiny",) if TINY else ("bert-base", "tiny")
ROUNDS = {"bert-base": 3, "tiny": 2 if TINY else 10}
if "FASTDISTIL_BENCH_ROUNDS" in os.environ:
    ROUNDS = dict.fromkeys(ROUNDS, int(os.environ["FASTDISTIL_BENCH_ROUNDS"]))
WARMUP_ROUNDS = 1

CASES = [(pair, role, attention, batch_size) for pair in PAIRS for role in ROLES for attention in ATTENTIONS
         for batch_size in BATCH_SIZES]


def corpus_sequences(max_documents: int | None = None) -> list[list[int]]:
    """Token ids of the bundled corpus's sequences as the trainer makes them ([CLS] chunk [SEP], filtered)."""
    tokenizer = AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER)
    corpus = data.load_corpus(max_documents=max_documents)
    return data.tokenize_corpus(corpus, tokenizer, MAX_SEQ_LEN)["input_ids"]


def draw_sequences(sequences: list[list[int]], n: int = N_SEQUENCES, seed: int = SEED) -> list[list[int]]:
    """n sequences drawn without replacement: their lengths are a sample of the corpus's length distribution."""
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed))
    return [sequences[i] for i in order[:n].tolist()]


def make_batches(sequences: list[list[int]], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of consecutive batches, each padded to its own longest sequence."""
    return [data.collate(sequences[i:i + batch_size], PAD_ID) for i in range(0, len(sequences), batch_size)]


@functools.lru_cache(maxsize=1)
def benchmark_sequences() -> list[list[int]]:
    return draw_sequences(corpus_sequences())


@functools.lru_cache(maxsize=1)  # cases run grouped by pair: keep only the current pair's models alive
def make_pair(pair: str) -> tuple[BertForMaskedLM, torch.nn.Module]:
    """(teacher, student) masked LMs in eval mode."""
    if pair == "tiny":
        teacher = BertForMaskedLM.from_pretrained(assets.TEACHER, dtype=torch.float32)
    elif pair == "bert-base":
        torch.manual_seed(SEED)
        # BertConfig's defaults are bert-base-uncased's shape.
        teacher = BertForMaskedLM(BertConfig(vocab_size=30522, layer_norm_eps=1e-12))
    else:
        raise ValueError(f"unknown model pair {pair!r}")
    return teacher.eval(), make_student(teacher).eval()


def encoder(pair: str, role: str, attention: str) -> torch.nn.Module:
    """The pair's teacher or student encoder, set to run `attention`."""
    register_with_transformers()
    teacher, student = make_pair(pair)
    model = teacher.bert if role == "teacher" else student.distilbert
    model.set_attn_implementation(attention)
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("pair,role,attention,batch_size", CASES,
                         ids=[f"{pair}-{role}-{attention}-b{b}" for pair, role, attention, b in CASES])
def test_inference(benchmark, pair, role, attention, batch_size):
    model = encoder(pair, role, attention)
    sequences = benchmark_sequences()
    batches = make_batches(sequences, batch_size)

    def run_all():
        with torch.inference_mode():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)

    benchmark.group = f"inference {pair} b{batch_size}"
    with CpuContention() as contention:
        benchmark.pedantic(run_all, rounds=ROUNDS[pair], warmup_rounds=WARMUP_ROUNDS, iterations=1)

    teacher, student = make_pair(pair)
    lengths = [len(s) for s in sequences]
    stats = benchmark.stats.stats if benchmark.stats else None  # None under --benchmark-disable
    benchmark.extra_info.update(
        model=pair, role=role, attention=attention, batch_size=batch_size,
        params=count_params(model), mlm_params=count_params(teacher if role == "teacher" else student),
        teacher_params=count_params(teacher.bert), student_params=count_params(student.distilbert),
        params_ratio=count_params(student.distilbert) / count_params(teacher.bert),
        layers=model.config.num_hidden_layers,
        hidden_size=teacher.config.hidden_size,
        n_sequences=len(sequences), tokens=sum(lengths),
        padded_tokens=sum(ids.numel() for ids, _ in batches),
        seq_len_min=min(lengths), seq_len_median=statistics.median(lengths),
        seq_len_mean=statistics.mean(lengths), seq_len_max=max(lengths),
        seconds_per_sequence=stats.median / len(sequences) if stats else None,
        tokens_per_s=sum(lengths) / stats.median if stats else None,
        other_cpu_fraction=contention.other_fraction, load_average=load_average(),
        torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        transformers_version=transformers.__version__, cpu_isa=fastdistil.extension.cpu_isa(),
    )
