"""Summaries of metrics: a terminal table, PNG plots, and a baseline comparison."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .metrics import Record


def _key(r: Record) -> tuple[str, str, str, int, str]:
    return (r.image, r.kind, r.guest_type, r.memory_mb, r.workload)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.2f} [{min(values):.2f}-{max(values):.2f}]"


def summary_table(records: list[Record]) -> str:
    """One row per (image, kind, guest type, memory, workload): successes, failures, and the
    median [min-max] of the successful ones (a failed run's timings mean nothing)."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[_key(r)].append(r)
    header = (f"{'image':10} {'kind':18} {'guest':5} {'MiB':>5} {'workload':10} {'ok':>2} {'failed':>6} "
              f"{'total s med [min-max]':24} {'downtime s med [min-max]':26} {'iters':>5} {'intact':6}")
    lines = [header, "-" * len(header)]
    for key in sorted(groups):
        failed = sum(1 for r in groups[key] if not r.ok)
        rs = [r for r in groups[key] if r.ok]
        totals = [r.total_s for r in rs if r.total_s is not None]
        downs = [r.downtime_s for r in rs if r.downtime_s is not None]
        iters = [r.iterations for r in rs if r.iterations]
        intact = all(r.memory_intact is not False for r in rs)
        image, kind, guest, mem, workload = key
        lines.append(f"{image:10} {kind:18} {guest:5} {mem:>5} {workload:10} {len(rs):>2} {failed:>6} "
                     f"{_spread(totals):24} {_spread(downs):26} "
                     f"{(str(max(iters)) if iters else '-'):>5} {'yes' if intact else 'NO':6}")
    return "\n".join(lines)


def plots(records: list[Record], outdir: Path) -> list[Path]:
    """PNG plots: total time and downtime per guest type and memory; pages per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    migr = [r for r in records if r.kind != "boot" and r.ok and r.total_s is not None]
    if not migr:
        return written
    for metric, label in (("total_s", "total time (s)"), ("downtime_s", "downtime (s)")):
        groups: dict[str, list[float]] = defaultdict(list)
        for r in migr:
            value = getattr(r, metric)
            if value is not None:
                groups[f"{r.kind}\n{r.guest_type} {r.memory_mb} MiB"].append(value)
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
                    label=f"{r.kind} {r.guest_type} #{r.repeat}")
            drawn = True
    ax.set_xlabel("pre-copy iteration")
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
                groups[(r.kind, r.guest_type, r.memory_mb, r.workload)].append(r)
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
                found.append(f"{' '.join(map(str, key))}: {metric} {was:.2f} -> {now:.2f} "
                             f"(+{(now - was) / was:.0%}, threshold {threshold:.0%})")
    return found
