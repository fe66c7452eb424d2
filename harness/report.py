"""Summaries of metrics: terminal and Markdown tables, PNG plots, and a baseline comparison."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from .metrics import Record
from .metrics import label as record_label


def _key(r: Record) -> tuple[str, str, str, int, str]:
    # the image column names a cross-version migration as such (metrics.label)
    return (record_label(r), r.kind, r.guest_type, r.memory_mb, r.workload)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{_num(med)} [{_num(min(values))}-{_num(max(values))}]"


def _num(value: float) -> str:
    """Two decimals; two significant digits below 0.1 (xenstore timings are milliseconds)."""
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


SUMMARY_HEADER = ("image", "kind", "guest", "MiB", "workload", "ok", "failed", "total s med [min-max]",
                  "downtime s med [min-max]", "iters", "intact")


def summary_rows(records: list[Record]) -> list[tuple[str, ...]]:
    """One row per (image, kind, guest type, memory, workload): successes, failures, and the
    median [min-max] of the successful ones (a failed run's timings mean nothing)."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[_key(r)].append(r)
    rows = []
    for key in sorted(groups):
        failed = sum(1 for r in groups[key] if not r.ok)
        rs = [r for r in groups[key] if r.ok]
        totals = [r.total_s for r in rs if r.total_s is not None]
        downs = [r.downtime_s for r in rs if r.downtime_s is not None]
        iters = [r.iterations for r in rs if r.iterations]
        intact = all(r.memory_intact is not False for r in rs)
        image, kind, guest, mem, workload = key
        rows.append((image, kind, guest, str(mem), workload, str(len(rs)), str(failed), _spread(totals),
                     _spread(downs), str(max(iters)) if iters else "-", "yes" if intact else "NO"))
    return rows


def summary_table(records: list[Record]) -> str:
    """:func:`summary_rows` as a fixed-width table for the terminal."""
    widths = (10, 18, 5, -5, 10, -2, -6, 24, 26, -5, 6)  # negative: right-aligned

    def line(row: tuple[str, ...]) -> str:
        return " ".join(v.rjust(-w) if w < 0 else v.ljust(w) for v, w in zip(row, widths, strict=True))

    header = line(SUMMARY_HEADER)
    return "\n".join([header, "-" * len(header), *map(line, summary_rows(records))])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` and line breaks in cells are escaped."""
    def cells(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"

    return "\n".join([cells(header), "|" + "---|" * len(header), *map(cells, rows)])


def summary_markdown(records: list[Record]) -> str:
    """:func:`summary_rows` as a Markdown table."""
    return markdown_table(SUMMARY_HEADER, summary_rows(records))


def plots(records: list[Record], outdir: Path) -> list[Path]:
    """PNG plots: total time and downtime per guest type and memory; pages per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    migr = [r for r in records if r.kind not in ("boot", "xenstore") and r.ok and r.total_s is not None]
    if not migr:
        return written
    for metric, label in (("total_s", "total time (s)"), ("downtime_s", "downtime (s)")):
        groups: dict[str, list[float]] = defaultdict(list)
        for r in migr:
            value = getattr(r, metric)
            if value is not None:
                cross = f"\n{r.cross_version}" if r.cross_version else ""
                groups[f"{r.kind}{cross}\n{r.guest_type} {r.memory_mb} MiB"].append(value)
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
        names = sorted(groups)
        ax.boxplot([groups[n] for n in names], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per guest type and memory (n per box = repeats)")
        fig.tight_layout()
        path = outdir / f"migration_{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for r in migr:
        if r.pages_per_iteration:
            ax.plot(range(len(r.pages_per_iteration)), r.pages_per_iteration, marker="o",
                    label=f"{r.kind} {r.guest_type} #{r.repeat}"
                    + (f" {r.cross_version}" if r.cross_version else "")
                    + (f" ({r.extra['direction']})" if r.extra.get("direction") else ""))
            drawn = True
    ax.set_xlabel("iteration (the last one is sent after the guest is suspended)")
    ax.set_ylabel("pages sent")
    ax.set_yscale("log" if drawn else "linear")
    ax.set_title("pages per iteration" + ("" if drawn else " (none reported)"))
    if drawn:
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = outdir / "migration_pages_per_iteration.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def compare(old: list[Record], new: list[Record], threshold: float = 0.2) -> list[str]:
    """Regressions: a group whose median total or downtime grew by more than ``threshold``."""
    def medians(records: list[Record]) -> dict[tuple, dict[str, float]]:
        groups: dict[tuple, list[Record]] = defaultdict(list)
        for r in records:
            if r.ok:
                groups[(r.kind, r.guest_type, r.memory_mb, r.workload, r.cross_version)].append(r)
        out = {}
        for key, rs in groups.items():
            out[key] = {m: statistics.median(v) for m in ("total_s", "downtime_s")
                        if (v := [getattr(r, m) for r in rs if getattr(r, m) is not None])}
        return out

    before, after = medians(old), medians(new)
    found = []
    for key in sorted(set(before) & set(after)):
        for metric, was in before[key].items():
            now = after[key].get(metric)
            if now is not None and was > 0 and (now - was) / was > threshold:
                name = " ".join(str(k) for k in key if k != "")
                found.append(f"{name}: {metric} {_num(was)} -> {_num(now)} "
                             f"(+{(now - was) / was:.0%}, threshold {threshold:.0%})")
    return found
