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

from ._privcmd_table import LARGE_BATCH, Row, rows_for

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


def format_table(mismatches: list[Mismatch]) -> str:
    lines = [f"{'class':22} {'frame':>14}  {'expected':14} {'got':14} why"]
    for m in mismatches:
        frame = "-" if m.frame is None else hex(m.frame)
        lines.append(f"{m.cls:22} {frame:>14}  {m.expected:14} {m.got:14} {m.why}")
    return "\n".join(lines)


def context(guest, agent) -> dict:
    if guest.type != "pv":
        return {}
    return {"p2m": agent.p2m(guest.domid, list(range(guest.spec.memory_mb * 256)))}


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


def compare(guest, answers: list[tuple[Row, object, object]]) -> list[Mismatch]:
    """Every frame whose result differs from the table, or whose content is wrong."""
    probe = {p.gfn: p.sha256 for p in guest.pages}
    out: list[Mismatch] = []
    for row, asked, result in answers:
        if result.crashed or result.timed_out or not result.ok:
            out.append(Mismatch(row.cls, None, "an answer", f"{result.crashed or result.error}", row.why))
            continue
        got_rc = result.rc if result.rc >= 0 else -(result.errno or 0)
        if got_rc != row.rc:
            out.append(Mismatch(row.cls, None, f"ioctl {_name(row.rc)}", f"ioctl {_name(got_rc)}", row.why))
            continue
        for frame, want, res in zip(asked.frames, row.expected(guest, asked), result.frames, strict=True):
            if res.error != want:
                out.append(Mismatch(row.cls, frame, _name(want), _name(res.error), row.why))
            elif want == 0 and frame in probe and asked.domid is None and res.sha256 is not None \
                    and res.sha256 != probe[frame]:
                out.append(Mismatch(row.cls, frame, "probe content", f"sha {res.sha256[:12]}", row.why))
    return out


@pytest.fixture(scope="module")
def answers(guest, agent, host_facts):
    rows = rows_for(guest.type, host_facts.dom0_mode)
    if not rows:
        pytest.skip(f"the table has no rows for a {guest.type} guest under a {host_facts.dom0_mode} dom0")
    return ask(agent, guest, rows, context(guest, agent))


def assert_dom0_healthy(xl, agent, guest) -> None:
    assert any(d.domid == 0 for d in xl.list()), "dom0 missing from xl list"
    again = agent.map_foreign(guest.domid, [guest.pages[0].gfn])
    assert again.frames[0].error == 0 and again.frames[0].sha256 == guest.pages[0].sha256, \
        "after the table, a valid frame no longer maps with the probe's content"


@check(dom0=["pv"])
def test_frame_classes_match_the_table(guest, answers, xl, agent, record_property):
    mismatches = compare(guest, answers)
    record_property("classes", ",".join(sorted({r.cls for r, _, _ in answers})))
    assert not mismatches, f"{guest.type} guest {guest.domid}:\n" + format_table(mismatches)
    assert_dom0_healthy(xl, agent, guest)


@check(dom0=["pv"])
def test_negative_control_corrupted_table_is_caught(guest, answers):
    corrupted = [
        (dataclasses.replace(row, expect=-errno.EINVAL) if row.cls == "valid" else row, asked, result)
        for row, asked, result in answers
    ]
    mismatches = compare(guest, corrupted)
    assert [m.cls for m in mismatches] == ["valid"], format_table(mismatches)
    assert "-EINVAL" in format_table(mismatches)


@check(dom0=["pv"])
def test_negative_control_wrong_frame_content_is_caught(guest, agent):
    """Map page 1's frame where page 0 is expected: the content check must fire."""
    wrong = agent.map_foreign(guest.domid, [guest.pages[1].gfn])
    assert wrong.frames[0].error == 0
    assert wrong.frames[0].sha256 != guest.pages[0].sha256


# Absurd frames may upset dom0: this module gets a host of its own (restored from
# the L1 snapshot in seconds), so nothing it breaks leaks into other modules.
@check(dom0=["pv"], fresh_host=True)
def test_absurd_frames_are_refused_or_alias_and_dom0_survives(guest, agent, xl, record_property):
    """Frame values of 2^40 and above: a robustness probe, kept apart from the table.

    On a PV dom0, Linux builds the PTE as frame << 12 and Xen reads bits 52-63 as
    flags, so such a frame can alias frame mod 2^40. The only hard expectation is:
    no crash, dom0 alive, and anything that maps is exactly that alias (not some
    arbitrary page). What happened is recorded as a finding.
    """
    base = guest.pages[0].gfn
    frames = [(1 << bits) + base for bits in ABSURD_BITS] + [2**64 - 1]
    result = agent.map_foreign(guest.domid, frames)
    assert not result.crashed and not result.timed_out, result.raw
    findings = []
    for frame, res in zip(frames, result.frames, strict=True):
        alias = frame & ((1 << 40) - 1)
        if res.error == 0:
            assert alias == base and res.sha256 == guest.pages[0].sha256, (
                f"frame {frame:#x} mapped something that is not its alias {alias:#x}")
            findings.append(f"{frame:#x} ALIASES {alias:#x} (mapped the probe page)")
        else:
            findings.append(f"{frame:#x} refused {_name(res.error)}")
    record_property("absurd_frames", "; ".join(findings))
    print(f"{guest.type}: absurd frames: " + "; ".join(findings))
    assert_dom0_healthy(xl, agent, guest)
