"""Turns the triple-loss benchmark's pytest-benchmark JSON into a markdown table and a plot.

    python bench/report.py bench/results/triple_loss.json [--out-dir bench/results]

writes triple_loss.md (one table per dtype, with the hardware and versions the run recorded) and
triple_loss.png (time and peak extra memory against N, per provider), and prints the markdown.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

PROVIDERS = ("fused", "fused_cold", "fused_out", "eager", "compiled")
LABELS = {
    "fused": "fused (fastdistil, cpp)",
    "fused_cold": "fused, fresh gradient allocation",
    "fused_out": "fused, into a caller-owned buffer",
    "eager": "eager reference",
    "compiled": "torch.compile(reference)",
}
DTYPE_ORDER = ("fp32", "bf16", "fp16")
BUSY = 0.10  # other processes' CPU share above which a timing is flagged
MB = 1e6


def load(path: Path) -> tuple[dict, dict]:
    """{dtype: {N: {provider: result}}} and the run's metadata."""
    data = json.loads(path.read_text())
    results = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" not in info or "N" not in info:  # not a triple-loss result (e.g. the training step's)
            continue
        results[info["dtype"]][info["N"]][info["provider"]] = {"stats": bench["stats"], **info}
    return results, data


def header(data: dict, results: dict) -> str:
    machine = data.get("machine_info", {})
    bandwidths = [r["copy_bandwidth_bytes_per_s"] for by_n in results.values() for by_p in by_n.values()
                  for r in by_p.values() if r.get("copy_bandwidth_bytes_per_s")]
    bandwidth = bandwidths[0] if bandwidths else machine.get("copy_bandwidth", {}).get("bytes_per_s")
    isas = {r.get("cpu_isa") for by_n in results.values() for by_p in by_n.values() for r in by_p.values()}
    isas.discard(None)
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx")
    flags = ", ".join(f for f in machine.get("cpu_flags", []) if f.startswith(wanted)) or "no AVX2"
    cpu = machine.get("cpu_model", machine.get("processor", "?"))
    isa = "/".join(sorted(isas)) or "?"
    hardware = (f"{cpu}, {machine.get('cpu_count', '?')} cores ({flags}; kernel ISA {isa}), "
                f"{machine.get('torch_threads', '?')} torch threads, copy bandwidth "
                + (f"{bandwidth / 1e9:.1f} GB/s (read + write)" if bandwidth else "not measured"))
    if (machine.get("copy_bandwidth", {}).get("other_cpu_fraction") or 0) > BUSY:
        hardware += " †"
    revision = machine.get("fastdistil_git", data.get("commit_info", {}).get("id", "?"))
    versions = (f"torch {machine.get('torch_version', '?')}, Python {machine.get('python_version', '?')}, "
                f"fastdistil {machine.get('fastdistil_version', '?')} @ {revision}")
    return f"**Hardware:** {hardware}. **Versions:** {versions}. **Run:** {data.get('datetime', '?')}."


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_mem(result: dict | None) -> str:
    if result is None or result.get("peak_extra_bytes") is None:
        return "–"
    peak = result["peak_extra_bytes"]
    return f"{peak / MB:,.0f} MB ({peak / result['nv_fp32_bytes']:.2f}×)"


def median(result: dict | None) -> float | None:
    return result["stats"]["median"] if result else None


def busy(result: dict | None) -> bool:
    return bool(result and (result.get("other_cpu_fraction") or 0) > BUSY)


def table(dtype: str, by_n: dict) -> str:
    cols = ["N", "fused ms", "eager ms", "compiled ms", "speed-up vs eager", "speed-up vs compiled",
            "fused peak mem", "eager peak mem", "compiled peak mem", "fused, fresh alloc ms",
            "fused, no alloc ms", "floor ms", "no alloc / floor"]
    lines = [f"### {dtype} logits, V = {next(iter(next(iter(by_n.values())).values()))['V']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for n in sorted(by_n):
        r = by_n[n]
        fused, cold, out, eager, compiled = (r.get(p) for p in PROVIDERS)

        def ms(result):
            return fmt_ms(median(result)) + (" †" if busy(result) else "")

        def ratio(num, den):
            return f"{median(num) / median(den):.1f}×" if num and den else "–"

        anyone = fused or out or eager or compiled
        floor_ms = anyone.get("floor_ms") if anyone else None
        to_floor = f"{median(out) * 1e3 / floor_ms:.1f}×" if out and floor_ms else "–"
        lines.append("| " + " | ".join([
            f"{n:,}", ms(fused), ms(eager), ms(compiled), ratio(eager, fused), ratio(compiled, fused),
            fmt_mem(fused), fmt_mem(eager), fmt_mem(compiled), ms(cold), ms(out),
            f"{floor_ms:.1f}" if floor_ms else "–", to_floor,
        ]) + " |")
    return "\n".join(lines)


def markdown(results: dict, data: dict) -> str:
    parts = ["## Triple loss, forward + backward (CPU)", "", header(data, results), ""]
    for dtype in sorted(results, key=lambda d: DTYPE_ORDER.index(d) if d in DTYPE_ORDER else 99):
        parts += [table(dtype, results[dtype]), ""]
    everything = [r for by_n in results.values() for by_p in by_n.values() for r in by_p.values()]
    flagged = [r["other_cpu_fraction"] for r in everything if busy(r)]
    parts += [
        "Median of timed rounds (pytest-benchmark, `benchmark.pedantic`); speed-up = reference median / fused median. "
        "*fused*: `fastdistil.triple_loss(..., backend=\"cpp\")` then `loss.backward()`. From its second call on, the "
        "op's [N, V] gradient reuses the buffer the previous step's gradient returned when autograd freed it. *fused, "
        "fresh alloc*: the same with that buffer freed before every call (the first step: allocation and page faults "
        "included). *fused, no alloc*: `torch.ops.fastdistil.triple_loss_out` into gradient buffers allocated once (a "
        "caller-owned workspace), the kernel alone. Peak mem: the most tensor memory held at once by tensors allocated"
        " during one forward + backward, gradients included (profiler allocation events, `bench/memory.py`); (×) = "
        "multiple of one [N, V] fp32 tensor. Floor = 3·N·V·itemsize bytes (read both logit tensors, write the "
        "gradient) / measured copy bandwidth. Inputs: logits ~ N(0, 3²), 10 % padding, 15 % labelled rows, D = 768.",
    ]
    return "\n".join(parts + busy_note(flagged, data, "op")) + "\n"


def busy_note(flagged: list[float], data: dict, what: str) -> list[str]:
    """The † footnote, when a timing (other processes' CPU shares `flagged`) or the copy bandwidth that the
    header shows was measured on a busy machine."""
    copy_busy = data.get("machine_info", {}).get("copy_bandwidth", {}).get("other_cpu_fraction") or 0
    if not flagged and copy_busy <= BUSY:
        return []
    worst = max(flagged + [copy_busy])
    return ["", f"† Other processes used more than {BUSY:.0%} of the CPUs while this was measured (up to "
                f"{worst:.0%}): such timings overstate the {what}'s time (and a bandwidth measured so "
                "understates the machine's). Rerun on a quiet machine."]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted(results, key=lambda d: DTYPE_ORDER.index(d) if d in DTYPE_ORDER else 99)
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(11, 4.2 * len(dtypes)), squeeze=False)
    colors = {"fused": "tab:blue", "fused_cold": "tab:purple", "fused_out": "tab:cyan", "eager": "tab:red",
              "compiled": "tab:orange"}
    for row, dtype in zip(axes, dtypes):
        by_n = results[dtype]
        ns = sorted(by_n)
        t_ax, m_ax = row
        for provider in PROVIDERS:
            pts = [(n, by_n[n][provider]) for n in ns if provider in by_n[n]]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            med = [r["stats"]["median"] * 1e3 for _, r in pts]
            lo = [m - r["stats"]["q1"] * 1e3 for m, (_, r) in zip(med, pts)]
            hi = [r["stats"]["q3"] * 1e3 - m for m, (_, r) in zip(med, pts)]
            t_ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, color=colors[provider],
                          label=LABELS[provider])
            if provider != "fused_out":  # its peak is ~0: nothing to draw on a log axis
                peaks = [r["peak_extra_bytes"] / MB for _, r in pts]
                m_ax.plot(xs, peaks, marker="o", color=colors[provider], label=LABELS[provider])
        floors = [(n, next(iter(by_n[n].values())).get("floor_ms")) for n in ns]
        floors = [(n, f) for n, f in floors if f]
        if floors:
            t_ax.plot(*zip(*floors), linestyle="--", marker="x", color="gray",
                      label="bandwidth floor 3·N·V·b / BW")
        nv = [(n, next(iter(by_n[n].values()))["nv_fp32_bytes"] / MB) for n in ns]
        m_ax.plot(*zip(*nv), linestyle="--", marker="x", color="gray", label="one [N, V] fp32 tensor")
        for ax, ylabel, title in ((t_ax, "median time (ms)", "forward + backward time"),
                                  (m_ax, "peak extra memory (MB)", "peak extra memory, one fwd + bwd")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns, [f"{n:,}" for n in ns])
            ax.minorticks_off()
            ax.set_xlabel("N (token rows), V = 30,522")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{dtype}: {title}")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv, name: str, what: str, load, markdown, plot) -> None:
    """A report's command line: `load` the JSON, write {name}.md (`markdown`), {name}.png (`plot`), print."""
    parser = argparse.ArgumentParser(description=f"Markdown table and plot of the {what} benchmark JSON.")
    parser.add_argument("bench_json", type=Path, help="file written by pytest --benchmark-json")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                        help=f"where {name}.md and {name}.png go (default: bench/results)")
    args = parser.parse_args(argv)
    results, data = load(args.bench_json)
    if not results:
        sys.exit(f"report: no {what} results (extra_info with a provider) in {args.bench_json}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results, data)
    (args.out_dir / f"{name}.md").write_text(text)
    plot(results, args.out_dir / f"{name}.png")
    print(text)
    print(f"wrote {args.out_dir / f'{name}.md'} and {args.out_dir / f'{name}.png'}")


def main(argv=None) -> None:
    run(argv, "triple_loss", "triple-loss", load, markdown, plot)


if __name__ == "__main__":
    main()
