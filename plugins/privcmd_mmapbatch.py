"""privcmd IOCTL_PRIVCMD_MMAPBATCH_V2 frame classes against the expectation table.

Every class of plugins/_privcmd_table.py is asked in one agent batch against a
live guest; each frame's result must be exactly what the table says, valid
frames must carry the probe's content, and dom0 must stay healthy. A failing
run prints one line per wrong frame: class, frame, expected, got, and why the
table expects it. The negative controls corrupt the table and the frames, and
show the comparison catches both.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest

from harness.plugins import check

from ._privcmd_table import LARGE_BATCH, NEVER_RUN, NOT_OBSERVED, Row, is_observed, row_for, rows_for
from .no_raw_mfn import grant_mfns

ABSURD_BITS = (40, 52, 63)


def _name(value: int | None) -> str:
    if value is None:
        return "unknown"
    if value == 0:
        return "0 (mapped)"
    return f"-{errno.errorcode.get(-value, str(-value))}"


@dataclasses.dataclass(frozen=True)
class Mismatch:
    cls: str
    frame: int | None
    expected: str
    got: str
    why: str
    other: str = ""  # what the table expects under the other dom0 mode, where it differs


def format_table(mismatches: list[Mismatch], dom0_mode: str = "pv") -> str:
    other = f"{_other(dom0_mode)} dom0 expects"
    lines = [f"{'class':22} {'frame':>14}  {'expected':14} {'got':14} {other:18} why"]
    for m in mismatches:
        frame = "-" if m.frame is None else hex(m.frame)
        lines.append(f"{m.cls:22} {frame:>14}  {m.expected:14} {m.got:14} {m.other or '(same)':18} {m.why}")
    return "\n".join(lines)


def _other(dom0_mode: str) -> str:
    return "pvh" if dom0_mode == "pv" else "pv"


def _expected_names(row: Row | None, guest, asked) -> list[str]:
    if row is None:
        return ["(no row)"] * max(1, len(asked.frames))
    if not asked.frames:
        return [f"ioctl {_name(row.rc)}"]
    return [_name(e) for e in row.expected(guest, asked)]


def mode_table(guest, answers, dom0_mode: str) -> str:
    """Side by side, for each class whose expectation depends on the dom0 mode: what a PV
    and a PVH dom0 are expected to get, and what this host's dom0 got."""
    lines = [f"{'class':18} {'frame':>12}  {'pv dom0':10} {'pvh dom0':10} got ({dom0_mode} dom0)"]
    for row, asked, result in answers:
        pv = _expected_names(row_for(row.cls, guest.type, "pv"), guest, asked)
        pvh = _expected_names(row_for(row.cls, guest.type, "pvh"), guest, asked)
        if pv == pvh:
            continue
        pvh_row = row_for(row.cls, guest.type, "pvh")
        if pvh_row is not None and not is_observed(pvh_row, guest.type, "pvh"):
            pvh = [f"{n}?" for n in pvh]  # the source's prediction, not observed
        if not asked.frames:
            got = [f"ioctl {_name(result.rc if result.rc >= 0 else -(result.errno or 0))}"]
        else:
            got = [_name(f.error) for f in result.frames] if result.ok else [str(result.error)]
        for i, (a, b) in enumerate(zip(pv, pvh, strict=True)):
            frame = hex(asked.frames[i]) if asked.frames else "-"
            lines.append(f"{row.cls:18} {frame:>12}  {a:10} {b:10} {got[i] if i < len(got) else '?'}")
    return "\n".join(lines) if len(lines) > 1 else ""


def context(guest, agent, xl=None) -> dict:
    """PV: the guest's p2m and its probe page's MFN. PVH/HVM: the (gfn, MFN) of a page the
    guest granted, as Xen's 'g' debug-key dump prints it, when there is one."""
    if guest.type != "pv":
        pairs = [(g, m) for g, m in grant_mfns(xl.dmesg(), guest.domid) if g != m] if xl else []
        return {"guest_mfn": pairs[-1]} if pairs else {}
    return {"p2m": agent.p2m(guest.domid, list(range(guest.spec.memory_mb * 256))),
            "guest_mfn": (guest.pages[0].gfn, guest.pages[0].mfn)}


def askable(rows: list[Row], ctx: dict) -> tuple[list[Row], list[str]]:
    """The rows whose frames the context can give, and a sentence for each one it cannot."""
    keep = [r for r in rows if not r.needs or r.needs in ctx]
    left = [f"{r.cls}: not asked, this guest gave no {r.needs} (no active grant in Xen's 'g' dump)"
            for r in rows if r.needs and r.needs not in ctx]
    return keep, left


def _got(asked, result) -> str:
    if not result.ok or result.crashed or result.timed_out:
        return str(result.crashed or result.error)
    if not asked.frames:
        return f"ioctl {_name(result.rc if result.rc >= 0 else -(result.errno or 0))}"
    return ",".join(dict.fromkeys(_name(f.error) for f in result.frames))


def got_lines(answers) -> list[str]:
    """What this run got, one line per class (distinct per-frame results in order)."""
    return [f"{row.cls} ({len(asked.frames)} frames, domid {'guest' if asked.domid is None else asked.domid}"
            f"): {_got(asked, result)}" for row, asked, result in answers]


def unobserved(guest, answers, dom0_mode: str) -> list[str]:
    """One sentence per row no run has observed for this guest under this dom0 mode: what it
    got beside what the source predicts. These rows are reported, never asserted."""
    out = []
    for row, asked, result in answers:
        if is_observed(row, guest.type, dom0_mode):
            continue
        got, want = _got(asked, result), ",".join(dict.fromkeys(_expected_names(row, guest, asked)))
        out.append(f"{row.cls}: {NOT_OBSERVED} before under a {dom0_mode} dom0 for a {guest.type} "
                   f"guest, not asserted: got {got}, the source predicts {want}")
    return out


def ask(agent, guest, rows: list[Row], ctx: dict) -> list[tuple[Row, object, object]]:
    """Run every row's frames in one agent batch; return (row, asked, result)."""
    from harness.agent.client import map_request

    asked = [row.frames(guest, ctx) for row in rows]
    calls = [
        map_request(a.domid if a.domid is not None else guest.domid, a.frames,
                    want="none" if len(a.frames) >= LARGE_BATCH else "sha256")
        for a in asked
    ]
    return list(zip(rows, asked, agent.batch(calls), strict=True))


def compare(guest, answers: list[tuple[Row, object, object]], dom0_mode: str = "pv") -> list[Mismatch]:
    """Every frame whose result differs from the table, or whose content is wrong."""
    probe = {p.gfn: p.sha256 for p in guest.pages}
    out: list[Mismatch] = []
    for row, asked, result in answers:
        if not is_observed(row, guest.type, dom0_mode):
            continue  # reported by unobserved(), never asserted
        other_row = row_for(row.cls, guest.type, _other(dom0_mode))
        others = _expected_names(other_row, guest, asked)
        mine = _expected_names(row, guest, asked)
        other = "" if others == mine else f"{_other(dom0_mode)}: " + ",".join(dict.fromkeys(others))
        if result.crashed or result.timed_out or not result.ok:
            out.append(Mismatch(row.cls, None, "an answer", f"{result.crashed or result.error}", row.why,
                                other))
            continue
        got_rc = result.rc if result.rc >= 0 else -(result.errno or 0)
        if got_rc != row.rc:
            out.append(Mismatch(row.cls, None, f"ioctl {_name(row.rc)}", f"ioctl {_name(got_rc)}", row.why,
                                other))
            continue
        for i, (frame, want, res) in enumerate(
                zip(asked.frames, row.expected(guest, asked), result.frames, strict=True)):
            alt = "" if not other else f"{_other(dom0_mode)}: {others[i]}"
            if res.error != want:
                out.append(Mismatch(row.cls, frame, _name(want), _name(res.error), row.why, alt))
            elif want == 0 and frame in probe and asked.domid is None and res.sha256 is not None \
                    and res.sha256 != probe[frame]:
                out.append(Mismatch(row.cls, frame, "probe content", f"sha {res.sha256[:12]}", row.why, alt))
    return out


@pytest.fixture(scope="module")
def answers(guest, agent, xl, host_facts):
    rows = rows_for(guest.type, host_facts.dom0_mode)
    if not rows:
        pytest.skip(f"the table has no rows for a {guest.type} guest under a {host_facts.dom0_mode} dom0")
    if guest.type != "pv":
        xl.debug_keys("g")
    ctx = context(guest, agent, xl)
    rows, not_asked = askable(rows, ctx)
    NOT_ASKED[guest.type] = not_asked
    return ask(agent, guest, rows, ctx)


NOT_ASKED: dict[str, list[str]] = {}


def assert_dom0_healthy(xl, agent, guest) -> None:
    assert any(d.domid == 0 for d in xl.list()), "dom0 missing from xl list"
    again = agent.map_foreign(guest.domid, [guest.pages[0].gfn])
    assert again.frames[0].error == 0 and again.frames[0].sha256 == guest.pages[0].sha256, \
        "after the table, a valid frame no longer maps with the probe's content"


@check()
def test_frame_classes_match_the_table(guest, answers, xl, agent, host_facts, record_property):
    mode = host_facts.dom0_mode
    mismatches = compare(guest, answers, mode)
    record_property("classes", ",".join(sorted({r.cls for r, _, _ in answers})))
    record_property("dom0_mode", mode)
    print(f"{guest.type} guest {guest.domid} under a {mode} dom0 got:\n  " + "\n  ".join(got_lines(answers)))
    notes = NOT_ASKED.get(guest.type, []) + unobserved(guest, answers, mode)
    if notes:
        record_property("not_asserted", "; ".join(notes))
        print(f"{guest.type} guest under a {mode} dom0, reported and not asserted:\n  " + "\n  ".join(notes))
    by_mode = mode_table(guest, answers, mode)
    if by_mode:
        record_property("dom0_mode_differences", by_mode)
        print(f"{guest.type} guest: classes whose expectation depends on the dom0 mode:\n{by_mode}")
    assert not mismatches, (f"{guest.type} guest {guest.domid} under a {mode} dom0:\n"
                            + format_table(mismatches, mode)
                            + (f"\n\nby dom0 mode:\n{by_mode}" if by_mode else ""))
    assert_dom0_healthy(xl, agent, guest)


def unasserted(guest_type: str, dom0_mode: str, answers, cls: str | None = None) -> str | None:
    """Why a control has nothing to catch here, or None. The controls test the table check's
    assertion (compare()); where it asserts no row (or not the control's row ``cls``) for this
    guest type under this dom0 mode, a control would fail by construction or pass with
    nothing asserted, so it is skipped with this sentence instead."""
    if (dom0_mode, guest_type) in NEVER_RUN:
        return (f"no run has observed a {guest_type} guest under a {dom0_mode} dom0: every row is the "
                "source's prediction, which test_frame_classes_match_the_table reports and does not "
                "assert, so this control has no assertion to test")
    asserted = {row.cls for row, asked, _ in answers
                if asked.frames and is_observed(row, guest_type, dom0_mode)}
    if cls is not None and cls not in asserted:
        return f"the {cls!r} row is not asserted for a {guest_type} guest under a {dom0_mode} dom0"
    if not asserted:
        return f"no row with frames is asserted for a {guest_type} guest under a {dom0_mode} dom0"
    return None


@pytest.fixture
def valid_row_asserted(guest, answers, host_facts) -> None:
    """Skip (at setup, with the reason) a control of the 'valid' row where it is not asserted."""
    reason = unasserted(guest.type, host_facts.dom0_mode, answers, "valid")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def rows_asserted(guest, answers, host_facts) -> None:
    """Skip (at setup, with the reason) a control of every row where no row is asserted."""
    reason = unasserted(guest.type, host_facts.dom0_mode, answers)
    if reason:
        pytest.skip(reason)


def assert_corrupted_table_caught(guest, answers, dom0_mode: str) -> None:
    """The 'valid' row's expectation made -EINVAL: compare() must flag that row alone."""
    corrupted = [
        (dataclasses.replace(row, expect=-errno.EINVAL) if row.cls == "valid" else row, asked, result)
        for row, asked, result in answers
    ]
    mismatches = compare(guest, corrupted, dom0_mode)
    assert [m.cls for m in mismatches] == ["valid"], format_table(mismatches, dom0_mode)
    assert "-EINVAL" in format_table(mismatches, dom0_mode)


@check()
def test_negative_control_corrupted_table_is_caught(guest, answers, host_facts, valid_row_asserted):
    assert_corrupted_table_caught(guest, answers, host_facts.dom0_mode)


class _Expecting:
    """The guest as compare() sees it, with one probe page's expected content replaced."""

    def __init__(self, guest, index: int, sha256: str) -> None:
        self._guest = guest
        self.pages = [dataclasses.replace(p, sha256=sha256) if p.index == index else p for p in guest.pages]

    def __getattr__(self, name: str):
        return getattr(self._guest, name)


def assert_wrong_content_caught(guest, answers, dom0_mode: str = "pv") -> None:
    """Expect page 1's content at page 0's frame (one wrong expectation, the real
    answers): the real compare() must report that frame's content in the 'valid' class
    (and in every other class that maps it, e.g. 'mixed'), and nothing else new."""
    faulted = _Expecting(guest, guest.pages[0].index, guest.pages[1].sha256)
    before = compare(guest, answers, dom0_mode)
    after = compare(faulted, answers, dom0_mode)
    new = [m for m in after if m not in before]
    assert "valid" in {m.cls for m in new}, format_table(after, dom0_mode)
    assert {(m.frame, m.expected) for m in new} == {(guest.pages[0].gfn, "probe content")}, \
        format_table(after, dom0_mode)


@check()
def test_negative_control_wrong_frame_content_is_caught(guest, answers, host_facts, valid_row_asserted):
    """The table's real answers, judged against one corrupted expectation."""
    assert_wrong_content_caught(guest, answers, host_facts.dom0_mode)


# What a wrong expectation would say instead: the answer that the other reading of the
# source gives (refused before the frame is looked at <-> the frame looked at and refused;
# mapped <-> no page).
_WRONG = {-errno.EBUSY: -errno.ESRCH, -errno.ESRCH: -errno.EBUSY, -errno.EINVAL: 0, 0: -errno.EINVAL,
          -errno.EPERM: -errno.EBUSY}


def corrupt(row: Row) -> Row:
    """The row with every per-frame expectation replaced by its _WRONG counterpart."""
    def wrong(guest, asked) -> list[int]:
        return [_WRONG.get(e, 0) for e in row.expected(guest, asked)]
    return dataclasses.replace(row, expect=wrong)


def corruptible(guest, answers, dom0_mode: str) -> list[int]:
    """Indexes of the answers whose row the control corrupts: asserted, with frames, and not
    already mismatching (the table check reports those)."""
    already = {m.cls for m in compare(guest, answers, dom0_mode)}
    return [i for i, (row, asked, _) in enumerate(answers)
            if asked.frames and row.cls not in already and is_observed(row, guest.type, dom0_mode)]


def wrong_expectations_missed(guest, answers, dom0_mode: str) -> list[str]:
    """Corrupt each asserted row with frames in turn: a sentence for each whose corruption
    compare() misses, or that makes another row mismatch."""
    missed = []
    already = {m.cls for m in compare(guest, answers, dom0_mode)}  # the table check reports those
    for i in corruptible(guest, answers, dom0_mode):
        row, asked, _result = answers[i]
        trial = [(corrupt(r), a, res) if j == i else (r, a, res) for j, (r, a, res) in enumerate(answers)]
        hits = [m for m in compare(guest, trial, dom0_mode) if m.cls not in already]
        if {m.cls for m in hits} != {row.cls} or len(hits) != len(asked.frames):
            missed.append(f"{row.cls}: a wrong expectation gave {len(hits)} mismatches for "
                          f"{len(asked.frames)} frames: {format_table(hits, dom0_mode)}")
    return missed


def assert_every_row_catches(guest, answers, dom0_mode: str) -> None:
    tried = corruptible(guest, answers, dom0_mode)
    assert tried, ("every asserted row already mismatches (test_frame_classes_match_the_table says "
                   "which): no row is left to corrupt, so this control shows nothing")
    missed = wrong_expectations_missed(guest, answers, dom0_mode)
    assert not missed, "\n".join(missed)


@check()
def test_negative_control_every_row_catches_a_wrong_expectation(guest, answers, host_facts, rows_asserted):
    """Each asserted row, its expectation swapped for the other reading of the source
    (EBUSY <-> ESRCH, EINVAL <-> mapped), must be caught frame by frame on this run's answers."""
    assert_every_row_catches(guest, answers, host_facts.dom0_mode)


# Absurd frames may upset dom0: this module gets a host of its own (restored from
# the L1 snapshot in seconds), so nothing it breaks leaks into other modules.
ABSURD_EXPECTATION = {
    # Linux arch/x86/xen/mmu_pv.c remap_area_pfn_pte_fn builds the PTE as
    # pfn_pte(frame, prot), i.e. frame << 12, and Xen reads PTE bits 52-63 as flags.
    "pv": "refused, or aliases frame mod 2^40 (the PTE is frame << 12; Xen reads bits 52-63 as flags)",
    # Linux drivers/xen/xlate_mmu.c setup_hparams: h_idxs[i] = *info->fgfn (the whole
    # 64-bit frame); Xen p2m_add_foreign: get_page_from_gfn() finds no page -> -EINVAL.
    "pvh": "-EINVAL for every frame: it reaches Xen whole as a gfn (xlate_mmu.c setup_hparams) "
           "and p2m_add_foreign finds no page there",
}


@check(fresh_host=True)
def test_absurd_frames_are_refused_or_alias_and_dom0_survives(guest, agent, xl, host_facts,
                                                               record_property):
    """Frame values of 2^40 and above: a robustness probe, kept apart from the table.

    On a PV dom0, Linux builds the PTE as frame << 12 and Xen reads bits 52-63 as
    flags, so such a frame can alias frame mod 2^40. The only hard expectation there
    is: no crash, dom0 alive, and anything that maps is exactly that alias (not some
    arbitrary page). A PVH dom0 hands the frame to Xen whole (XENMEM_add_to_physmap_range),
    so every absurd frame must be refused with -EINVAL. What happened is recorded.
    """
    mode = host_facts.dom0_mode
    base = guest.pages[0].gfn
    frames = [(1 << bits) + base for bits in ABSURD_BITS] + [2**64 - 1]
    result = agent.map_foreign(guest.domid, frames)
    assert not result.crashed and not result.timed_out, result.raw
    findings, wrong = [], []
    for frame, res in zip(frames, result.frames, strict=True):
        alias = frame & ((1 << 40) - 1)
        if res.error == 0:
            assert alias == base and res.sha256 == guest.pages[0].sha256, (
                f"frame {frame:#x} mapped something that is not its alias {alias:#x}")
            findings.append(f"{frame:#x} ALIASES {alias:#x} (mapped the probe page)")
        else:
            findings.append(f"{frame:#x} refused {_name(res.error)}")
        if mode == "pvh" and res.error != -errno.EINVAL:
            wrong.append(f"{frame:#x}: got {_name(res.error)}")
    side_by_side = "\n".join(f"  {m} dom0 expects: {text}" for m, text in ABSURD_EXPECTATION.items())
    record_property("absurd_frames", "; ".join(findings))
    record_property("dom0_mode", mode)
    print(f"{guest.type} guest, {mode} dom0: absurd frames: " + "; ".join(findings) + "\n" + side_by_side)
    assert not wrong, ("under a PVH dom0 every absurd frame must be -EINVAL:\n  " + "\n  ".join(wrong)
                       + "\n" + side_by_side)
    assert_dom0_healthy(xl, agent, guest)
