"""`nested-xen bench guests`, the part without a VM: its cells, the boots it keeps, the
statistics and the table (harness/bench_guests.py boots the guests).

A cell is one setting of the axes issue 30 names: the PVH and HVM guests' paging (HAP
on the L1's emulated NPT, or shadow: the xl config's ``hap = 0``), the L1 QEMU's TCG
threading (``-accel tcg,thread=multi`` or ``thread=single``) and how many guests boot at
once (1: one at a time; 3: as the cold start boots the shared guests). The L1 QEMU's
version is recorded with every boot; another version is another run into the same file.

Every boot is one record in the results file, written when it ends, so a run of hours can
be stopped and started again: it boots only what its cells still lack.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import PAGING_MODES
from .report import markdown_table

GUEST_TYPES = ("pv", "pvh", "hvm")
THREADS = ("multi", "single")  # -accel tcg,thread=...
NO_THREADS = "kvm"  # the thread axis of a KVM L1 (it has none)
AT_ONCE = (1, 3)
# How a boot ended. An early death is what the harness retries as an emulator fault
# (harness/guests.py died_in_early_boot: gone before its report, silently or by a triple
# fault of its own domid); the rate the table gives is of these.
OUTCOMES = ("ready", "early-death", "crashed", "timeout", "error")
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval
FORMAT = 1


class BenchError(Exception):
    """Bad axes or an unusable results file; the message says what to do."""


@dataclass(frozen=True, order=True)
class Cell:
    thread: str
    paging: str
    at_once: int

    def label(self) -> str:
        return f"{self.paging}, tcg thread={self.thread}, {self.at_once} at once"


def parse_axis(text: str, allowed: Sequence, what: str) -> tuple:
    """``"hap,shadow"`` -> ("hap", "shadow"), every value one of ``allowed`` (ints for ints)."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    kind = type(allowed[0])
    try:
        typed = tuple(kind(v) for v in values)
    except ValueError:
        typed = ()
    if not typed or any(v not in allowed for v in typed) or len(set(typed)) != len(typed):
        raise BenchError(f"{what}: {text!r}; give one or more of {', '.join(map(str, allowed))}, "
                         "comma-separated, each once")
    return typed


def cells(paging: Iterable[str] = PAGING_MODES, threads: Iterable[str] = THREADS,
          at_once: Iterable[int] = AT_ONCE) -> list[Cell]:
    """Every combination, grouped by thread mode (one L1 boot each)."""
    return sorted(Cell(t, p, n) for t in threads for p in paging for n in at_once)


@dataclass
class Boot:
    """One guest boot: where (setup and cell), and how it ended."""

    image: str
    qemu: str  # the L1 QEMU's version ("10.0.2"): its `--version` line is in qemu_line
    thread: str
    paging: str  # asked for (the xl config); PV guests run on neither
    at_once: int
    type: str
    outcome: str  # an OUTCOMES entry
    ready_s: float | None = None  # from `xl create` to the probe's report
    create_s: float | None = None  # `xl create -p` alone
    paging_seen: str = ""  # what `xl list -l` says the domain ran on ("" PV, or not read)
    signature: str | None = None  # the known_issues.yaml guest-death entry its evidence shows
    detail: str = ""
    evidence: dict[str, str] = dataclasses.field(default_factory=dict)
    xen: str = ""
    qemu_line: str = ""
    accel: str = "tcg"
    batch: int = 0  # the guests booted together have one batch number
    at: str = ""  # when it started (ISO 8601, UTC)

    @property
    def cell(self) -> Cell:
        return Cell(self.thread, self.paging, self.at_once)

    def setup(self) -> tuple[str, str]:
        return (self.image, self.qemu)


class BenchFile:
    """The results file: every boot so far, rewritten whole (atomically) after each."""

    def __init__(self, path: Path, boots: list[Boot] | None = None) -> None:
        self.path, self.boots = path, boots or []

    @classmethod
    def load(cls, path: Path) -> BenchFile:
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
            names = {f.name for f in dataclasses.fields(Boot)}
            boots = [Boot(**{k: v for k, v in raw.items() if k in names}) for raw in data["boots"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BenchError(f"{path}: not a bench-guests results file ({exc}); move it away or give "
                             "another --json FILE") from None
        return cls(path, boots)

    def add(self, boot: Boot) -> None:
        self.boots.append(boot)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "what": "nested-xen bench guests: one record per guest boot",
                "boots": [dataclasses.asdict(b) for b in self.boots]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.path)

    def done(self, setup: tuple[str, str], cell: Cell, guest_type: str) -> int:
        return sum(1 for b in self.boots if b.setup() == setup and b.cell == cell and b.type == guest_type)

    def xen_of(self, setup: tuple[str, str]) -> set[str]:
        return {b.xen for b in self.boots if b.setup() == setup and b.xen}


def batches(left: dict[str, int], at_once: int) -> list[list[str]]:
    """The boots still to do (``left``: guest type -> how many), the types taken in turn
    (pv, pvh, hvm, pv, ...) and cut into groups of ``at_once`` that boot together."""
    queue: list[str] = []
    left = dict(left)
    while any(n > 0 for n in left.values()):
        for kind in [k for k in GUEST_TYPES if k in left] + [k for k in left if k not in GUEST_TYPES]:
            if left[kind] > 0:
                queue.append(kind)
                left[kind] -= 1
    return [queue[i:i + at_once] for i in range(0, len(queue), at_once)]


def interleave(groups: Sequence[Sequence[list[str]]]) -> list[tuple[int, list[str]]]:
    """The batches of several cells taken in turn (cell 0's first, cell 1's first, ...), so
    that a drift of the machine over hours is spread across the cells: (cell index, batch)."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [(c, list(g[i])) for c, g in enumerate(groups) if i < len(g)]
    return out


# ---------------------------------------------------------------------- statistics


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a rate ``hits``/``n`` (95 % by default); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Row:
    """One (setup, cell, guest type) of the table."""

    qemu: str
    image: str
    cell: Cell
    type: str
    boots: int
    ready: int
    median_s: float | None
    p90_s: float | None
    deaths: int  # early deaths: the emulator-fault rate's numerator
    others: int  # crashed otherwise, timed out, refused
    interval: tuple[float, float]


def summarize(boots: Iterable[Boot]) -> list[Row]:
    groups: dict[tuple, list[Boot]] = defaultdict(list)
    for b in boots:
        groups[(b.qemu, b.image, b.cell, GUEST_TYPES.index(b.type) if b.type in GUEST_TYPES else 9,
                b.type)].append(b)
    rows = []
    for (qemu, image, cell, _, kind), group in sorted(groups.items()):
        times = [b.ready_s for b in group if b.outcome == "ready" and b.ready_s is not None]
        deaths = sum(b.outcome == "early-death" for b in group)
        ready = sum(b.outcome == "ready" for b in group)
        rows.append(Row(qemu, image, cell, kind, len(group), ready,
                        statistics.median(times) if times else None, percentile(times, 0.9),
                        deaths, len(group) - ready - deaths, wilson(deaths, len(group))))
    return rows


HEADER = ("QEMU", "image", "paging", "TCG threads", "at once", "guest", "N", "ready", "median s",
          "p90 s", "early deaths", "95% interval", "other failures")


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_rows(rows: Iterable[Row]) -> list[tuple[str, ...]]:
    return [(r.qemu, r.image, f"({r.cell.paging})" if r.type == "pv" else r.cell.paging, r.cell.thread,
             str(r.cell.at_once), r.type, str(r.boots), str(r.ready), _s(r.median_s), _s(r.p90_s),
             f"{r.deaths}/{r.boots}", f"{r.interval[0]:.0%}-{r.interval[1]:.0%}", str(r.others))
            for r in rows]


def markdown(boots: Sequence[Boot]) -> str:
    """The table, with what its columns mean."""
    if not boots:
        return "No guest boot recorded yet.\n"
    xen = ", ".join(sorted({f"{b.image}: Xen {b.xen}" for b in boots if b.xen}))
    lines = [f"### Guest boots: time to probe-ready and early deaths ({len(boots)} boots; {xen})", "",
             markdown_table(HEADER, table_rows(summarize(boots))), "",
             "N boots per row; median and p90 of the ready ones, seconds from `xl create` to the probe's "
             "report; early deaths: gone before the report, silently or by a triple fault of the guest's "
             "own domid (what the harness retries as an emulator fault), with the Wilson 95% interval "
             "of that rate. PV guests run on neither HAP nor shadow: (paging) names the cell they "
             "booted in beside PVH and HVM guests."]
    mismatched = [b for b in boots if b.paging_seen and b.type != "pv" and b.paging_seen != b.paging]
    if mismatched:
        lines += ["", f"**{len(mismatched)} boot(s) ran on another paging mode than asked** "
                  "(paging_seen in the JSON): their rows do not measure what they say."]
    return "\n".join(lines) + "\n"
