"""What every section of bench/report.py formats the same way: times, markdown tables, the busy-machine flag, and the
two kinds of plot (a quantity against N per provider; bars per provider)."""

BUSY = 0.10  # other processes' CPU share above which a timing is flagged
MB = 1e6


def median(result: dict | None) -> float | None:
    return result["stats"]["median"] if result else None


def busy(result: dict | None) -> bool:
    return bool(result and (result.get("other_cpu_fraction") or 0) > BUSY)


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def fmt_rate(value: float | None) -> str:
    """A GB/s or TFLOP/s figure: whole numbers from 100 up, three significant digits below."""
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def fmt_mb(nbytes: float | None) -> str:
    if nbytes is None:
        return "–"
    mb = nbytes / MB
    return f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2g} MB"


def timing(result: dict | None, seconds: float | None = None) -> str:
    """`seconds` (default: the result's median) in ms, with † when the machine was busy."""
    if result is None:
        return "–"
    return fmt_ms(median(result) if seconds is None else seconds) + (" †" if busy(result) else "")


def ratio(num: float | None, den: float | None, fmt: str = "{:.2f}×") -> str:
    return fmt.format(num / den) if num and den else "–"


def fmt_params(n: float | None) -> str:
    return f"{n / 1e6:,.1f} M" if n else "–"


def table(cols: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A markdown table; the first `left` columns are labels (left-aligned), the rest numbers."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * left + "---:|" * (len(cols) - left),
            *("| " + " | ".join(row) + " |" for row in rows)]


def busy_note(results: list[dict], data: dict, what: str) -> list[str]:
    """The † footnote, when a timing or the copy bandwidth of the run was measured on a busy machine."""
    flagged = [r["other_cpu_fraction"] for r in results if busy(r)]
    copy_busy = data.get("machine_info", {}).get("copy_bandwidth", {}).get("other_cpu_fraction") or 0
    if not flagged and copy_busy <= BUSY:
        return []
    worst = max(flagged + [copy_busy])
    return ["", f"† Other processes used more than {BUSY:.0%} of the CPUs while this was measured (up to "
                f"{worst:.0%}): such timings overstate the {what}'s time (and a bandwidth measured so "
                "understates the machine's). Rerun on a quiet machine."]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the machines this runs on
    import matplotlib.pyplot as plt

    return plt


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_against_n(path, panels: list[tuple[str, dict]], providers: dict[str, tuple[str, str]],
                   references: dict[str, dict] | None = None, no_memory: tuple[str, ...] = ()) -> None:
    """One row per (title, {N: {provider: result}}) panel: median time with its interquartile range (left) and
    peak extra memory (right) against N, log-log, one line per provider ({provider: (label, color)}) except
    the memory of `no_memory`. `references` adds dashed gray lines:
    {title: {"time" or "memory": {label: [(N, ms or MB)]}}}."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.2 * len(panels)), squeeze=False)
    for (t_ax, m_ax), (title, by_n) in zip(axes, panels):
        ns = sorted(by_n)
        for provider, (label, color) in providers.items():
            runs = [(n, by_n[n][provider]) for n in ns if provider in by_n[n]]
            if not runs:
                continue
            xs = [n for n, _ in runs]
            med = [r["stats"]["median"] * 1e3 for _, r in runs]
            spread = [[m - r["stats"]["q1"] * 1e3 for m, (_, r) in zip(med, runs)],
                      [r["stats"]["q3"] * 1e3 - m for m, (_, r) in zip(med, runs)]]
            t_ax.errorbar(xs, med, yerr=spread, marker="o", capsize=3, color=color, label=label)
            if provider not in no_memory:
                m_ax.plot(xs, [r["peak_extra_bytes"] / MB for _, r in runs], marker="o", color=color, label=label)
        for (kind, label), ax in zip((("time", "median time (ms)"), ("memory", "peak extra memory (MB)")),
                                     (t_ax, m_ax)):
            for ref_label, points in (references or {}).get(title, {}).get(kind, {}).items():
                ax.plot(*zip(*points), linestyle="--", marker="x", color="gray", label=ref_label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns, [f"{n:,}" for n in ns])
            ax.minorticks_off()
            ax.set_xlabel("N (token rows)")
            ax.set_ylabel(label)
            ax.set_title(f"{title}: {label}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8)
    save(fig, path)


def bars(ax, labels: list[str], series: dict, ylabel: str, title: str, annotations: dict[str, list[str]] | None = None,
         errors: dict[str, list[list[float]]] | None = None) -> None:
    """Grouped bars: one group per label, one bar per series ({name: (values, color or a color per bar)}), each
    series' text `annotations` inside its bars, `errors` as [below, above] per series."""
    width = 0.8 / len(series)
    for i, (name, (values, color)) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        drawn = ax.bar(xs, values, width, color=color, label=name if len(series) > 1 else None,
                       yerr=(errors or {}).get(name), capsize=4 if errors else 0)
        if annotations and name in annotations:
            ax.bar_label(drawn, annotations[name], label_type="center", color="white", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(y=0.2)  # room above the bars for the legend
    if len(series) > 1:
        ax.legend(fontsize=8)
