"""The plugins' controls: each catches its injected fault, and FAILS when the fault is absent.

A control that passes whatever the data is no control. Each test below feeds a
control's own assertion path real-shaped data twice: with the fault (the control
must pass) and without it (the control must fail). Only the agent and SSH
answers are faked; the assertions are the plugins' own.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from harness.agent.client import MapResult
from harness.guests import ProbePageInfo
from harness.results import CheckResult, markdown
from plugins import no_raw_mfn, paging, privcmd_mmapbatch, smoke, translation
from plugins._privcmd_table import row_for


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _guest(kind: str = "hvm", n: int = 4) -> SimpleNamespace:
    pages = [ProbePageInfo(i, 0x100 + i, _sha(f"page {i}"), 0x5000 + i if kind == "pv" else None)
             for i in range(n)]
    return SimpleNamespace(type=kind, domid=5, spec=SimpleNamespace(memory_mb=256), pages=pages)


def _mapped(frames: list[int], shas: list[str | None], errors: list[int] | None = None) -> MapResult:
    errors = errors if errors is not None else [0] * len(frames)
    pages = [{"frame": f, "sha256": s} for f, s in zip(frames, shas, strict=True)]
    return MapResult.from_json({"ok": True, "call": "mmapbatch_v2", "rc": 0, "errors": errors,
                                "pages": pages})


# ------------------------------------------------------------------ privcmd_mmapbatch


def _valid_answers(guest, content: str | None):
    row = row_for("valid", guest.type, "pv")
    asked = row.frames(guest, {})
    return [(row, asked, _mapped(asked.frames, [content]))]


def test_privcmd_wrong_content_control_catches_the_injected_expectation() -> None:
    guest = _guest()
    privcmd_mmapbatch.assert_wrong_content_caught(guest, _valid_answers(guest, guest.pages[0].sha256))


def test_privcmd_wrong_content_control_fails_when_the_expectation_is_not_wrong() -> None:
    guest = _guest()
    guest.pages[1].sha256 = guest.pages[0].sha256  # the "wrong" expectation is the truth
    with pytest.raises(AssertionError):
        privcmd_mmapbatch.assert_wrong_content_caught(guest, _valid_answers(guest, guest.pages[0].sha256))


def test_privcmd_wrong_content_control_fails_when_no_content_came_back() -> None:
    guest = _guest()
    with pytest.raises(AssertionError):
        privcmd_mmapbatch.assert_wrong_content_caught(guest, _valid_answers(guest, None))


# ------------------------------------------------------------------ translation


def test_translation_shift_control_catches_shifted_frames() -> None:
    guest = _guest()
    frames = [p.gfn for p in guest.pages]
    shifted = frames[1:] + frames[:1]
    shas = [p.sha256 for p in guest.pages]
    translation.assert_shift_caught(guest.pages, _mapped(shifted, shas[1:] + shas[:1]).frames)


def test_translation_shift_control_fails_without_a_shift() -> None:
    guest = _guest()
    frames = [p.gfn for p in guest.pages]
    with pytest.raises(AssertionError, match="only 0 of 4"):
        translation.assert_shift_caught(guest.pages, _mapped(frames, [p.sha256 for p in guest.pages]).frames)


def test_translation_shift_control_fails_when_nothing_maps() -> None:
    guest = _guest()
    frames = [p.gfn for p in guest.pages]
    result = _mapped(frames, [None] * 4, errors=[-22] * 4)
    assert len(translation.differences(guest.pages, result.frames)) == 4  # the old control passed here
    with pytest.raises(AssertionError, match="must map"):
        translation.assert_shift_caught(guest.pages, result.frames)


# ------------------------------------------------------------------ no_raw_mfn: the leak detector


def _path_answers(domid: int, mfn: int, content: str, mapping: set[str]) -> list:
    """One answer per path: ``content`` through the paths in ``mapping``, -EINVAL elsewhere."""
    out = []
    for path, _ in no_raw_mfn.raw_mfn_calls(domid, mfn):
        if path == "/dev/mem":
            out.append({"complete": path in mapping, "sha256": content, "errno_name": "EPERM"})
        else:
            shaped = path in mapping
            out.append(_mapped([mfn], [content if shaped else None], [0 if shaped else -22]))
    return out


def _detect(guest, mapping: set[str]) -> tuple[list[str], list]:
    targets = [(p.pfn, p.mfn, p.sha256) for p in guest.pages[:2]]
    labels, answers = [], []
    for pfn, mfn, sha in targets:
        labels += [(pfn, mfn, sha, path) for path in no_raw_mfn.PATHS]
        answers += _path_answers(guest.domid, mfn, sha, mapping)
    found, _ = no_raw_mfn.detect(labels, answers)
    return found, targets


def test_leak_control_reports_a_pv_guests_mfns_through_every_frame_path() -> None:
    found, targets = _detect(_guest("pv"), set(no_raw_mfn.PV_FRAME_PATHS))
    no_raw_mfn.assert_leak_reported(found, targets)


@pytest.mark.parametrize("broken", no_raw_mfn.PV_FRAME_PATHS)
def test_leak_control_fails_when_a_path_shows_nothing(broken: str) -> None:
    found, targets = _detect(_guest("pv"), set(no_raw_mfn.PV_FRAME_PATHS) - {broken})
    with pytest.raises(AssertionError, match=f"via {broken}"):
        no_raw_mfn.assert_leak_reported(found, targets)


def test_leak_control_fails_when_the_content_differs() -> None:
    guest = _guest("pv")
    targets = [(p.pfn, p.mfn, p.sha256) for p in guest.pages[:1]]
    labels = [(p, m, s, path) for p, m, s in targets for path in no_raw_mfn.PATHS]
    answers = _path_answers(guest.domid, targets[0][1], _sha("another page"), set(no_raw_mfn.PATHS))
    found, _ = no_raw_mfn.detect(labels, answers)
    with pytest.raises(AssertionError):
        no_raw_mfn.assert_leak_reported(found, targets)


# ------------------------------------------------------------------ no_raw_mfn: positive controls per path


def _statuses(mapping: set[str], extent_sha: str = "ab" * 32) -> dict[str, no_raw_mfn.PathStatus]:
    page = _sha("page 0")
    plan = no_raw_mfn.allowed_frames(5, 0x100, page, 0x7000)
    rom = _sha("bios rom")
    answers = []
    for path, _, frame, _ in plan:
        content = {"DOMID_XEN": extent_sha, "DOMID_IO": rom, "/dev/mem": rom}.get(path, page)
        if path == "/dev/mem":
            answers.append({"complete": path in mapping, "sha256": content, "errno_name": "EPERM"})
        else:
            answers.append(_mapped([frame], [content if path in mapping else None],
                                   [0 if path in mapping else -3]))
    return no_raw_mfn.path_statuses(plan, answers)


def test_paths_that_map_nothing_are_reported_and_not_counted() -> None:
    statuses = _statuses(set(no_raw_mfn.PATHS) - set(no_raw_mfn.GATED))
    no_raw_mfn.assert_paths_can_map(statuses, "pv")
    assert {s.path for s in statuses.values() if not s.proves} == set(no_raw_mfn.GATED)
    assert statuses["DOMID_IO"].detail == "content verified"  # it read what /dev/mem read
    line = statuses["DOMID_COW"].line()
    assert "maps nothing" in line and "ESRCH" in line
    facts = SimpleNamespace(xen_version="4.20.4", dom0_mode="pvh", kernel_release="6.12.117")
    text = no_raw_mfn.findings(facts, statuses, "hvm")
    assert "Xen 4.20.4, pvh dom0" in text
    assert ("proves nothing: DOMID_COW (refused: ESRCH), dom0_itself (refused: ESRCH), "
            "restricted_fd_other") in text
    assert "4.17" not in text


MUST = [(mode, path) for mode, paths in no_raw_mfn.MUST_MAP.items() for path in paths]


@pytest.mark.parametrize(("mode", "broken"), MUST)
def test_path_positive_control_fails_when_the_path_maps_nothing(mode: str, broken: str) -> None:
    statuses = _statuses(set(no_raw_mfn.PATHS) - set(no_raw_mfn.GATED) - {broken})
    with pytest.raises(AssertionError, match=broken):
        no_raw_mfn.assert_paths_can_map(statuses, mode)


def test_an_ioctl_refused_whole_names_its_errno() -> None:
    answer = MapResult.from_json({"ok": True, "call": "restrict_then_map", "rc": -1, "errno_name": "EPERM",
                                  "pages": [{"frame": 0x100, "sha256": None}]})
    assert no_raw_mfn.refusal(answer) == "EPERM"


def test_domid_io_content_must_match_dev_mem() -> None:
    page = _sha("page 0")
    plan = no_raw_mfn.allowed_frames(5, 0x100, page, 0x7000)
    answers = [{"complete": True, "sha256": _sha("rom")} if p == "/dev/mem"
               else _mapped([f], [_sha("other") if p == "DOMID_IO" else page]) for p, _, f, _ in plan]
    assert not no_raw_mfn.path_statuses(plan, answers)["DOMID_IO"].maps


def test_m2p_true_mfn_control() -> None:
    pairs = [(0xfeffc, 0x3a1b2)]
    no_raw_mfn.assert_m2p_has_true_mfns(pairs, {0xfeffc: [0x1111, 0x3a1b2]})
    with pytest.raises(AssertionError, match="mfn 0x3a1b2"):  # any candidate at all is not enough
        no_raw_mfn.assert_m2p_has_true_mfns(pairs, {0xfeffc: [0x1111]})
    with pytest.raises(AssertionError, match="no \\(gfn, MFN\\) pair"):
        no_raw_mfn.assert_m2p_has_true_mfns([], {0xfeffc: [0x1111]})


def test_grant_dump_gives_gfn_mfn_pairs_of_that_domain_only() -> None:
    dump = "\n".join([
        "(XEN) grant-table for remote d1 (v1)",
        "(XEN) [0x000]      0 0x0042a1 0x00000001          0 0x0000aa 0x19",
        "(XEN) grant-table for remote d3 (v1)",
        "(XEN) [0x000]      0 0x03a1b2 0x00000001          0 0x0feffc 0x19",
    ])
    assert no_raw_mfn.grant_mfns(dump, 3) == [(0xfeffc, 0x3a1b2)]


# ------------------------------------------------------------------ smoke


class _Dom0:
    """dom0 as testinfra answers: ``test -c`` / ``pgrep -f`` succeed for the names it has."""

    def __init__(self, has: set[str]) -> None:
        self.has = has

    def run(self, command: str):
        ok = any(name in command.split("'")[1::2] + command.split()[2:] for name in self.has)
        return SimpleNamespace(rc=0 if ok else 1, stdout="1234\n" if ok else "")


def test_absent_device_control_catches_the_real_device_gone() -> None:
    smoke.control_absent_device(_Dom0({smoke.PRIVCMD}), smoke.PRIVCMD)


def test_absent_device_control_fails_when_the_device_does_not_go() -> None:
    present = _Dom0({smoke.PRIVCMD, smoke.PRIVCMD + smoke.ABSENT})  # the fault is not injected
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        smoke.control_absent_device(present, smoke.PRIVCMD)


@pytest.mark.parametrize("daemon", smoke.DAEMONS)
def test_absent_daemon_control_catches_the_real_daemon_gone(daemon: str) -> None:
    pattern = smoke.DAEMONS[daemon]
    smoke.assert_running(_Dom0({pattern}), daemon, pattern)  # the real check passes first
    smoke.control_absent_daemon(_Dom0({pattern}), daemon)


@pytest.mark.parametrize("daemon", smoke.DAEMONS)
def test_absent_daemon_control_fails_when_the_daemon_does_not_go(daemon: str) -> None:
    pattern = smoke.DAEMONS[daemon]
    everything = _Dom0({pattern, pattern.replace(daemon, daemon + smoke.ABSENT)})
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        smoke.control_absent_daemon(everything, daemon)


# ------------------------------------------------------------------ findings reach the results


def test_a_checks_finding_is_in_the_summary() -> None:
    r = CheckResult("plugins/no_raw_mfn.py::test_m2p[img=trixie-guest=hvm]", "no_raw_mfn", "test_m2p",
                    "trixie", "hvm", "pvh", "4.20.4", "6.12.117", "tcg", "passed", 3.0,
                    finding="Xen 4.20.4, pvh dom0: paths that map ...")
    text = markdown([r])
    assert "### Findings" in text and "Xen 4.20.4, pvh dom0" in text


# ---------------------------------------------------------------------- paging


def test_paging_gate_tells_built_without_from_built_with_and_unknown() -> None:
    """The build-config gate of plugins/paging.py (it was a plain test in the plugin, which
    the run's summary did not count: every test in plugins/ is now a check)."""
    assert paging.paging_built_in("CONFIG_HVM=y\nCONFIG_MEM_ACCESS=y\n") is False
    assert paging.paging_built_in("CONFIG_HVM=y\nCONFIG_MEM_PAGING=y\n") is True
    assert paging.paging_built_in("") is None
