"""Did the pages the guest wrote during a migration arrive? The probe's dirty buffer.

A probe with a dirty workload (``nxprobe.dirty_mb``/``dirty_pct``) keeps rewriting a
buffer, page after page, stamping each page with (nonce, generation, index); a
cursor page says how many page writes completed (images/guests/probe.c; the layout
is harness/agent/nxagent/dirty.py's). With the guest paused, dom0 reads the cursor
page and every buffer page (the agent's dirty_scan) and :func:`check_dirty` checks
the invariant: after ``writes`` completed writes of an N-page buffer, generation
g = 1 + writes // N and cursor c = writes % N; pages before c hold g, pages after c
hold g - 1. A page that was not re-sent by a migration holds an older generation.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field

from .agent.dirty_client import PageStamp
from .probe_report import ProbeReport
from .timeouts import XL_PAUSE_S

MAX_LISTED = 20  # pages named in a failure; the rest are counted


@dataclass
class DirtyFrames:
    """The dirty buffer's frames as a guest's harness object keeps them: pfns from the probe's
    report, and for a PV guest the MFNs its p2m gives them (what a mapping call takes)."""

    nonce: str
    pfns: list[int]
    cursor_pfn: int
    mfns: list[int] | None = None
    cursor_mfn: int | None = None

    @classmethod
    def from_report(cls, report: ProbeReport) -> DirtyFrames | None:
        if report.dirty is None:
            return None
        return cls(report.nonce, list(report.dirty.pfns), report.dirty.cursor_pfn)

    @property
    def all_pfns(self) -> list[int]:
        return [*self.pfns, self.cursor_pfn]

    def resolve(self, table: dict[int, int]) -> None:
        """Take the MFNs from a PV guest's pfn -> mfn table."""
        self.mfns = [table[p] for p in self.pfns]
        self.cursor_mfn = table[self.cursor_pfn]

    @property
    def gfns(self) -> list[int]:
        return self.mfns if self.mfns is not None else self.pfns

    @property
    def cursor_gfn(self) -> int:
        return self.cursor_mfn if self.cursor_mfn is not None else self.cursor_pfn


@dataclass(frozen=True)
class Miss:
    """A dirty page that does not hold what the guest last wrote there."""

    index: int
    gfn: int
    found: str
    expected: int

    def line(self) -> str:
        return f"page {self.index:5d} gfn {self.gfn:#x}: {self.found}, expected generation {self.expected}"


@dataclass
class DirtyVerdict:
    pages: int
    generation: int | None = None
    cursor: int | None = None
    writes: int | None = None
    misses: list[Miss] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the snapshot could not be judged

    @property
    def ok(self) -> bool:
        return not self.misses and not self.problems

    @property
    def verified(self) -> int:
        """Pages checked against the invariant (0 when the cursor page could not be read)."""
        return 0 if self.problems else self.pages

    def message(self, iterations: int | None) -> str:
        head = (f"dirty buffer: generation {self.generation}, cursor {self.cursor}, {self.writes} writes; "
                f"pre-copy iterations: {iterations if iterations is not None else 'not reported'}")
        if self.problems:
            return f"{head}\ncould not be checked: " + "; ".join(self.problems)
        lines = [m.line() for m in self.misses[:MAX_LISTED]]
        more = len(self.misses) - MAX_LISTED
        return (f"{len(self.misses)} of {self.pages} dirty pages did not arrive ({head}):\n"
                + "\n".join(lines) + (f"\n... and {more} more" if more > 0 else ""))


def _cursor_problems(nonce: str, pages: int, cursor: dict | None) -> list[str]:
    if not cursor or cursor.get("error") != 0:
        return [f"the cursor page did not map (error {None if not cursor else cursor.get('error')})"]
    out = []
    if not cursor.get("magic_ok"):
        out.append("the cursor page has no NXCURSR1 magic")
    if cursor.get("nonce") != nonce:
        out.append(f"the cursor page's nonce is {cursor.get('nonce')}, the probe's {nonce}")
    if cursor.get("pages") != pages:
        out.append(f"the cursor page counts {cursor.get('pages')} pages, the probe reported {pages}")
    return out


def position(writes: int, pages: int) -> tuple[int, int]:
    """(generation, cursor) after ``writes`` completed page writes."""
    return 1 + writes // pages, writes % pages


def _found(page: PageStamp, nonce: str, index: int) -> str | None:
    """What is wrong with a page whatever its generation (None: a whole page of this probe's)."""
    if page.error != 0:
        return f"not mapped (error {page.error})"
    if not page.magic_ok:
        return "no NXDIRTY1 magic"
    if page.nonce != nonce:
        return f"nonce {page.nonce}"
    if page.index != index:
        return f"index {page.index} (another page's)"
    return None


def check_dirty(nonce: str, cursor: dict | None, pages: list[PageStamp], gfns: list[int]) -> DirtyVerdict:
    """The invariant over one paused snapshot: ``cursor`` is the cursor page as the agent
    parsed it (with its mapping "error"), ``pages`` the buffer in order, ``gfns`` their frames."""
    verdict = DirtyVerdict(len(pages))
    verdict.problems = _cursor_problems(nonce, len(pages), cursor)
    if verdict.problems:
        return verdict
    assert cursor is not None
    writes = int(cursor["writes"])
    g, c = position(writes, len(pages))
    verdict.generation, verdict.cursor, verdict.writes = g, c, writes
    # writes is stored last: generation and cursor may already be one write ahead
    if (cursor.get("generation"), cursor.get("cursor")) not in (position(writes, len(pages)),
                                                               position(writes + 1, len(pages))):
        verdict.problems.append(f"the cursor page says generation {cursor.get('generation')} cursor "
                                f"{cursor.get('cursor')}, its {writes} writes say {g} and {c}")
        return verdict
    for i, page in enumerate(pages):
        expected = g if i < c else g - 1
        wrong = _found(page, nonce, i)
        if wrong is None and i == c:
            # The page AT the cursor may be the one being written when the guest was paused:
            # still g - 1, already g, or torn (header g - 1 over a partly written body: the
            # probe writes the header last, so a header g always has its whole body).
            if page.generation == g - 1 or (page.generation == g and page.body_ok):
                continue
        elif wrong is None and page.generation == expected and page.body_ok:
            continue
        if wrong is None:
            wrong = (f"generation {page.generation}" if page.body_ok
                     else f"torn: generation {page.generation} header over another body")
        verdict.misses.append(Miss(i, gfns[i], wrong, expected))
    return verdict


def scan(guest, agent) -> DirtyVerdict:
    """Read a paused guest's cursor page and dirty buffer through the agent and judge them."""
    frames: DirtyFrames | None = guest.dirty_frames
    if frames is None:
        return DirtyVerdict(0, problems=[
            f"{guest.name} was given a dirty workload ({guest.spec.dirty_pct}% of {guest.spec.dirty_mb} MiB "
            "a second) but its probe reported no dirty buffer: an initramfs built before protocol "
            "version 2? Rebuild the guest payload (harness/guest_payload.py)"])
    guest.resolve_mfns(agent.p2m)  # PV: the MFNs changed with the migration
    result = agent.dirty_scan(guest.domid, frames.gfns, frames.cursor_gfn)
    if result.crashed or result.timed_out:
        return DirtyVerdict(len(frames.pfns), problems=[
            f"the agent's dirty_scan {'crashed' if result.crashed else 'timed out'}: "
            f"{result.crashed or ''} (stage {result.raw.get('stage')})"])
    return check_dirty(frames.nonce, result.cursor, result.pages, frames.gfns)


def stale_target(verdict: DirtyVerdict) -> tuple[int, int, int]:
    """For the negative control: (index, generation it holds, an older one to write), a
    page well away from the cursor whose generation is at least 1."""
    assert verdict.generation is not None and verdict.cursor is not None
    g, c, n = verdict.generation, verdict.cursor, verdict.pages
    if c >= 2:
        return c // 2, g, g - 1  # before the cursor: g
    if g >= 2 and n - c >= 3:
        index = (c + n) // 2 + 1
        return index, g - 1, g - 2  # after the cursor: g - 1
    raise AssertionError(f"the dirty workload wrote too little to stage an older page "
                         f"(generation {g}, cursor {c} of {n} pages)")


# How long a restored PV guest may run before its p2m reads (it sets it early in resume).
PV_P2M_WAIT_S = 30.0


def let_pv_guest_publish_its_p2m(guest, agent, holder: dict) -> int:
    """A PV guest's pfn -> MFN table is the guest's own (its linear p2m, found through
    ``p2m_cr3``, which a restored domain sets again only when it runs: before that
    xen-mfndump fails "Bad mfn 0 during page table walk"). So a PV guest is let run until its
    p2m reads, then paused again for the check; pages it rewrites in that window are not
    checked as delivered (``pv_p2m_window_s`` says how long it ran). Returns when it first ran
    (dom0's clock, ns): the operation's downtime ends there."""
    name = shlex.quote(guest.name)
    out = guest.xl.remote.run(f"date +%s.%N; xl unpause {name}", timeout=XL_PAUSE_S)
    assert out.rc == 0, f"xl unpause {guest.name} failed: {out.stdout}{out.stderr}"
    started, deadline = time.monotonic(), time.monotonic() + PV_P2M_WAIT_S
    try:
        while True:
            try:
                agent.p2m(guest.domid, [guest.pages[0].pfn])
                break
            except Exception:  # noqa: BLE001 - not published yet: the deadline decides
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        paused = guest.xl.remote.run(f"xl pause {name}", timeout=XL_PAUSE_S)
        assert paused.rc == 0, f"xl pause {guest.name} failed: {paused.stdout}{paused.stderr}"
        holder["pv_p2m_window_s"] = round(time.monotonic() - started, 2)
    return int(float(out.stdout.split()[0]) * 1e9)
