"""Turns the fused-linear benchmark's pytest-benchmark JSON into a markdown table and a plot.

    python bench/fused_linear_report.py bench/results/fused_linear.json [--out-dir bench/results]

writes fused_linear.md (one table per dtype: time and peak extra memory of each provider, and the fused path's
share of "project, then the fused op") and fused_linear.png, and prints the markdown.
"""

import json
from collections import defaultdict
from pathlib import Path

from report import busy, busy_note, fmt_ms, header, median, run

PROVIDERS = ("fused_linear", "project_fused", "reference")
LABELS = {"fused_linear": "fused projection + loss", "project_fused": "logits, then fused loss",
          "reference": "logits, then reference loss"}
DTYPE_ORDER = ("fp32", "bf16")
TARGET = (8192, "fp32", 0.15, 1.1)  # the bar at N = 8192 fp32: memory <= 15 %, time <= 1.1x


def load(path: Path) -> tuple[dict, dict]:
    """{dtype: {N: {provider: result}}} and the run's metadata."""
    data = json.loads(path.read_text())
    results = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" in info and "N" in info:
            results[info["dtype"]][info["N"]][info["provider"]] = {"stats": bench["stats"], **info}
    return results, data


def table(dtype: str, by_n: dict) -> str:
    cols = ["N", *(f"{LABELS[p]} ms" for p in PROVIDERS), *(f"{LABELS[p]} peak mem" for p in PROVIDERS),
            "fused time / logits-then-fused", "fused mem / logits-then-fused"]
    lines = [f"#### {dtype}, V = 30522, D = 768", "", "| " + " | ".join(cols) + " |", "|---:" * len(cols) + "|"]
    for n in sorted(by_n):
        r = by_n[n]
        times = [fmt_ms(median(r.get(p))) + (" †" if busy(r.get(p)) else "") if p in r else "–" for p in PROVIDERS]
        mems = [f"{r[p]['peak_extra_bytes'] / 1e6:,.0f} MB" if p in r else "–" for p in PROVIDERS]
        ratios = ["–", "–"]
        if "fused_linear" in r and "project_fused" in r:
            ratios = [f"{median(r['fused_linear']) / median(r['project_fused']):.2f}×",
                      f"{r['fused_linear']['peak_extra_bytes'] / r['project_fused']['peak_extra_bytes']:.1%}"]
        lines.append("| " + " | ".join([f"{n:,}", *times, *mems, *ratios]) + " |")
    return "\n".join(lines)


def markdown(results: dict, data: dict) -> str:
    parts = ["## Vocabulary projection + triple loss, forward + backward (CPU)", "", header(data, results), ""]
    n, dtype, mem_bar, time_bar = TARGET
    r = results.get(dtype, {}).get(n, {})
    if "fused_linear" in r and "project_fused" in r:
        mem = r["fused_linear"]["peak_extra_bytes"] / r["project_fused"]["peak_extra_bytes"]
        time = median(r["fused_linear"]) / median(r["project_fused"])
        met = "met" if mem <= mem_bar and time <= time_bar else "NOT met"
        parts += [f"**{dtype}, N = {n:,}:** the fused path needs {mem:.1%} of the peak extra memory of "
                  f"\"logits, then fused loss\" (target ≤ {mem_bar:.0%}) in {time:.2f}× its time (target ≤ "
                  f"{time_bar}×): {met}.", ""]
    for dtype in [d for d in DTYPE_ORDER if d in results]:
        parts += [table(dtype, results[dtype]), ""]
    parts.append(
        "Median of timed rounds (pytest-benchmark `pedantic`). Inputs as bert-base produces them: [N, 768] "
        "projection inputs and hidden states, [30522, 768] projections with biases, 10 % padding, 15 % labelled "
        "rows. Forward + backward, gradients for the student's input, weight, bias and hidden state. Peak mem: the "
        "most tensor memory held at once by tensors allocated during one call, the gradients it leaves included "
        "(profiler allocation events, `bench/memory.py`). The fused path projects 128 MB of rows at a time "
        "(`chunk_size=0`).")
    flagged = [r["other_cpu_fraction"] for by_n in results.values() for by_p in by_n.values()
               for r in by_p.values() if busy(r)]
    return "\n".join(parts + busy_note(flagged, data, "call")) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [d for d in DTYPE_ORDER if d in results]
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(11, 3.6 * len(dtypes)), squeeze=False)
    for (t_ax, m_ax), dtype in zip(axes, dtypes):
        by_n = results[dtype]
        for provider in PROVIDERS:
            ns = [n for n in sorted(by_n) if provider in by_n[n]]
            t_ax.plot(ns, [median(by_n[n][provider]) for n in ns], "o-", label=LABELS[provider])
            m_ax.plot(ns, [by_n[n][provider]["peak_extra_bytes"] / 1e9 for n in ns], "o-", label=LABELS[provider])
        for ax, ylabel in ((t_ax, "forward + backward (s)"), (m_ax, "peak extra memory (GB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (token rows)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{dtype}: {ylabel}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    run(argv, "fused_linear", "fused-linear", load, markdown, plot)


if __name__ == "__main__":
    main()
