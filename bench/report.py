"""The one report: every benchmark JSON in the results folder and the evaluation outputs, as a markdown report with
PNG plots, the paper's published numbers beside ours.

    python -m bench.report [--results-dir bench/results] [--eval RUN_DIR/eval_wiki-topic.json ...]
                           [--out bench/results/REPORT.md] [--readme README.md]

reads whichever of inference.json, export.json, train_step.json, train_step_gpt2.json (the training step's BERT and
GPT-2 rows), teacher_cache.json, triple_loss.json, fused_linear.json (CPU), gpu.json and train_step_gpu.json (a GPU
machine's test_bench_gpu.py and CUDA training step) exist in the results folder (pytest --benchmark-json files of
the bench/ suites; a missing one is named in the report, with the command that measures it) and the `python -m
fastdistil.evaluate` outputs given with --eval (those of `--distill`, one per seed, make the task-distillation
section), writes the report and its plots (inference.png, export.png, train_step.png, train_step_gpt2.png,
teacher_cache.png, triple_loss.png, fused_linear.png, gpu_kernels.png, gpu_train_step.png, retention.png,
task_distillation.png; none with --no-plots) next to it, and with --readme replaces what stands between the README's
`<!-- report:start -->` and `<!-- report:end -->` lines with the same report, its image links made relative to the
README.

The GPU section appears only when gpu.json or train_step_gpu.json holds results. Results from the GPU
benchmarks' dry run (FASTDISTIL_BENCH_TINY=1 on a machine without CUDA: device "cpu" in those files) are still
shown, so that the dry run exercises this section too, under a heading and a first paragraph that say they are a
dry run on CPU and not GPU figures.

    python -m bench.report --results-dir GPU_CHECK_OUT --out GPU_CHECK_OUT/REPORT.md --no-plots   # a GPU check
"""

import argparse
import functools
import json
import os
import re
import statistics
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from bench.report_format import (BUSY, MB, bars, busy_note, fmt_mb, fmt_ms, fmt_params, fmt_rate, median,
                                 plot_against_n, pyplot, ratio, save, table, timing)

BENCH_DIR = Path(__file__).resolve().parent
# What each section says about how it was measured, kept apart from the code that computes its tables.
TEMPLATES = BENCH_DIR / "report_templates"
README_START, README_END = "<!-- report:start -->", "<!-- report:end -->"
EVAL_KEYS = ("teacher", "student", "random_student", "retention")

# Sanh et al. 2019: Table 3 (a pass over the GLUE STS-B dev set on CPU, an Intel Xeon E5-2690 v3, batch 1), the
# GLUE dev macro-score of Table 1, and DistilBERT's size on disk (section 4.2, on-device computation: "the whole
# model weighs 207 MB").
PAPER = dict(teacher_params=110e6, student_params=66e6, teacher_seconds=668.0, student_seconds=410.0,
             teacher_glue=79.5, student_glue=77.0, student_mb=207,
             # Table 2, SQuAD 1.1 dev EM / F1: BERT-base, DistilBERT, DistilBERT (D) (a second distillation step)
             teacher_squad=(81.2, 88.5), student_squad=(77.7, 85.8), student_d_squad=(79.1, 86.9))

MEASURE = {
    "inference": "python -m pytest bench/test_bench_inference.py --benchmark-json bench/results/inference.json",
    "export": "python -m pytest bench/test_bench_export.py --benchmark-json bench/results/export.json",
    "train_step": "python -m pytest bench/test_bench_train_step.py -k \"fp32 and not gpt2\" --benchmark-json "
                  "bench/results/train_step.json",
    "train_step_gpt2": "python -m pytest bench/test_bench_train_step.py -k \"gpt2 and fp32\" --benchmark-json "
                       "bench/results/train_step_gpt2.json",
    "teacher_cache": "python -m pytest bench/test_bench_teacher_cache.py --benchmark-json "
                     "bench/results/teacher_cache.json",
    "triple_loss": "python -m pytest bench/test_bench_triple_loss.py --benchmark-json bench/results/triple_loss.json",
    "fused_linear": "python -m pytest bench/test_bench_fused_linear.py --benchmark-json "
                    "bench/results/fused_linear.json",
    "gpu": "python -m pytest bench/test_bench_gpu.py --benchmark-json bench/results/gpu.json",
    "train_step_gpu": "python -m pytest bench/test_bench_train_step.py -k \"bf16 or fp16\" --benchmark-json "
                      "bench/results/train_step_gpu.json",
}


def prose(name: str, **fields) -> str:
    """The paragraph of report_templates/<name>.md, its str.format fields filled: wrapped in the file for reading,
    one line in the report (lines and runs of spaces join into single spaces)."""
    return " ".join((TEMPLATES / f"{name}.md").read_text().split()).format(**fields)


# Inputs -----------------------------------------------------------------------------------------------------


def load_suite(path: Path) -> tuple[dict, list[dict]]:
    """The run's JSON and its results, each {"stats": ..., **extra_info}."""
    data = json.loads(path.read_text())
    return data, [{"stats": b["stats"], **b.get("extra_info", {})} for b in data.get("benchmarks", [])]


def load_eval(path: Path) -> dict:
    """An evaluation output; extra keys are kept, the four the report reads are required."""
    result = json.loads(path.read_text())
    missing = [k for k in EVAL_KEYS if not isinstance(result.get(k), (int, float))]
    if missing:
        raise ValueError(f"{path}: evaluation output lacks numeric {', '.join(map(repr, missing))} (needs "
                         f"{', '.join(EVAL_KEYS)}, as python -m fastdistil.evaluate writes them)")
    return {**result, "path": path}


def nested(results: list[dict], *keys) -> dict:
    """{r[keys[0]]: {r[keys[1]]: ... r}} of the results that have all the keys."""
    tree = {}
    for r in results:
        if all(k in r for k in keys):
            node = tree
            for k in keys[:-1]:
                node = node.setdefault(r[k], {})
            node[r[keys[-1]]] = r
    return tree


def any_result(tree: dict) -> dict:
    """The first result in a nest of dicts: for what all its results share (model sizes, V, the inputs)."""
    while "stats" not in tree:
        tree = next(iter(tree.values()))
    return tree


# Triple loss ------------------------------------------------------------------------------------------------

LOSS_PROVIDERS = {"fused": ("fused (fastdistil, cpp)", "tab:blue"),
                  "fused_cold": ("fused, fresh gradient allocation", "tab:purple"),
                  "fused_out": ("fused, into a caller-owned buffer", "tab:cyan"),
                  "eager": ("eager reference", "tab:red"),
                  "compiled": ("torch.compile(reference)", "tab:orange")}
DTYPE_ORDER = ("fp32", "bf16", "fp16")


def rank(order: tuple):
    """Sort key: the place in `order`, unknown keys last."""
    return lambda key: order.index(key) if key in order else len(order)


def by_dtype(tree: dict) -> list[tuple[str, dict]]:
    return sorted(tree.items(), key=lambda kv: rank(DTYPE_ORDER)(kv[0]))


def tables_by_dtype(tree: dict, heading, cols: list[str], row) -> list[str]:
    """One table per dtype of {dtype: {N: {provider: result}}}, under `heading(dtype, by_n)`, one `row(N,
    {provider: result})` per N."""
    parts = []
    for dtype, by_n in by_dtype(tree):
        parts += [heading(dtype, by_n), "", *table(cols, [row(n, by_n[n]) for n in sorted(by_n)]), ""]
    return parts


def triple_loss_section(data: dict, results: list[dict], figure) -> list[str]:
    tree = nested(results, "dtype", "N", "provider")
    if not tree:
        return []
    parts = ["## Triple loss, forward + backward (CPU)", ""]
    cols = ["N", "fused ms", "eager ms", "compiled ms", "speed-up vs eager", "speed-up vs compiled",
            "fused peak mem", "eager peak mem", "compiled peak mem", "fused, fresh alloc ms",
            "fused, no alloc ms", "floor ms", "no alloc / floor"]

    def mem(r):
        return f"{r['peak_extra_bytes'] / MB:,.0f} MB ({r['peak_extra_bytes'] / r['nv_fp32_bytes']:.2f}×)" if r else "–"

    def row(n, by_provider):
        fused, cold, out, eager, compiled = (by_provider.get(p) for p in LOSS_PROVIDERS)
        floor_ms = any_result(by_provider).get("floor_ms")
        return [f"{n:,}", timing(fused), timing(eager), timing(compiled),
                ratio(median(eager), median(fused), "{:.1f}×"), ratio(median(compiled), median(fused), "{:.1f}×"),
                mem(fused), mem(eager), mem(compiled),
                timing(cold), timing(out), f"{floor_ms:.1f}" if floor_ms else "–",
                ratio(median(out) and median(out) * 1e3, floor_ms, "{:.1f}×")]

    parts += tables_by_dtype(tree, lambda dtype, by_n: f"### {dtype} logits, V = {any_result(by_n)['V']}", cols, row)
    parts += [prose("triple_loss"), *busy_note(results, data, "op"), ""]
    panels = [(f"{dtype} logits, V = 30,522", by_n) for dtype, by_n in by_dtype(tree)]
    references = {}
    for title, by_n in panels:
        first = {n: any_result(by_n[n]) for n in sorted(by_n)}
        references[title] = {
            "time": {"bandwidth floor 3·N·V·b / BW": [(n, r["floor_ms"]) for n, r in first.items()
                                                     if r.get("floor_ms")]},
            "memory": {"one [N, V] fp32 tensor": [(n, r["nv_fp32_bytes"] / MB) for n, r in first.items()]}}
    parts.append(figure("triple_loss", "op time and memory against N", plot_against_n, panels,
                        providers=LOSS_PROVIDERS, references=references, no_memory=("fused_out",)))
    return parts


# Vocabulary projection + triple loss ------------------------------------------------------------------------

LINEAR_PROVIDERS = {"fused_linear": ("fused projection + loss", "tab:blue"),
                    "project_fused": ("logits, then fused loss", "tab:green"),
                    "reference": ("logits, then reference loss", "tab:red")}
LINEAR_TARGET = (8192, "fp32", 0.15, 1.1)  # issue 6's bar at N = 8192 fp32: memory <= 15 %, time <= 1.1x


def fused_linear_section(data: dict, results: list[dict], figure) -> list[str]:
    tree = nested(results, "dtype", "N", "provider")
    if not tree:
        return []
    parts = ["## Vocabulary projection + triple loss, forward + backward (CPU)", ""]
    n, dtype, mem_bar, time_bar = LINEAR_TARGET
    r = tree.get(dtype, {}).get(n, {})
    if "fused_linear" in r and "project_fused" in r:
        mem = r["fused_linear"]["peak_extra_bytes"] / r["project_fused"]["peak_extra_bytes"]
        time = median(r["fused_linear"]) / median(r["project_fused"])
        met = "met" if mem <= mem_bar and time <= time_bar else "NOT met"
        parts += [f"**{dtype}, N = {n:,}:** the fused path needs {mem:.1%} of the peak extra memory of "
                  f"\"logits, then fused loss\" (target ≤ {mem_bar:.0%}) in {time:.2f}× its time (target ≤ "
                  f"{time_bar}×): {met}.", ""]
    labels = [label for label, _ in LINEAR_PROVIDERS.values()]
    cols = ["N", *(f"{label} ms" for label in labels), *(f"{label} peak mem" for label in labels),
            "fused time / logits-then-fused", "fused mem / logits-then-fused"]
    def row(n, r):
        mems = [f"{r[p]['peak_extra_bytes'] / MB:,.0f} MB" if p in r else "–" for p in LINEAR_PROVIDERS]
        fused, logits = r.get("fused_linear"), r.get("project_fused")
        return [f"{n:,}", *(timing(r.get(p)) for p in LINEAR_PROVIDERS), *mems, ratio(median(fused), median(logits)),
                ratio(fused and fused["peak_extra_bytes"], logits and logits["peak_extra_bytes"], "{:.1%}")]

    parts += tables_by_dtype(tree, lambda dtype, by_n: f"### {dtype}, V = {any_result(by_n)['V']}, D = "
                                                       f"{any_result(by_n)['D']}", cols, row)
    parts += [prose("fused_linear"), *busy_note(results, data, "call"), ""]
    panels = [(dtype, by_n) for dtype, by_n in by_dtype(tree)]
    parts.append(figure("fused_linear", "projection + loss time and memory against N", plot_against_n, panels,
                        providers=LINEAR_PROVIDERS))
    return parts


# Training step ----------------------------------------------------------------------------------------------

STEP_PROVIDERS = {"distiller": ("original distiller (baseline)", "tab:red"),
                  "fastdistil": ("fastdistil (fused projection + loss, fused AdamW)", "tab:blue"),
                  "fastdistil_fused_logits": ("fastdistil, logits then fused loss", "tab:green"),
                  "fastdistil_reference_loss": ("fastdistil, reference loss", "tab:orange"),
                  "fastdistil_cache": ("fastdistil from a teacher cache (no teacher forward)", "tab:purple"),
                  "matmul_floor": ("matrix products alone (the floor)", "tab:gray")}
CACHE_TARGET = 1.4  # issue 18's bar: the cache's tokens/s over online fastdistil's, bert-base shape, fp32 CPU
# The model rows of test_bench_train_step besides BERT's, by a result's "model" (results from before the rows
# carry none: BERT's), and the name their settings start with.
STEP_MODEL_NAMES = {"gpt2": "GPT-2"}


class StepSection(NamedTuple):
    """One model row's CPU training-step section: its heading, plot and template, and the precision its
    headline is about with the bar fastdistil's tokens/s over the distiller's must reach there (None: no bar
    set)."""
    heading: str
    figure: str
    template: str
    precision: str
    target: float | None


STEP_SECTIONS = {
    # The bar for BERT: fastdistil's non-padding tokens/s at least 1.3x the distiller's, in fp32.
    "bert": StepSection("## Training step: fastdistil against the original distiller (CPU)", "train_step",
                        "train_step", "fp32", 1.3),
    "gpt2": StepSection("## Training step, GPT-2 → DistilGPT2: fastdistil against the original distiller's "
                        "causal-LM step (CPU)", "train_step_gpt2", "train_step_gpt2", "fp32", None),
}


def step_setting(r: dict) -> str:
    """The models and batch shape of a result (so that a tiny smoke run cannot pass for the real one)."""
    name = STEP_MODEL_NAMES.get(r.get("model"))
    return ((f"{name} " if name else "") +
            f"teacher {r['teacher_params'] / 1e6:.0f} M params ({r['teacher_layers']} layers, hidden "
            f"{r['hidden_size']}), student {r['student_params'] / 1e6:.0f} M ({r['student_layers']} "
            f"layers), batch {r['batch_size']} × {r['seq_len']}" + (f", V = {r['vocab_size']:,}" if name else ""))


def tokens_ratio(result: dict | None, baseline: dict | None) -> float | None:
    if result and baseline and result.get("tokens_per_s") and baseline.get("tokens_per_s"):
        return result["tokens_per_s"] / baseline["tokens_per_s"]
    return None


def floor_sentence(by_provider: dict) -> str:
    """What the step's matrix products alone take, and the speed-up over the distiller they leave room for."""
    floor, distiller = by_provider.get("matmul_floor"), by_provider.get("distiller")
    ceiling = tokens_ratio(floor, distiller)
    if not (ceiling and floor.get("matmul_gflop")):
        return ""
    return (f" The step's matrix products alone ({floor['matmul_gflop']:,.0f} GFLOP, the same in every "
            f"provider) take {fmt_ms(median(floor))} ms here, {floor['matmul_gflop'] / median(floor):.0f} "
            f"GFLOP/s: no implementation that computes them can run more than {ceiling:.2f}× the distiller's "
            "tokens/s on this machine.")


def memory_sentence(by_provider: dict) -> str:
    """fastdistil's peak extra memory of a step beside the distiller's."""
    fastdistil, distiller = by_provider.get("fastdistil"), by_provider.get("distiller")
    if not (fastdistil and distiller):
        return ""
    return (f" Its step's peak extra memory is {fmt_mb(fastdistil['peak_extra_mb'] * MB)}, "
            f"{fastdistil['peak_extra_mb'] / distiller['peak_extra_mb']:.0%} of the distiller's "
            f"{fmt_mb(distiller['peak_extra_mb'] * MB)}.")


def cache_sentence(by_provider: dict) -> str:
    """The step from a teacher cache against online fastdistil's: tokens/s against the bar, and the memory
    training holds at its peak (weights, moments, the teacher's weights online, and the step's extra)."""
    cache, online = by_provider.get("fastdistil_cache"), by_provider.get("fastdistil")
    speedup = tokens_ratio(cache, online)
    if not speedup:
        return ""
    sentence = (f" From a teacher cache (k = {cache.get('top_k', '?')}, "
                f"{cache.get('cache_bytes_per_token', 0):,.0f} bytes per token) it runs {speedup:.2f}× online "
                f"fastdistil's tokens/s (target ≥ {CACHE_TARGET}×: {'met' if speedup >= CACHE_TARGET else 'NOT met'})")
    if cache.get("peak_total_mb") and online.get("peak_total_mb"):
        sentence += (f", at a peak of {fmt_mb(cache['peak_total_mb'] * MB)} held against "
                     f"{fmt_mb(online['peak_total_mb'] * MB)} (the teacher's weights alone are "
                     f"{fmt_mb((online['held_mb'] - cache['held_mb']) * MB)})")
    return sentence + ("; it skips the teacher's matrix products, so the floor below, the distiller's, does not "
                       "bound it.")


def step_headline(prec: str, setting: str, by_provider: dict, section: StepSection) -> list[str]:
    """The ratio to the distiller (against the section's bar, if it has one), the memory and the floor."""
    speedup = tokens_ratio(by_provider.get("fastdistil"), by_provider.get("distiller"))
    if prec != section.precision or not speedup:
        return []
    verdict = (f" (target ≥ {section.target}×: {'met' if speedup >= section.target else 'NOT met'})"
               if section.target else "")
    return [f"**{prec}, {setting}:** fastdistil runs {speedup:.2f}× the original distiller's non-padding "
            f"tokens/s{verdict}." + memory_sentence(by_provider) + cache_sentence(by_provider) +
            floor_sentence(by_provider), ""]


def step_groups(results: list[dict]) -> list[tuple[str, str, dict]]:
    """(precision, setting, {provider: result}) in precision order."""
    groups = defaultdict(dict)
    for r in results:
        if "precision" in r and "provider" in r:
            groups[(r["precision"], step_setting(r))][r["provider"]] = r
    return sorted(((p, s, g) for (p, s), g in groups.items()), key=lambda x: rank(DTYPE_ORDER)(x[0]))


def step_tables(groups: list[tuple[str, str, dict]], level: str) -> list[str]:
    """One table per (precision, setting) group, under a heading of `level`."""
    parts = []
    for prec, setting, by_provider in groups:
        # Results from before the held memory was recorded have no such column.
        held = any(r.get("peak_total_mb") for r in by_provider.values())
        cols = ["provider", "median step ms", "non-padding tokens/s", "vs distiller", "peak extra memory",
                *(["peak memory held"] if held else [])]
        rows = [[label, timing(r), f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "–",
                 ratio(r.get("tokens_per_s"), by_provider.get("distiller", {}).get("tokens_per_s")),
                 fmt_mb(r["peak_extra_mb"] * MB),
                 *([fmt_mb(r["peak_total_mb"] * MB) if r.get("peak_total_mb") else "–"] if held else [])]
                for p, (label, _) in STEP_PROVIDERS.items() if (r := by_provider.get(p))]
        parts += [f"{level} {prec}: {setting}", "", *table(cols, rows), ""]
    return parts


def train_step_section(data: dict, results: list[dict], figure, model: str = "bert") -> list[str]:
    """The CPU training-step section of one model row's results file."""
    groups = step_groups(results)
    if not groups:
        return []
    section = STEP_SECTIONS[model]
    parts = [section.heading, ""]
    for group in groups:
        parts += step_headline(*group, section)
    parts += step_tables(groups, "###")
    parts += [prose(section.template), *busy_note(results, data, "step"), ""]
    name = STEP_MODEL_NAMES.get(model)
    alt = "training tokens/s and memory by provider" + (f", {name}" if name else "")
    parts.append(figure(section.figure, alt, plot_train_step, groups))
    return parts


def plot_train_step(path: Path, groups: list[tuple[str, str, dict]]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.8 * len(groups)), squeeze=False)
    for (t_ax, m_ax), (prec, setting, by_provider) in zip(axes, groups):
        providers = [p for p in STEP_PROVIDERS if p in by_provider]
        labels = [textwrap.fill(STEP_PROVIDERS[p][0], 22) for p in providers]
        runs = [by_provider[p] for p in providers]
        rates = [r.get("tokens_per_s") or 0 for r in runs]
        # The interquartile range of the step time, as tokens/s.
        spread = [[rate - r["tokens_per_batch"] / r["stats"]["q3"] for rate, r in zip(rates, runs)],
                  [r["tokens_per_batch"] / r["stats"]["q1"] - rate for rate, r in zip(rates, runs)]]
        speedups = [tokens_ratio(r, by_provider.get("distiller")) for r in runs]
        colors = [STEP_PROVIDERS[p][1] for p in providers]
        bars(t_ax, labels, {"": (rates, colors)}, "non-padding tokens/s", f"{prec}: non-padding tokens/s",
             annotations={"": [f"{s:.2f}×" if s else "" for s in speedups]}, errors={"": spread})
        peaks = [r["peak_extra_mb"] for r in runs]
        bars(m_ax, labels, {"": (peaks, colors)}, "peak extra memory of a step (MB)",
             f"{prec}: peak extra memory of a step", annotations={"": [f"{m:,.0f} MB" for m in peaks]})
        t_ax.set_xlabel(setting, fontsize=8)
    save(fig, path)


# Size and inference latency ---------------------------------------------------------------------------------

ATTENTION_ORDER = ("fastdistil", "sdpa", "eager")
ROLE_COLORS = {"teacher": "tab:gray", "student": "tab:blue"}
PAIR_ORDER = ("bert-base", "tiny")


def inference_pairs(results: list[dict]) -> list[tuple[str, dict]]:
    """(model pair, {batch size: {attention: {role: result}}}), bert-base first."""
    tree = nested(results, "model", "batch_size", "attention", "role")
    return sorted(tree.items(), key=lambda kv: rank(PAIR_ORDER)(kv[0]))


def size_rows(pairs: list[tuple[str, dict]]) -> list[list[str]]:
    rows = []
    for pair, by_batch in pairs:
        r = any_result(by_batch)
        rows.append([pair, fmt_params(r["teacher_params"]), fmt_params(r["student_params"]),
                     f"{r['params_ratio']:.2f}", f"{1 - r['params_ratio']:.0%}"])
    paper_ratio = PAPER["student_params"] / PAPER["teacher_params"]
    rows.append(["paper: BERT-base, DistilBERT", fmt_params(PAPER["teacher_params"]),
                 fmt_params(PAPER["student_params"]), f"{paper_ratio:.2f}", f"{1 - paper_ratio:.0%}"])
    return rows


def inference_section(data: dict, results: list[dict], figure) -> list[str]:
    pairs = inference_pairs(results)
    if not pairs:
        return []
    parts = ["## Size and inference latency: teacher and student (CPU)", "",
             *table(["model pair", "teacher params", "student params", "student / teacher", "fewer params"],
                    size_rows(pairs)), ""]
    paper_time = PAPER["student_seconds"] / PAPER["teacher_seconds"]
    cols = ["batch", "attention", "teacher ms / sequence", "student ms / sequence", "student / teacher time",
            "student speed-up", "teacher tokens/s", "student tokens/s", "teacher vs eager", "student vs eager"]
    for pair, by_batch in pairs:
        rows = []
        for batch_size, by_attention in sorted(by_batch.items()):
            for attention in sorted(by_attention, key=rank(ATTENTION_ORDER)):
                t, s = (by_attention[attention].get(role) for role in ("teacher", "student"))
                eager = by_attention.get("eager", {})
                rows.append([str(batch_size), attention, *(timing(r, r and r["seconds_per_sequence"]) for r in (t, s)),
                             ratio(median(s), median(t), "{:.2f}"), ratio(median(t), median(s)),
                             *(f"{r['tokens_per_s']:,.0f}" if r and r.get("tokens_per_s") else "–" for r in (t, s)),
                             *(ratio(median(r), median(eager.get(role))) for role, r in (("teacher", t),
                                                                                        ("student", s)))])
        rows.append(["1", "paper (STS-B dev pass)", f"{PAPER['teacher_seconds']:.0f} s in all",
                     f"{PAPER['student_seconds']:.0f} s in all", f"{paper_time:.2f}",
                     f"{1 / paper_time:.2f}×", "–", "–", "–", "–"])
        r = any_result(by_batch)
        parts += [f"### {pair}: teacher {r['teacher_params'] / 1e6:.1f} M params, student "
                  f"{r['student_params'] / 1e6:.1f} M, hidden {r['hidden_size']}", "", *table(cols, rows, left=2),
                  "", f"{r['n_sequences']} sequences, {r['tokens']:,} tokens (lengths {r['seq_len_min']}–"
                      f"{r['seq_len_max']}, median {r['seq_len_median']:g}, mean {r['seq_len_mean']:.1f}); "
                      f"padded per batch: " + ", ".join(
                          f"{any_result(by_batch[b])['padded_tokens']:,} token slots at batch {b}"
                          for b in sorted(by_batch)) + ".", ""]
    parts += [prose("inference", paper_time=paper_time), *busy_note(results, data, "model"), ""]
    parts.append(figure("inference", "size and latency of teacher and student", plot_inference, pairs))
    return parts


def plot_inference(path: Path, pairs: list[tuple[str, dict]]) -> None:
    plt = pyplot()
    n_batches = max(len(by_batch) for _, by_batch in pairs)
    fig, axes = plt.subplots(len(pairs), n_batches, figsize=(5.5 * n_batches, 3.8 * len(pairs)), squeeze=False)
    for row, (pair, by_batch) in zip(axes, pairs):
        params = any_result(by_batch)
        for ax, (batch_size, by_attention) in zip(row, sorted(by_batch.items())):
            attentions = sorted(by_attention, key=rank(ATTENTION_ORDER))
            ms = {role: [r["seconds_per_sequence"] * 1e3 if r else 0
                         for r in (by_attention[a].get(role) for a in attentions)] for role in ROLE_COLORS}
            series = {f"{role} ({params[f'{role}_params'] / 1e6:.1f} M params)": (ms[role], color)
                      for role, color in ROLE_COLORS.items()}
            annotations = {list(series)[1]: [ratio(s, t, "{:.2f}") for t, s in zip(ms["teacher"], ms["student"])]}
            bars(ax, attentions, series, "ms per sequence", f"{pair}, batch {batch_size}", annotations)
    fig.suptitle("inference latency per sequence (student bars: student / teacher time; paper: "
                 f"{PAPER['student_seconds'] / PAPER['teacher_seconds']:.2f} at batch 1)", fontsize=9)
    save(fig, path)


# Export -----------------------------------------------------------------------------------------------------

EXPORT_RUNTIMES = {"pytorch-fp32": ("PyTorch fp32", "tab:gray"), "onnxruntime-fp32": ("ONNX Runtime fp32", "tab:blue"),
                   "onnxruntime-int8": ("ONNX Runtime int8", "tab:green"),
                   "torch-int8": ("torch.export int8 (torchao)", "tab:orange")}
EXPORT_MODELS = ("bert-base", "distilbert-base", "tiny-teacher", "tiny-student")
EXPORT_PAIRS = (("bert-base", "distilbert-base"), ("tiny-teacher", "tiny-student"))  # (teacher, student)
# The bar: for the bert-base shape at batch 1, ONNX Runtime int8 runs faster than PyTorch fp32.
EXPORT_TARGET = ("bert-base", 1, "onnxruntime-int8", "pytorch-fp32")


def export_models(tree: dict) -> list[str]:
    return sorted(tree, key=rank(EXPORT_MODELS))


def export_headline(latency: dict) -> list[str]:
    model, batch_size, fast, base = EXPORT_TARGET
    by_runtime = latency.get(model, {}).get(batch_size, {})
    if fast not in by_runtime or base not in by_runtime:
        return []
    a, b = by_runtime[fast], by_runtime[base]
    speedup = median(b) / median(a)
    return [f"**{model} shape, batch {batch_size}:** {EXPORT_RUNTIMES[fast][0]} runs "
            f"{timing(a, a['seconds_per_sequence'])} ms per sequence, {EXPORT_RUNTIMES[base][0]} "
            f"{timing(b, b['seconds_per_sequence'])} ms: {speedup:.2f}× faster, measured in one run (target: "
            f"faster than {EXPORT_RUNTIMES[base][0]}: {'met' if speedup > 1 else 'NOT met'}).", ""]


def export_machine(data: dict, results: list[dict]) -> str:
    machine = data.get("machine_info", {})
    first = results[0]
    versions = first.get("versions") or {}
    opset = next((r["opset"] for r in results if r.get("opset")), None)
    return (f"Measured on {machine.get('cpu_model', '?')} ({machine.get('cpu_count', '?')} cores), "
            f"{first['torch_threads']} threads for PyTorch and ONNX Runtime alike; ONNX opset {opset}, onnxruntime "
            f"{versions.get('onnxruntime', '?')}, torchao {versions.get('torchao', '?')}, torch "
            f"{versions.get('torch', '?')}.")


def export_size_rows(latency: dict) -> list[list[str]]:
    rows = []
    for model in export_models(latency):
        by_runtime = {rt: r for by_rt in latency[model].values() for rt, r in by_rt.items()}
        size = {rt: r["size_bytes"] for rt, r in by_runtime.items()}
        rows.append([model, fmt_params(any_result(by_runtime)["params"]),
                     *(fmt_mb(size.get(rt)) for rt in EXPORT_RUNTIMES),
                     ratio(size.get("onnxruntime-int8"), size.get("onnxruntime-fp32"), "{:.2f}")])
    rows.append(["paper: DistilBERT", fmt_params(PAPER["student_params"]), f"{PAPER['student_mb']} MB", "–", "–", "–",
                 "–"])
    return rows


def export_latency_rows(latency: dict, batch_size: int) -> list[list[str]]:
    rows = []
    for model in export_models(latency):
        by_runtime = latency[model].get(batch_size, {})
        if not by_runtime:
            continue
        base = by_runtime.get("pytorch-fp32")
        rows.append([model, *(timing(r, r["seconds_per_sequence"]) if (r := by_runtime.get(rt)) else "–"
                              for rt in EXPORT_RUNTIMES),
                     *(ratio(median(base), median(by_runtime.get(rt))) for rt in list(EXPORT_RUNTIMES)[1:])])
    return rows


def export_pair_rows(latency: dict) -> list[list[str]]:
    """Student / teacher time per runtime, beside the paper's 410 s / 668 s."""
    rows = []
    for teacher, student in EXPORT_PAIRS:
        for batch_size in sorted(set(latency.get(teacher, {})) & set(latency.get(student, {}))):
            t, s = latency[teacher][batch_size], latency[student][batch_size]
            rows.append([f"{teacher} → {student}", str(batch_size),
                         *(ratio(median(s.get(rt)), median(t.get(rt)), "{:.2f}") for rt in EXPORT_RUNTIMES)])
    paper = f"{PAPER['student_seconds'] / PAPER['teacher_seconds']:.2f}"
    rows.append(["paper: BERT-base → DistilBERT (STS-B dev pass)", "1", paper, "–", "–", "–"])
    return rows


def export_accuracy_rows(accuracy: dict) -> list[list[str]]:
    rows = []
    for model in export_models(accuracy):
        base = accuracy[model].get("pytorch-fp32")
        for rt, (label, _) in EXPORT_RUNTIMES.items():
            if (r := accuracy[model].get(rt)) is None:
                continue
            drop = f"{100 * (r['accuracy'] - base['accuracy']):+.2f}" if base else "–"
            rows.append([model, label, f"{r['accuracy']:.2%}", drop, f"{r['agreement_with_pytorch_fp32']:.2%}",
                         timing(r)])
    return rows


def export_student_size(results: list[dict]) -> str | None:
    """The distilbert-base shape's size on disk in fp32 and in ONNX int8, for the summary beside the paper's."""
    student = nested([r for r in results if r.get("case") == "latency" and r["model"] == "distilbert-base"],
                     "runtime", "batch_size")
    fp32, int8 = (student.get(rt) for rt in ("pytorch-fp32", "onnxruntime-int8"))
    if not (fp32 and int8):
        return None
    return (f"{fmt_mb(any_result(fp32)['size_bytes'])} fp32 → {fmt_mb(any_result(int8)['size_bytes'])} ONNX int8 "
            "(distilbert-base shape)")


def export_section(data: dict, results: list[dict], figure) -> list[str]:
    latency = nested([r for r in results if r.get("case") == "latency"], "model", "batch_size", "runtime")
    accuracy = nested([r for r in results if r.get("case") == "accuracy"], "model", "runtime")
    if not latency:
        return []
    labels = [label for label, _ in EXPORT_RUNTIMES.values()]
    parts = ["## Export: size, CPU latency and accuracy of ONNX Runtime and torch.export models", "",
             *export_headline(latency), export_machine(data, results), "",
             "### Size on disk", "",
             *table(["model", "params", *labels, "ONNX int8 / fp32"], export_size_rows(latency)), ""]
    for batch_size in sorted({b for by_batch in latency.values() for b in by_batch}):
        parts += [f"### Latency at batch {batch_size}: ms per sequence", "",
                  *table(["model", *labels, *(f"{label} speed-up" for label in labels[1:])],
                         export_latency_rows(latency, batch_size)), ""]
    parts += ["### Student / teacher time, per runtime", "",
              *table(["pair", "batch", *labels], export_pair_rows(latency), left=2), ""]
    if accuracy:
        first = any_result(accuracy)
        parts += [f"### {first['task']} accuracy of the fine-tuned tiny pair, before and after quantization "
                  f"({first['eval_examples']:,} held-out texts, {first['max_seq_len']} tokens)", "",
                  *table(["model", "runtime", "accuracy", "vs PyTorch fp32 (points)", "same prediction as PyTorch "
                          "fp32", "held-out pass ms"], export_accuracy_rows(accuracy), left=2), ""]
    r = any_result(latency)
    parts += [prose("export", n_sequences=r["n_sequences"], tokens=r["tokens"], seq_len_min=r["seq_len_min"],
                    seq_len_max=r["seq_len_max"], seq_len_median=r["seq_len_median"],
                    paper_time=PAPER["student_seconds"] / PAPER["teacher_seconds"]),
              *busy_note(results, data, "model"), ""]
    parts.append(figure("export", "export size and latency by runtime", plot_export, latency))
    return parts


def plot_export(path: Path, latency: dict) -> None:
    plt = pyplot()
    batch_sizes = sorted({b for by_batch in latency.values() for b in by_batch})
    models = export_models(latency)
    fig, axes = plt.subplots(1, 1 + len(batch_sizes), figsize=(5.5 * (1 + len(batch_sizes)), 4.2), squeeze=False)
    sizes = {label: ([(next((r["size_bytes"] for by_rt in latency[m].values() if (r := by_rt.get(rt))), 0)) / MB
                      for m in models], color) for rt, (label, color) in EXPORT_RUNTIMES.items()}
    bars(axes[0][0], models, sizes, "MB on disk", "size on disk")
    for ax, batch_size in zip(axes[0][1:], batch_sizes):
        series, notes = {}, {}
        for rt, (label, color) in EXPORT_RUNTIMES.items():
            runs = [latency[m].get(batch_size, {}).get(rt) for m in models]
            series[label] = ([r["seconds_per_sequence"] * 1e3 if r else 0 for r in runs], color)
            base = [latency[m].get(batch_size, {}).get("pytorch-fp32") for m in models]
            notes[label] = [ratio(median(b), median(r), "{:.1f}×") for b, r in zip(base, runs)]
        bars(ax, models, series, "ms per sequence (log)", f"latency at batch {batch_size} (bars: speed-up vs PyTorch "
             "fp32)", annotations=notes)
    for ax in axes[0]:  # the bert-base shapes and the tiny pair differ by two orders of magnitude
        ax.set_yscale("log")
    save(fig, path)


# Teacher cache ----------------------------------------------------------------------------------------------

CACHE_AGREEMENT_POINTS = 1.0  # issue 18: the default k is the smallest within this of online agreement


def teacher_cache_section(data: dict, results: list[dict], figure) -> list[str]:
    """The default run online and from top-k caches: what a cache costs and what its truncation costs."""
    online = next((r for r in results if r.get("case") == "online"), None)
    cached = sorted((r for r in results if r.get("top_k")), key=lambda r: r["top_k"])
    if not (online and cached):
        return []
    within = [r for r in cached if 100 * (online["agreement"] - r["agreement"]) <= CACHE_AGREEMENT_POINTS]
    default = cached[0].get("default_top_k")
    smallest = within[0]["top_k"] if within else None
    verdict = (f"fastdistil.cache_teacher's default, k = {default}, is that k" if default == smallest else
               f"fastdistil.cache_teacher's default is k = {default}, NOT that k")
    headline = (f"**Held-out top-1 agreement with the teacher:** online {online['agreement']:.2%}; the smallest k "
                f"within {CACHE_AGREEMENT_POINTS:g} point of it is k = {smallest} ({within[0]['agreement']:.2%}). "
                if within else f"**No k measured comes within {CACHE_AGREEMENT_POINTS:g} point of online "
                               f"agreement ({online['agreement']:.2%}).** ")
    cols = ["run", "bytes / token", "cache on disk", "cache made in", "training tokens/s", "held-out agreement",
            "vs online (points)", "student held-out MLM loss", f"{online['task']} student", "retention"]
    rows = []
    for r in [online, *cached]:
        cache = r.get("top_k") is not None
        rows.append([f"from a cache, k = {r['top_k']}" if cache else "online",
                     f"{r['cache_bytes_per_token']:,.0f}" if cache else "–",
                     fmt_mb(r["cache_bytes"]) if cache else "–",
                     f"{r['cache_wall_s']:.0f} s" if cache else "–",
                     f"{r['train_tokens_per_s']:,.0f}", f"{r['agreement']:.2%}",
                     f"{100 * (r['agreement'] - online['agreement']):+.2f}" if cache else "–",
                     f"{r['student_heldout_mlm_loss']:.3f}", f"{r['task_student']:.4f}", f"{r['retention']:.1%}"])
    return ["## Teacher cache: the default run from top-k caches against online", "",
            headline + verdict + ".", "", *table(cols, rows, left=1), "",
            prose("teacher_cache", rows=online["heldout_masked_rows"], teacher_loss=online["teacher_heldout_mlm_loss"],
                  task=online["task"], teacher_score=online["task_teacher"], tokens=cached[0]["cache_tokens"]),
            *busy_note(results, data, "case"), "",
            figure("teacher_cache", "agreement and cache size against k", plot_teacher_cache, online, cached)]


def plot_teacher_cache(path: Path, online: dict, cached: list[dict]) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    ks = [r["top_k"] for r in cached]
    left.plot(ks, [100 * r["agreement"] for r in cached], "o-", color="tab:purple", label="from the cache (bucket)")
    left.axhline(100 * online["agreement"], color="tab:blue", linestyle="--", label="online")
    left.axhspan(100 * online["agreement"] - CACHE_AGREEMENT_POINTS, 100 * online["agreement"], color="tab:blue",
                 alpha=0.1, label=f"within {CACHE_AGREEMENT_POINTS:g} point")
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set(xlabel="k", ylabel="held-out top-1 agreement (%)", title="agreement with the teacher")
    left.legend(fontsize=8)
    bars(right, [f"k = {k}" for k in ks], {"bytes per token": ([r["cache_bytes_per_token"] for r in cached],
                                                                "tab:purple")},
         "bytes per token", "cache size per token")
    save(fig, path)


# Downstream retention ---------------------------------------------------------------------------------------


def eval_label(result: dict, results: list[dict]) -> str:
    """The run folder's name, or its path when two evaluations share one."""
    names = [r["path"].resolve().parent.name for r in results]
    name = result["path"].resolve().parent.name
    return str(result["path"].parent) if names.count(name) > 1 else name


def retention_section(evals: list[dict], figure) -> list[str]:
    evals = [e for e in evals if "student_distilled" not in e]  # those have a section of their own
    if not evals:
        return []
    cols = ["run", "task", "score", "teacher", "student", "random-init student", "retention", "teacher params",
            "student params"]
    rows = []
    for e in evals:
        models = e.get("models") if isinstance(e.get("models"), dict) else {}
        metrics = (models.get("student") or {}).get("metrics")
        params = [fmt_params((models.get(m) or {}).get("params")) for m in ("teacher", "student")]
        score = ("mean of " if len(metrics) > 1 else "") + ", ".join(metrics) if metrics else "–"
        rows.append([eval_label(e, evals), str(e.get("task", "–")), score,
                     f"{e['teacher']:.4g}", f"{e['student']:.4g}", f"{e['random_student']:.4g}",
                     f"{e['retention']:.1%}", *params])
    rows.append(["paper: BERT-base → DistilBERT", "GLUE dev (9 tasks)", "macro-score", f"{PAPER['teacher_glue']}",
                 f"{PAPER['student_glue']}", "–", f"{PAPER['student_glue'] / PAPER['teacher_glue']:.1%}",
                 fmt_params(PAPER["teacher_params"]), fmt_params(PAPER["student_params"])])
    parts = ["## Downstream retention: student against teacher", "", *table(cols, rows, left=3), "",
             prose("retention"), ""]
    parts.append(figure("retention", "downstream retention", plot_retention, evals))
    return parts


def plot_retention(path: Path, evals: list[dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 * len(evals)), 3.8))
    labels = [f"{eval_label(e, evals)}\n{e.get('task', '')}" for e in evals]
    series = {"teacher": ([e["teacher"] for e in evals], "tab:gray"),
              "student": ([e["student"] for e in evals], "tab:blue"),
              "random-init student": ([e["random_student"] for e in evals], "tab:red")}
    bars(ax, labels, series, "score", "downstream score (student bars: retention; paper: 97 %)",
         annotations={"student": [f"{e['retention']:.0%}" for e in evals]})
    save(fig, path)


# Task-specific distillation ---------------------------------------------------------------------------------


def mean_spread(values: list[float]) -> str:
    """mean ± sample standard deviation, in percent."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1%} ± {spread:.1%}"


def kl_to_teacher(result: dict, model: str) -> str:
    kl = ((result.get("models") or {}).get(model) or {}).get("kl_to_teacher")
    return f"{kl:.3f}" if isinstance(kl, (int, float)) else "–"


def task_distillation_section(evals: list[dict], figure) -> list[str]:
    """Students fine-tuned with and without the fine-tuned teacher's task logits (`evaluate --distill`), one row
    per evaluation (seed), with the mean and spread of both retentions and the paper's Table 2 beside them."""
    evals = [e for e in evals if isinstance(e.get("student_distilled"), (int, float))]
    if not evals:
        return []
    cols = ["run", "task", "seed", "teacher", "student", "student (D)", "retention", "retention (D)",
            "KL to teacher", "KL to teacher (D)"]
    rows = [[e["path"].resolve().parent.name, str(e.get("task", "–")),
             str((e.get("hyperparameters") or {}).get("seed", "–")),
             f"{e['teacher']:.4g}", f"{e['student']:.4g}", f"{e['student_distilled']:.4g}",
             f"{e['student'] / e['teacher']:.1%}", f"{e['student_distilled'] / e['teacher']:.1%}",
             kl_to_teacher(e, "student"), kl_to_teacher(e, "student_distilled")] for e in evals]
    plain = [e["student"] / e["teacher"] for e in evals]
    distilled = [e["student_distilled"] / e["teacher"] for e in evals]
    gains = [e["student_distilled"] - e["student"] for e in evals]
    rows.append([f"mean ± sd of {len(evals)}", "", "", "", "", "", mean_spread(plain), mean_spread(distilled), "", ""])
    p = PAPER
    rows.append(["paper: BERT-base → DistilBERT", "SQuAD 1.1 dev", "", f"{p['teacher_squad'][0]} / "
                 f"{p['teacher_squad'][1]}", f"{p['student_squad'][0]} / {p['student_squad'][1]}",
                 f"{p['student_d_squad'][0]} / {p['student_d_squad'][1]}",
                 " / ".join(f"{s / t:.1%}" for s, t in zip(p["student_squad"], p["teacher_squad"])),
                 " / ".join(f"{s / t:.1%}" for s, t in zip(p["student_d_squad"], p["teacher_squad"])), "–", "–"])
    better = sum(g > 0 for g in gains)
    return ["## Task-specific distillation: fine-tuning with the teacher's task logits", "",
            *table(cols, rows, left=3), "",
            prose("task_distillation", n=len(evals), better=better,
                  gain_mean=100 * statistics.fmean(gains), gain_min=100 * min(gains), gain_max=100 * max(gains)), "",
            figure("task_distillation", "task-specific distillation", plot_task_distillation, evals), ""]


def plot_task_distillation(path: Path, evals: list[dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(evals)), 3.8))
    labels = [f"{e.get('task', '')}, seed {(e.get('hyperparameters') or {}).get('seed', '?')}" for e in evals]
    series = {"teacher": ([e["teacher"] for e in evals], "tab:gray"),
              "student": ([e["student"] for e in evals], "tab:blue"),
              "student (D)": ([e["student_distilled"] for e in evals], "tab:green"),
              "random-init student": ([e["random_student"] for e in evals], "tab:red")}
    bars(ax, labels, series, "score", "fine-tuning with (D) and without the teacher's logits (bars: retention)",
         annotations={"student": [f"{e['student'] / e['teacher']:.1%}" for e in evals],
                      "student (D)": [f"{e['student_distilled'] / e['teacher']:.1%}" for e in evals]})
    ax.legend(fontsize=8, ncol=len(series), loc="upper center")  # one row: the bars reach near the top
    save(fig, path)


# GPU ----------------------------------------------------------------------------------------------------------

GPU_SUITES = ("gpu", "train_step_gpu")  # read together into one section
GPU_LOSS_PROVIDERS = {"triton": ("fused (fastdistil, Triton)", "tab:blue"), "eager": ("eager reference", "tab:red"),
                      "compiled": ("torch.compile(reference)", "tab:orange"),
                      "liger": ("Liger-Kernel KL + CE", "tab:purple")}
ATTENTION_PROVIDERS = {"triton": ("fastdistil (Triton)", "tab:blue"), "sdpa_flash": ("SDPA flash", "tab:green"),
                       "sdpa_efficient": ("SDPA memory-efficient", "tab:orange")}
GPU_OPS = {"triple_loss": "triple loss", "fused_linear": "fused linear", "attention": "attention"}


def gpu_ms(result: dict | None) -> float | None:
    """do_bench's median in seconds (report_format's unit), None without a result."""
    return result["median_ms"] / 1e3 if result else None


def rate_of_peak(result: dict | None) -> str:
    if not result:
        return "–"
    fraction = result.get("fraction_of_peak")
    return fmt_rate(result["gbps"]) + (f" ({fraction:.0%})" if fraction is not None else "")


def gpu_loss_part(results: list[dict]) -> list[str]:
    tree = nested([r for r in results if r.get("op") == "triple_loss"], "dtype", "provider", "mode")
    if not tree:
        return []
    first = any_result(tree)
    cols = ["dtype", "provider", "forward ms", "forward + backward ms", "backward ms", "forward GB/s (of peak)",
            "fwd + bwd GB/s (of peak)", "fwd + bwd vs eager", "peak extra memory"]
    rows = []
    for dtype, by_provider in by_dtype(tree):
        eager = by_provider.get("eager", {}).get("full")
        for provider, (label, _) in GPU_LOSS_PROVIDERS.items():
            forward, full = (by_provider.get(provider, {}).get(mode) for mode in ("forward", "full"))
            if not (forward or full):
                continue
            backward = gpu_ms(full) - gpu_ms(forward) if forward and full else None
            rows.append([dtype, label, fmt_ms(gpu_ms(forward)), fmt_ms(gpu_ms(full)), fmt_ms(backward),
                         rate_of_peak(forward), rate_of_peak(full), ratio(gpu_ms(eager), gpu_ms(full), "{:.1f}×"),
                         fmt_mb(full and full["peak_extra_bytes"])])
    return [f"### Triple loss: N = {first['N']:,} token rows, V = {first['V']:,}", "", *table(cols, rows, left=2),
            "", prose("gpu_triple_loss", timer=first["timer"], peak=peak_sentence(first)), ""]


def peak_sentence(result: dict) -> str:
    if not result.get("peak_gbps"):
        return f"no peak: the driver reports no memory clock to {result['peak_source']}"
    return f"{fmt_rate(result['peak_gbps'])} GB/s ({result['peak_source']})"


def gpu_linear_part(results: list[dict]) -> list[str]:
    tree = nested([r for r in results if r.get("op") == "fused_linear"], "dtype", "provider")
    if not tree:
        return []
    first = any_result(tree)
    cols = ["dtype", "provider", "forward + backward ms", "matmul TFLOP/s", "peak extra memory",
            "time / logits-then-fused", "memory / logits-then-fused"]
    rows = []
    for dtype, by_provider in by_dtype(tree):
        logits = by_provider.get("project_fused")
        for provider, (label, _) in LINEAR_PROVIDERS.items():
            if r := by_provider.get(provider):
                rows.append([dtype, label, fmt_ms(gpu_ms(r)), fmt_rate(r["tflops"]), fmt_mb(r["peak_extra_bytes"]),
                             ratio(gpu_ms(r), gpu_ms(logits)),
                             ratio(r["peak_extra_bytes"], logits and logits["peak_extra_bytes"], "{:.1%}")])
    return [f"### Vocabulary projection + triple loss: N = {first['N']:,}, D = {first['D']}, V = {first['V']:,}", "",
            *table(cols, rows, left=2), "",
            prose("gpu_fused_linear", timer=first["timer"]), ""]


def gpu_attention_part(results: list[dict]) -> list[str]:
    tree = nested([r for r in results if r.get("op") == "attention"], "dtype", "masked", "dropout_p", "provider",
                  "mode")
    if not tree:
        return []
    first = any_result(tree)
    cols = ["dtype", "keys", "dropout", "provider", "forward ms", "backward ms", "forward TFLOP/s",
            "backward TFLOP/s", "fwd + bwd vs SDPA memory-efficient"]
    rows = []
    for dtype, by_mask in by_dtype(tree):
        for masked, by_dropout in sorted(by_mask.items()):
            for dropout, by_provider in sorted(by_dropout.items()):
                efficient = by_provider.get("sdpa_efficient", {})
                for provider, (label, _) in ATTENTION_PROVIDERS.items():
                    modes = by_provider.get(provider)
                    if not modes:
                        continue
                    forward, backward = modes.get("forward"), modes.get("backward")
                    rows.append([dtype, "10 % padding masked" if masked else "dense", f"{dropout:g}", label,
                                 fmt_ms(gpu_ms(forward)), fmt_ms(gpu_ms(backward)),
                                 fmt_rate(forward and forward["tflops"]), fmt_rate(backward and backward["tflops"]),
                                 ratio(fwd_bwd(efficient), fwd_bwd(modes))])
    shape = f"B × H × L × Dh = {first['B']} × {first['H']} × {first['L']} × {first['Dh']}"
    return [f"### Attention: {shape}", "", *table(cols, rows, left=4), "",
            prose("gpu_attention", timer=first["timer"]), ""]


def fwd_bwd(modes: dict) -> float | None:
    forward, backward = gpu_ms(modes.get("forward")), gpu_ms(modes.get("backward"))
    return forward + backward if forward and backward else None


def gpu_step_part(data: dict, results: list[dict], figure, suffix: str) -> list[str]:
    groups = step_groups(results)
    if not groups:
        return []
    skipped = [f"{prec} {STEP_PROVIDERS[p][0]}: {r['skipped_steps']}" for prec, _, by_provider in groups
               for p, r in by_provider.items() if r.get("skipped_steps")]
    return ["### Training step: fastdistil against the original distiller", "", *step_tables(groups, "####"),
            prose("gpu_train_step") + (" Steps whose update the scaler still skipped (cheaper steps) after that: "
                                       + "; ".join(skipped) + "." if skipped else ""),
            *busy_note(results, data, "step"), "",
            figure("gpu_train_step", f"training tokens/s and memory by provider{suffix}", plot_train_step, groups),
            ""]


def is_dry_run(results: list[dict]) -> bool:
    """The GPU benchmarks' dry run writes the GPU files with CPU results."""
    return any(r.get("device") != "cuda" for r in results)


def gpu_description(results: list[dict]) -> list[str]:
    """The section's heading and what it was measured on; a dry run says so before anything."""
    if is_dry_run(results):
        return ["## GPU benchmarks: DRY RUN on CPU, not GPU figures", "",
                prose("gpu_dry_run"), ""]
    setups = sorted({(r["gpu"], r["capability"], r.get("gpu_memory_gb"), r.get("driver"), r["cuda"], r["torch"],
                      r["triton"]) for r in results}, key=str)
    lines = [f"{gpu} ({capability}, {memory:.0f} GB), driver {driver or '?'}, CUDA {cuda}, torch {torch_version}, "
             f"Triton {triton}" for gpu, capability, memory, driver, cuda, torch_version, triton in setups]
    heading = f"## GPU: {' / '.join(sorted({r['gpu'] for r in results}))}"
    tiny = " " + prose("gpu_tiny") if any(r.get("tiny") for r in results) else ""
    return [heading, "", "Measured on " + "; ".join(lines) + "." + tiny, ""]


def wall_times(results: list[dict], steps: list[dict]) -> list[str]:
    """Where the run's time went, per group: what a GPU check's time budget is made of."""
    totals = defaultdict(float)
    for r in results:
        totals[GPU_OPS.get(r.get("op"), "other")] += r.get("case_wall_s") or 0
    totals["training step"] = sum(r.get("case_wall_s") or 0 for r in steps)
    if not any(totals.values()):
        return []
    cases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in totals.items() if seconds)
    return [prose("gpu_wall_time", cases=cases, total=sum(totals.values())), ""]


def gpu_section(runs: dict[str, tuple[dict, list[dict]]], figure) -> list[str]:
    """The loss, the fused linear, attention and the training step on a GPU, from gpu.json (bench/
    test_bench_gpu.py) and train_step_gpu.json (bench/test_bench_train_step.py on CUDA)."""
    kernels = runs.get("gpu", ({}, []))[1]
    step_data, step_results = runs.get("train_step_gpu", ({}, []))
    steps = [r for r in step_results if "provider" in r]
    if not kernels and not steps:
        return []
    suffix = " (dry run on CPU, not GPU figures)" if is_dry_run(kernels + steps) else ""
    parts = [*gpu_description(kernels + steps), *gpu_loss_part(kernels), *gpu_linear_part(kernels),
             *gpu_attention_part(kernels)]
    if any(r.get("op") in ("triple_loss", "attention") for r in kernels):
        parts += [figure("gpu_kernels", f"GPU loss and attention times by provider{suffix}", plot_gpu_kernels,
                         kernels, suffix), ""]
    return parts + gpu_step_part(step_data, steps, figure, suffix) + wall_times(kernels, steps)


def plot_gpu_kernels(path: Path, results: list[dict], suffix: str) -> None:
    """Forward + backward time per provider: the loss by dtype (left), attention by configuration (right)."""
    loss = nested([r for r in results if r.get("op") == "triple_loss" and r["mode"] == "full"], "dtype", "provider")
    attention = nested([r for r in results if r.get("op") == "attention"], "dtype", "masked", "dropout_p",
                       "provider", "mode")
    configs = [(f"{dtype}\n{'masked' if masked else 'dense'}, p={dropout:g}", by_provider)
               for dtype, by_mask in by_dtype(attention) for masked, by_dropout in sorted(by_mask.items())
               for dropout, by_provider in sorted(by_dropout.items())]
    dtypes = [dtype for dtype, _ in by_dtype(loss)]
    panels = [(dtypes, {label: ([(gpu_ms(loss[d].get(p)) or 0) * 1e3 for d in dtypes], color)
                        for p, (label, color) in GPU_LOSS_PROVIDERS.items() if any(p in loss[d] for d in dtypes)},
               f"triple loss{suffix}"),
              ([label for label, _ in configs],
               {label: ([(fwd_bwd(by_provider.get(p, {})) or 0) * 1e3 for _, by_provider in configs], color)
                for p, (label, color) in ATTENTION_PROVIDERS.items() if any(p in by for _, by in configs)},
               f"attention{suffix}")]
    panels = [panel for panel in panels if panel[0]]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (labels, series, title) in zip(axes[0], panels):
        bars(ax, labels, series, "forward + backward ms", title)
    save(fig, path)


# The report -------------------------------------------------------------------------------------------------

SUITES = {"inference": inference_section, "export": export_section, "train_step": train_step_section,
          "train_step_gpt2": functools.partial(train_step_section, model="gpt2"),
          "teacher_cache": teacher_cache_section, "triple_loss": triple_loss_section,
          "fused_linear": fused_linear_section}


def versions_table(runs: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    """Hardware, versions and CPU contention of each results file."""
    cols = ["results", "run", "CPU", "cores / torch threads", "vector ISA (kernel)", "copy bandwidth", "torch",
            "transformers", "Python", "fastdistil", "others' CPU share: median, max"]
    rows = []
    for name, (data, results) in runs.items():
        machine = data.get("machine_info", {})
        flags = ", ".join(f for f in machine.get("cpu_flags", [])
                          if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx"))) or "no AVX2"
        isa = "/".join(sorted({r["cpu_isa"] for r in results if r.get("cpu_isa")})) or "?"
        bandwidth = (machine.get("copy_bandwidth", {}).get("bytes_per_s")
                     or next((r["copy_bandwidth_bytes_per_s"] for r in results
                              if r.get("copy_bandwidth_bytes_per_s")), None))
        transformers = (machine.get("transformers_version")
                        or next((r["transformers_version"] for r in results if r.get("transformers_version")), "–"))
        shares = [r["other_cpu_fraction"] for r in results if r.get("other_cpu_fraction") is not None]
        contention = (f"{statistics.median(shares):.0%}, {max(shares):.0%}" + (" †" if max(shares) > BUSY else "")
                      if shares else "not recorded")
        revision = machine.get("fastdistil_git", data.get("commit_info", {}).get("id", "?")[:12])
        rows.append([f"{name}.json", data.get("datetime", "?")[:16].replace("T", " "),
                     machine.get("cpu_model", machine.get("cpu", {}).get("brand_raw", "?")),
                     f"{machine.get('cpu_count', '?')} / {machine.get('torch_threads', '?')}", f"{flags} ({isa})",
                     f"{bandwidth / 1e9:.1f} GB/s" if bandwidth else "–", machine.get("torch_version", "?"),
                     transformers, machine.get("python_version", "?"),
                     f"{machine.get('fastdistil_version', '?')} @ {revision}", contention])
    return table(cols, rows, left=len(cols) - 1)


def paper_summary(runs: dict, evals: list[dict]) -> list[str]:
    """The paper's three headline numbers beside ours."""
    pairs = dict(inference_pairs(runs["inference"][1])) if "inference" in runs else {}
    base = pairs.get("bert-base") or next(iter(pairs.values()), None)
    params = time = "not measured"
    if base:
        r = any_result(base)
        params = (f"{fmt_params(r['teacher_params'])} → {fmt_params(r['student_params'])} "
                  f"({1 - r['params_ratio']:.0%} fewer; {r['model']} shape)")
        times = []
        for batch_size, by_attention in sorted(base.items()):
            roles = by_attention.get("fastdistil") or next(iter(by_attention.values()))
            if "teacher" in roles and "student" in roles:
                times.append(f"{median(roles['student']) / median(roles['teacher']):.2f} at batch {batch_size}")
        time = ", ".join(times) + " (fastdistil attention, corpus sequences)" if times else time
    plain = [e for e in evals if "student_distilled" not in e]
    retained = [f"{e['retention']:.1%} ({eval_label(e, plain)}, {e.get('task', '?')})" for e in plain]
    distilled = [e for e in evals if "student_distilled" in e]
    if distilled:
        retained.append(f"{mean_spread([e['student'] / e['teacher'] for e in distilled])} fine-tuned alone, "
                        f"{mean_spread([e['student_distilled'] / e['teacher'] for e in distilled])} with task "
                        f"distillation ({len(distilled)} seeds, {distilled[0].get('task', '?')})")
    retention = "; ".join(retained)
    size = export_student_size(runs["export"][1]) if "export" in runs else None
    p = PAPER
    return table(["", "paper (BERT-base → DistilBERT)", "fastdistil, this machine"], [
        ["parameters", f"{fmt_params(p['teacher_params'])} → {fmt_params(p['student_params'])} "
                       f"({1 - p['student_params'] / p['teacher_params']:.0%} fewer)", params],
        ["inference time, student / teacher", f"{p['student_seconds']:.0f} s / {p['teacher_seconds']:.0f} s = "
                                              f"{p['student_seconds'] / p['teacher_seconds']:.2f} (STS-B dev, CPU, "
                                              "batch 1)", time],
        ["score retained", f"{p['student_glue']} / {p['teacher_glue']} = {p['student_glue'] / p['teacher_glue']:.0%}"
                           " (GLUE dev macro-score)", retention or "not measured"],
        ["student size on disk", f"{p['student_mb']} MB (fp32)", size or "not measured"],
    ], left=3)


def build(results_dir: Path, eval_paths: list[Path], figure) -> tuple[str, list[str]]:
    """The report's markdown and the inputs it lacks; `figure(name, alt, plot, *args, **kwargs)` writes a plot and
    returns its link."""
    runs, missing = {}, []
    for name in (*SUITES, *GPU_SUITES):
        path = results_dir / f"{name}.json"
        if path.exists():
            runs[name] = load_suite(path)
        else:
            where = " on a GPU machine (`bash scripts/gpu_check.sh` runs it)" if name in GPU_SUITES else ""
            missing.append(f"- {name}: {path.name} not found; measure it{where} with `{MEASURE[name]}`")
    evals = []
    for path in eval_paths:
        if path.exists():
            evals.append(load_eval(path))
        else:
            missing.append(f"- downstream retention: {path} not found")
    if not eval_paths:
        missing.append("- downstream retention: no evaluation output given; make one with `python -m "
                       "fastdistil.evaluate RUN_DIR --task wiki-topic` and pass `--eval "
                       "RUN_DIR/eval_wiki-topic.json`")
    sections = []
    for name, (data, results) in runs.items():
        if name in GPU_SUITES:  # both go into one section, below
            found = bool(results)
        else:
            section = SUITES[name](data, results, figure)
            sections += section + [""] if section else []
            found = bool(section)
        if not found:
            missing.append(f"- {name}: {results_dir / f'{name}.json'} holds no {name} results")
    gpu = gpu_section({name: runs[name] for name in GPU_SUITES if name in runs}, figure)
    sections += gpu + [""] if gpu else []
    sections += retention_section(evals, figure)
    distilled = task_distillation_section(evals, figure)
    sections += [""] + distilled if distilled and sections and sections[-1] else distilled
    parts = ["## fastdistil beside the paper", "", *paper_summary(runs, evals), ""]
    if runs:
        parts += ["Measured on (per results file; † other processes took more than "
                  f"{BUSY:.0%} of the CPUs during some timings):", "", *versions_table(runs), ""]
    if missing:
        parts += ["Not in this report:", "", *missing, ""]
    return "\n".join(parts + sections).rstrip() + "\n", missing


def relink(markdown: str, from_dir: Path, to_dir: Path) -> str:
    """The report's image links (file names in `from_dir`) made relative to `to_dir`."""
    def move(match):
        return f"![{match.group(1)}]({Path(os.path.relpath(from_dir / match.group(2), to_dir)).as_posix()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", move, markdown)


def replace_block(text: str, block: str, name: str = "README") -> str:
    """`text` with what stands between the report markers replaced by `block`, the rest byte for byte."""
    if text.count(README_START) != 1 or text.count(README_END) != 1 or text.index(README_START) > text.index(
            README_END):
        raise ValueError(f"{name} needs one '{README_START}' line and, after it, one '{README_END}' line "
                         "around the place the report goes")
    head, rest = text.split(README_START)
    return f"{head}{README_START}\n{block.strip()}\n{README_END}{rest.split(README_END)[1]}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results",
                        help="where the benchmark JSON files are (default: bench/results)")
    parser.add_argument("--eval", type=Path, nargs="+", action="extend", default=[], metavar="EVAL_JSON",
                        help="outputs of python -m fastdistil.evaluate (RUN_DIR/eval_TASK.json), one or more")
    parser.add_argument("--out", type=Path, help="the report (default: RESULTS_DIR/REPORT.md); plots go beside it")
    parser.add_argument("--readme", type=Path,
                        help=f"also put the report between the {README_START} and {README_END} lines of this file")
    parser.add_argument("--no-plots", action="store_true",
                        help="tables only, no PNG files (the GPU check hands back a handful of files)")
    args = parser.parse_args(argv)
    out = args.out or args.results_dir / "REPORT.md"
    readme_text = args.readme.read_text() if args.readme else None
    try:
        if readme_text is not None:
            replace_block(readme_text, "", str(args.readme))  # before writing anything: fail early and cleanly
        out.parent.mkdir(parents=True, exist_ok=True)

        def figure(name, alt, plot, *plot_args, **plot_kwargs):
            if args.no_plots:
                return ""
            plot(out.parent / f"{name}.png", *plot_args, **plot_kwargs)
            return f"![{alt}]({name}.png)"

        markdown, missing = build(args.results_dir, args.eval, figure)
        write_atomic(out, "# fastdistil: benchmarks and evaluation\n\n" + markdown)
        if readme_text is not None:
            # The README's block sits under its own "## Results": one heading level deeper than the report's.
            block = re.sub(r"^(#+) ", r"#\1 ", relink(markdown, out.parent, args.readme.parent), flags=re.M)
            write_atomic(args.readme, replace_block(readme_text, block, str(args.readme)))
    except ValueError as error:
        sys.exit(f"report: {error}")
    print("\n".join(["not in the report:", *missing, ""]) if missing else "", end="")
    print(f"wrote {out}" + (f" and the report block of {args.readme}" if args.readme else ""))


if __name__ == "__main__":
    main()
