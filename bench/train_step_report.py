"""Turns the training-step benchmark's pytest-benchmark JSON into a markdown table and a bar plot.

    python bench/train_step_report.py bench/results/train_step.json [--out-dir bench/results]

writes train_step.md (one table per precision, with the hardware and versions the run recorded, as
bench/report.py prints them) and train_step.png (non-padding tokens/s and peak extra memory per provider), and
prints the markdown.
"""

import json
from collections import defaultdict
from pathlib import Path

from report import busy, busy_note, fmt_ms, header, median, run

PROVIDERS = ("distiller", "fastdistil", "fastdistil_fused_logits", "fastdistil_reference_loss")
LABELS = {
    "distiller": "original distiller (baseline)",
    "fastdistil": "fastdistil (fused projection + loss, fused AdamW)",
    "fastdistil_fused_logits": "fastdistil, logits then fused loss",
    "fastdistil_reference_loss": "fastdistil, reference loss",
}
COLORS = {"distiller": "tab:red", "fastdistil": "tab:blue", "fastdistil_fused_logits": "tab:green",
          "fastdistil_reference_loss": "tab:orange"}
PRECISION_ORDER = ("fp32", "bf16")
TARGET = ("fp32", 1.3)  # the bar: fastdistil's non-padding tokens/s over the distiller's, in fp32


def setting(info: dict) -> str:
    """The models and batch shape of a result (so that a tiny smoke run cannot pass for the real one)."""
    return (f"teacher {info['teacher_params'] / 1e6:.0f} M params ({info['teacher_layers']} layers, hidden "
            f"{info['hidden_size']}), student {info['student_params'] / 1e6:.0f} M ({info['student_layers']} "
            f"layers), batch {info['batch_size']} × {info['seq_len']}")


def load(path: Path) -> tuple[dict, dict]:
    """{precision: {setting: {provider: result}}} (the nesting report.header reads) and the run's metadata."""
    data = json.loads(path.read_text())
    results = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "precision" in info and "provider" in info:
            results[info["precision"]][setting(info)][info["provider"]] = {"stats": bench["stats"], **info}
    return results, data


def speedup(result: dict | None, baseline: dict | None) -> float | None:
    if not (result and baseline and result.get("tokens_per_s") and baseline.get("tokens_per_s")):
        return None
    return result["tokens_per_s"] / baseline["tokens_per_s"]


def table(precision: str, shape: str, by_provider: dict) -> str:
    baseline = by_provider.get("distiller")
    cols = ["provider", "median step ms", "non-padding tokens/s", "vs distiller", "peak extra memory"]
    lines = [f"### {precision}: {shape}", "", "| " + " | ".join(cols) + " |",
             "|---|" + "---:|" * (len(cols) - 1)]
    for provider in PROVIDERS:
        r = by_provider.get(provider)
        if r is None:
            continue
        ratio = speedup(r, baseline)
        lines.append("| " + " | ".join([
            LABELS[provider],
            fmt_ms(median(r)) + (" †" if busy(r) else ""),
            f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "–",
            f"{ratio:.2f}×" if ratio else "–",
            f"{r['peak_extra_mb']:,.0f} MB",
        ]) + " |")
    return "\n".join(lines)


def verdict(results: dict) -> list[str]:
    precision, target = TARGET
    lines = []
    for shape, by_provider in results.get(precision, {}).items():
        ratio = speedup(by_provider.get("fastdistil"), by_provider.get("distiller"))
        if ratio:
            status = "met" if ratio >= target else "NOT met"
            lines.append(f"**{precision}, {shape}:** fastdistil runs {ratio:.2f}× the original distiller's "
                         f"non-padding tokens/s (target ≥ {target}×: {status}).")
    return lines


def ordered(results: dict) -> list[str]:
    return sorted(results, key=lambda p: PRECISION_ORDER.index(p) if p in PRECISION_ORDER else 99)


def markdown(results: dict, data: dict) -> str:
    parts = ["## Training step: fastdistil against the original distiller (CPU)", "",
             header(data, results), ""]
    parts += [line + "\n" for line in verdict(results)]
    for precision in ordered(results):
        for shape, by_provider in results[precision].items():
            parts += [table(precision, shape, by_provider), ""]
    parts += [
        "One optimizer step per timed round (pytest-benchmark `pedantic`, median of the rounds), each on the "
        "next of a fixed list of full-length batches from the bundled Wikipedia sample, masked as "
        "`fastdistil.train` masks them: the same batches in the same order for every provider, and the same "
        "starting weights (the student copied from a teacher with seeded random weights). Non-padding "
        "tokens/s = mean non-padding tokens of the timed batches / median step time; vs distiller = ratio of "
        "tokens/s. *original distiller*: `bench/distiller_step.py`, a port of the Hugging Face distiller's "
        "`step` and `optimize` (unfused loss on `masked_select` copies, foreach AdamW, its `.item()` logs). "
        "*fastdistil*: what `python -m fastdistil.train` does per step (`train_step` with `--loss fused`: "
        "the vocabulary projections and the triple loss fused chunk by chunk, no [N, V] logits; fused AdamW). "
        "*logits then fused loss*: `--loss fused-logits`, both models' logits and then the fused loss op. "
        "*fastdistil, reference loss*: `--loss reference`, the logits and then the unfused recipe loss, so its "
        "gap to *fastdistil* is the loss's share. bf16: both forwards under `torch.autocast`. Peak extra "
        "memory: the most tensor memory held at once by tensors allocated during one step, over the weights "
        "and AdamW moments held between steps (profiler allocation events, `bench/memory.py`).",
    ]
    flagged = [r["other_cpu_fraction"] for by_s in results.values() for by_p in by_s.values()
               for r in by_p.values() if busy(r)]
    return "\n".join(parts + busy_note(flagged, data, "step")) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(precision, shape, results[precision][shape]) for precision in ordered(results)
            for shape in results[precision]]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for (t_ax, m_ax), (precision, shape, by_provider) in zip(axes, rows):
        providers = [p for p in PROVIDERS if p in by_provider]
        labels = [LABELS[p].replace(" (", "\n(") for p in providers]
        colors = [COLORS[p] for p in providers]
        rates = [by_provider[p].get("tokens_per_s") or 0 for p in providers]
        # The interquartile range of the step time, as tokens/s.
        tokens = [by_provider[p]["tokens_per_batch"] for p in providers]
        stats = [by_provider[p]["stats"] for p in providers]
        errors = [[rate - n / st["q3"] for rate, n, st in zip(rates, tokens, stats)],
                  [n / st["q1"] - rate for rate, n, st in zip(rates, tokens, stats)]]
        bars = t_ax.bar(labels, rates, yerr=errors, capsize=4, color=colors)
        ratios = [speedup(by_provider[p], by_provider.get("distiller")) for p in providers]
        t_ax.bar_label(bars, [f"{r:.2f}×" if r else "" for r in ratios], label_type="center", color="white")
        bars = m_ax.bar(labels, [by_provider[p]["peak_extra_mb"] for p in providers], color=colors)
        m_ax.bar_label(bars, fmt="%.0f MB")
        m_ax.margins(y=0.12)  # room for the labels
        for ax, ylabel in ((t_ax, "non-padding tokens/s"), (m_ax, "peak extra memory of a step (MB)")):
            ax.set_ylabel(ylabel)
            ax.set_title(f"{precision}: {ylabel}", fontsize=10)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("\n".join(dict.fromkeys(shape for _, shape, _ in rows)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    run(argv, "train_step", "training-step", load, markdown, plot)


if __name__ == "__main__":
    main()
