"""Timings and measurements -> JSON.

One record per measured operation (a migration, a save/restore, a boot), with
the versions the booted host reported, so runs on different Xen or kernel
releases can be compared (harness/report.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TICK = re.compile(r"NXTICK (\d+) (\d+) (\d+)")


@dataclass
class Record:
    kind: str  # localhost_migrate | save_restore | two_host_migrate | cross_version_migrate | boot
    guest_type: str = ""
    memory_mb: int = 0
    workload: str = "idle"
    image: str = ""
    xen_version: str = ""
    kernel_release: str = ""
    dom0_mode: str = ""
    accel: str = ""
    repeat: int = 0
    total_s: float | None = None
    downtime_s: float | None = None
    downtime_toolstack_s: float | None = None
    iterations: int | None = None
    pages_per_iteration: list[int] = field(default_factory=list)
    bytes_sent: int | None = None
    memory_intact: bool | None = None
    dirty_pages_verified: int | None = None  # dirty-buffer pages checked after the operation
    dirty_generation: int | None = None  # the dirty buffer's generation then (harness/dirty_pages.py)
    ok: bool = True
    # Between two Xen releases (plugins/cross_version.py): "cross-version 4.17.5 -> 4.22.0",
    # the source's Xen first; the outcome ("migrated-intact", "refused-cleanly", "failed"),
    # and each side's build ("debian xen-hypervisor-4.17-amd64 4.17.5+..." or "xen_dist PATH
    # changeset ..."). Empty for a migration within one Xen.
    cross_version: str = ""
    cross_outcome: str = ""
    source_build: str = ""
    destination_build: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def label(r: Record) -> str:
    """How a record is named in tables and plots: its image, and for a migration across
    Xen versions that label and its outcome (``bookworm cross-version 4.17.5 -> 4.22.0
    (refused-cleanly)``)."""
    if not r.cross_version:
        return r.image
    return f"{r.image} {r.cross_version}" + (f" ({r.cross_outcome})" if r.cross_outcome else "")


def describe(r: Record) -> str:
    """One line for a measured operation: ``bookworm pv 256 MiB: localhost_migrate done in
    5.2 s, downtime 0.41 s, 3 iterations, 66000 pages, 262 MiB sent``."""
    what = " ".join(x for x in (label(r), r.guest_type, f"{r.memory_mb} MiB" if r.memory_mb else "") if x)
    parts = [f"{r.kind} {'done' if r.ok else 'FAILED'}"
             + (f" in {r.total_s:.1f} s" if r.total_s is not None else "")]
    if r.downtime_s is not None:
        parts.append(f"downtime {r.downtime_s:.2f} s")
    if r.iterations:
        parts.append(f"{r.iterations} iterations")
    if r.pages_per_iteration:
        parts.append(f"{sum(r.pages_per_iteration)} pages")
    if r.bytes_sent:
        parts.append(f"{r.bytes_sent / 2**20:.0f} MiB sent")
    if r.dirty_pages_verified:
        parts.append(f"{r.dirty_pages_verified} dirty pages verified (generation {r.dirty_generation})")
    return f"{what or 'measured'}: " + ", ".join(parts)


class MetricsSink:
    """Collects records during a run and writes them as one JSON document."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def add(self, record: Record) -> Record:
        with self._lock:
            self.records.append(record)
            self.write()
        log.info("%s", describe(record))  # a stage line (harness/stages.py)
        return record

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": 1, "records": [dataclasses.asdict(r) for r in self.records]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path)


def load(path: Path) -> list[Record]:
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(Record)}
    return [Record(**{k: v for k, v in r.items() if k in names}) for r in data["records"]]


def tick_arrivals(watch_log: str) -> list[tuple[int, int]]:
    """(arrival ns at dom0, tick seq) for every NXTICK line in an nxwatch log."""
    out = []
    for line in watch_log.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        match = TICK.search(parts[2])
        if match and parts[0].isdigit():
            out.append((int(parts[0]), int(match.group(1))))
    return out


def log_span_ns(log: str) -> tuple[int, int] | None:
    """First and last dom0 timestamps of a timestamped toolstack log (``<epoch s> <line>``).

    Tick arrivals are stamped with dom0's clock too, so the window they are compared
    with must come from dom0, not from the harness host (the clocks differ)."""
    stamps = []
    for line in log.splitlines():
        head = line.split(" ", 1)[0]
        try:
            stamps.append(float(head))
        except ValueError:
            continue
    if not stamps:
        return None
    return int(min(stamps) * 1e9), int(max(stamps) * 1e9)


def largest_gap_s(arrivals: list[tuple[int, int]], start_ns: int, end_ns: int) -> float | None:
    """The largest gap between consecutive tick arrivals that overlaps [start, end].

    None unless ticks arrived both before ``start`` and after ``end``: without a
    tick after the operation, the pause has no measured end.
    """
    times = sorted(t for t, _ in arrivals)
    if not times or times[0] > start_ns or times[-1] < end_ns:
        return None
    best = None
    for a, b in zip(times, times[1:], strict=False):
        if b >= start_ns and a <= end_ns:
            gap = (b - a) / 1e9
            best = gap if best is None else max(best, gap)
    return best


def excise_pause(arrivals: list[tuple[int, int]], start_ns: int, end_ns: int) -> list[tuple[int, int]]:
    """Tick arrivals with a pause of the harness's own taken out: arrivals from ``end_ns`` on
    are moved back by its length (``start_ns``: when the toolstack would have let the guest
    run; ``end_ns``: when the harness did), so the downtime is the operation's alone."""
    shift = max(0, end_ns - start_ns)
    return [(t - shift if t >= end_ns else t, seq) for t, seq in arrivals]


SUSPENDED = re.compile(r"suspend request|guest has suspended")
STARTED = re.compile(r"Domain started succes+fully|libxl_domain_unpause: Domain \d+:ao \S+: create")
PROGRESS = re.compile(r"[Ii]teration (\d+).*?(\d+) pages|Frames iteration (\d+) of \d+: (\d+)/")


def parse_toolstack(log: str) -> dict[str, Any]:
    """From a timestamped `xl -vvv migrate|save|restore` log (``<epoch s> <line>`` per
    line): the suspend -> start interval the toolstack saw, and pre-copy iterations
    with their page counts where libxc reports them (Xen 4.17's xl -vvv does not)."""
    pages: list[int] = []
    suspended = started = None
    for line in log.splitlines():
        stamp, _, text = line.partition(" ")
        try:
            when = float(stamp)
        except ValueError:
            continue
        match = PROGRESS.search(text)
        if match:
            pages.append(int(match.group(2) or match.group(4)))
        if suspended is None and SUSPENDED.search(text):
            suspended = when
        if suspended is not None and started is None and STARTED.search(text):
            started = when
    downtime = round(started - suspended, 3) if suspended and started else None
    return {"pages_per_iteration": pages, "iterations": len(pages) or None,
            "downtime_toolstack_s": downtime, "bytes_sent": None}
