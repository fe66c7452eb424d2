"""The privcmd expectation table's logic: the rows for a guest's MFN through Xen's owners,
an MFN as a gfn, the LAPIC frame and the reserved domids; rows not observed under a dom0
mode are reported, never asserted; each row's wrong expectation is caught. No Xen here:
the agent's answers are SimpleNamespaces shaped like harness.agent.client's results."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from plugins import _privcmd_table as table
from plugins import privcmd_mmapbatch as plugin

GRANT_DUMP = """\
(XEN) grant-table for remote d7 (v1)
(XEN)   -------- active --------       -------- shared --------
(XEN) [ref] localdom mfn      pin          localdom gmfn     flags
(XEN) [0x000]      0 0x1a2b3c 0x00000001          0 0x0fefff 0x19
(XEN) [0x001]      0 0x1a2b40 0x00000001          0 0x0feffc 0x19
"""
NEW = ("domid_xen_guest_mfn", "domid_io_guest_mfn", "domid_self_guest_mfn", "guest_mfn_as_gfn",
       "lapic", *[f"reserved_domid_{d:#x}" for d in table.RESERVED_DOMIDS])


def guest(kind: str, mfn: int | None = 0x5000) -> SimpleNamespace:
    pages = [SimpleNamespace(gfn=0x100 + i, mfn=None if mfn is None else mfn + i, sha256=f"{i:064x}")
             for i in range(2)]
    return SimpleNamespace(type=kind, domid=7, spec=SimpleNamespace(memory_mb=256), pages=pages)


def answer(errors: list[int]) -> SimpleNamespace:
    frames = [SimpleNamespace(error=e, sha256=None) for e in errors]
    return SimpleNamespace(crashed=None, timed_out=False, ok=True, rc=0, errno=None, error=None,
                           frames=frames)


def answers_as_the_table_says(g, mode: str, ctx: dict) -> list:
    """What a host that behaves exactly as the table says would answer."""
    rows, _ = plugin.askable(table.rows_for(g.type, mode), ctx)
    out = []
    for row in rows:
        asked = row.frames(g, ctx)
        result = answer(row.expected(g, asked))
        if row.rc:  # the agent reports a failed ioctl as rc -1 and its errno
            result.rc, result.errno = -1, -row.rc
        out.append((row, asked, result))
    return out


def ctx_for(g) -> dict:
    if g.type == "pv":
        return {"p2m": {p: 0x5000 + p for p in range(g.spec.memory_mb * 256)},
                "guest_mfn": (g.pages[0].gfn, g.pages[0].mfn)}
    return {"guest_mfn": (0xFEFFF, 0x1A2B3C)}


# ------------------------------------------------------------------ the rows


@pytest.mark.parametrize("kind", ["pv", "pvh", "hvm"])
def test_new_classes_have_one_row_per_dom0_mode(kind: str) -> None:
    for mode in ("pv", "pvh"):
        classes = [r.cls for r in table.rows_for(kind, mode)]
        want = [c for c in NEW if kind != "pv" or c not in ("guest_mfn_as_gfn", "lapic")]
        assert [c for c in classes if c in NEW] == want


def test_new_rows_cite_xen_and_pvh_dom0_says_not_observed() -> None:
    for row in table.ROWS:
        if row.cls not in NEW:
            continue
        assert row.why.startswith("X "), row
        assert row.observed in ((), ("pv",)), "no run has observed a PVH dom0 for these rows"
        if row.dom0 == ("pvh",):
            assert table.NOT_OBSERVED in row.why and "predicts" in row.why, row.why


def test_reserved_domids_span_the_reserved_range_but_the_named_owners() -> None:
    assert set(table.RESERVED_DOMIDS) >= {0x7FF4, 0x7FF5, 0x7FF6, 0x7FFF}
    assert all(0x7FF4 <= d <= 0x8000 for d in table.RESERVED_DOMIDS)
    named = {table.DOMID_SELF, table.DOMID_IO, table.DOMID_XEN, table.DOMID_COW}
    assert not named & set(table.RESERVED_DOMIDS)


@pytest.mark.parametrize(("kind", "frame", "want"), [
    ("hvm", 0x10, 0), ("hvm", 0xA5, -errno.EINVAL), ("pvh", 0xA5, 0), ("pvh", 0xFFFF, 0),
    ("pvh", 0x10000, -errno.EINVAL), ("hvm", 0x1A2B3C, -errno.EINVAL), ("hvm", 0xFEFF2, 0),
    ("pvh", 0xFEFF2, -errno.EINVAL), ("pvh", 0xFEFFF, 0), ("hvm", table.LAPIC_FRAME, -errno.EINVAL),
])
def test_an_mfn_as_a_gfn_gets_the_guest_layouts_answer(kind: str, frame: int, want: int) -> None:
    assert table.translated_result(guest(kind), frame) == want


def test_guest_mfn_rows_ask_the_mfn_of_the_named_owner() -> None:
    g = guest("hvm", mfn=None)
    ctx = ctx_for(g)
    asked = {r.cls: r.frames(g, ctx) for r in table.rows_for("hvm", "pv") if r.cls in NEW}
    assert asked["domid_xen_guest_mfn"] == table.Frames([0x1A2B3C], table.DOMID_XEN)
    assert asked["domid_io_guest_mfn"].domid == table.DOMID_IO
    assert asked["domid_self_guest_mfn"].domid == 0x7FF0
    assert asked["guest_mfn_as_gfn"] == table.Frames([0x1A2B3C], None)
    assert asked["reserved_domid_0x7ff5"] == table.Frames([0x100], 0x7FF5)


# ------------------------------------------------------------------ the context and what is asked


class Xl:
    def dmesg(self) -> str:
        return GRANT_DUMP


def test_context_takes_a_translated_guests_mfn_from_xens_grant_dump() -> None:
    assert plugin.context(guest("hvm", mfn=None), agent=None, xl=Xl()) == {"guest_mfn": (0xFEFFC, 0x1A2B40)}
    other = guest("pvh", mfn=None)
    other.domid = 9
    assert plugin.context(other, agent=None, xl=Xl()) == {}


def test_rows_needing_an_mfn_are_not_asked_without_one_and_say_so() -> None:
    rows = table.rows_for("pvh", "pv")
    kept, left = plugin.askable(rows, {})
    assert {r.cls for r in rows} - {r.cls for r in kept} == {
        "domid_xen_guest_mfn", "domid_io_guest_mfn", "domid_self_guest_mfn", "guest_mfn_as_gfn"}
    assert len(left) == 4 and all("no guest_mfn" in s for s in left)
    assert plugin.askable(rows, {"guest_mfn": (1, 2)}) == (rows, [])


# ------------------------------------------------------------------ observed or not


@pytest.mark.parametrize("kind", ["pv", "pvh", "hvm"])
def test_a_host_that_behaves_as_the_table_says_passes(kind: str) -> None:
    g = guest(kind, mfn=None if kind != "pv" else 0x5000)
    answers = answers_as_the_table_says(g, "pv", ctx_for(g))
    assert plugin.compare(g, answers, "pv") == []
    assert plugin.unobserved(g, answers, "pv") == []


def test_a_wrong_answer_on_a_new_row_fails_under_a_pv_dom0() -> None:
    g = guest("pv")
    answers = answers_as_the_table_says(g, "pv", ctx_for(g))
    i = next(i for i, (r, _, _) in enumerate(answers) if r.cls == "domid_self_guest_mfn")
    row, asked, _ = answers[i]
    answers[i] = (row, asked, answer([0]))  # dom0 mapped a guest page through DOMID_SELF
    bad = plugin.compare(g, answers, "pv")
    assert [(m.cls, m.expected, m.got) for m in bad] == [("domid_self_guest_mfn", "-EBUSY", "0 (mapped)")]


def test_unobserved_rows_are_reported_not_asserted_under_a_pvh_dom0() -> None:
    g = guest("pvh", mfn=None)
    answers = answers_as_the_table_says(g, "pvh", ctx_for(g))
    i = next(i for i, (r, _, _) in enumerate(answers) if r.cls == "domid_io_guest_mfn")
    row, asked, _ = answers[i]
    answers[i] = (row, asked, answer([-errno.EBUSY]))  # not what the source predicts
    assert plugin.compare(g, answers, "pvh") == [], "an unobserved row must not be asserted"
    notes = plugin.unobserved(g, answers, "pvh")
    assert len(notes) == len(NEW), notes
    io = next(n for n in notes if n.startswith("domid_io_guest_mfn"))
    assert "not observed" in io and "got -EBUSY" in io and "predicts -ESRCH" in io
    # Observed rows are still asserted under a PVH dom0.
    j = next(i for i, (r, _, _) in enumerate(answers) if r.cls == "valid")
    answers[j] = (answers[j][0], answers[j][1], answer([-errno.EINVAL]))
    assert [m.cls for m in plugin.compare(g, answers, "pvh")] == ["valid"]


def test_hvm_guests_under_a_pvh_dom0_were_never_run_so_nothing_is_asserted() -> None:
    g = guest("hvm", mfn=None)
    answers = answers_as_the_table_says(g, "pvh", ctx_for(g))
    wrong = [(r, a, answer([-errno.EXDEV] * len(a.frames))) for r, a, _ in answers if a.frames]
    assert plugin.compare(g, wrong, "pvh") == []
    assert len(plugin.unobserved(g, wrong, "pvh")) == len(wrong)
    assert "?" in plugin.mode_table(g, answers, "pvh"), "predictions are marked in the side-by-side table"


# ------------------------------------------------------------------ the negative control


@pytest.mark.parametrize("kind", ["pv", "pvh", "hvm"])
def test_every_rows_wrong_expectation_is_caught(kind: str) -> None:
    g = guest(kind, mfn=None if kind != "pv" else 0x5000)
    answers = answers_as_the_table_says(g, "pv", ctx_for(g))
    assert plugin.wrong_expectations_missed(g, answers, "pv") == []
    for row in table.rows_for(kind, "pv"):
        if row.cls in NEW and row.cls in {r.cls for r, _, _ in answers}:
            asked = row.frames(g, ctx_for(g))
            assert plugin.corrupt(row).expected(g, asked) != row.expected(g, asked), row.cls


def test_the_negative_control_fails_when_compare_is_blind_to_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    g = guest("pv")
    answers = answers_as_the_table_says(g, "pv", ctx_for(g))
    real = plugin.compare

    def blind(guest, answers, dom0_mode="pv"):
        return [m for m in real(guest, answers, dom0_mode) if m.cls != "domid_xen_guest_mfn"]

    monkeypatch.setattr(plugin, "compare", blind)
    missed = plugin.wrong_expectations_missed(g, answers, "pv")
    assert [m.split(":")[0] for m in missed] == ["domid_xen_guest_mfn"]
