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

from harness.agent.client import M2PResult, MapResult
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
    # /dev/mem maps its control frame, yet Linux, not Xen, refuses RAM: never counted either.
    assert {s.path for s in statuses.values() if not s.proves} == set(no_raw_mfn.GATED) | {"/dev/mem"}
    assert statuses["/dev/mem"].maps and "STRICT_DEVMEM" in statuses["/dev/mem"].line()
    assert statuses["DOMID_IO"].detail == "content verified"  # it read what /dev/mem read
    line = statuses["DOMID_COW"].line()
    assert "maps nothing" in line and "ESRCH" in line
    facts = SimpleNamespace(xen_version="4.20.4", dom0_mode="pvh", kernel_release="6.12.117")
    text = no_raw_mfn.findings(facts, statuses, "hvm")
    assert "Xen 4.20.4, pvh dom0" in text
    assert ("proves nothing about Xen here: DOMID_COW (refused: ESRCH), dom0_itself (refused: ESRCH), "
            "/dev/mem (Linux decides, not Xen), restricted_fd_other") in text
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


# ------------------------------------------------------------------ no_raw_mfn: the M2P proof's pages


def _m2p(candidates: dict[int, list[int]], *, complete: bool = True, truncated: tuple[int, ...] = (),
         map_errors: int = 0) -> M2PResult:
    """An m2p answer as nxagent's run_m2p() shapes it."""
    return M2PResult.from_json({
        "ok": True, "call": "m2p", "gfns": list(candidates), "max_candidates": 64,
        "hypercall": {"rc": 0, "errno": None, "errno_name": None, "cmd": "XENMEM_machphys_mfn_list"},
        "map": {"call": "mmapbatch_v2", "rc": 0, "frames": 512, "errors_nonzero": map_errors},
        "extents": [0x7000], "candidates": {str(g): m for g, m in candidates.items()},
        "truncated": list(truncated), "complete": complete,
        "scan": {"entries": 262144 if complete else 131072, "expected_entries": 262144}})


PAIRS = [(0xFEFFC, 0x3A1B2), (0xFEFFB, 0x3A1B3)]  # what Xen's 'g' dump printed
CANDIDATES = {0xFEFFC: [0x1111, 0x3A1B2], 0xFEFFB: [0x2222, 0x3A1B3]}


def test_m2p_answer_must_be_complete_and_untruncated_for_the_attacked_gfns() -> None:
    gfns = [g for g, _ in PAIRS]
    no_raw_mfn.assert_m2p_answer_complete(_m2p(CANDIDATES), gfns)
    with pytest.raises(AssertionError, match="read 131072 of 262144"):
        no_raw_mfn.assert_m2p_answer_complete(_m2p(CANDIDATES, complete=False), gfns)
    with pytest.raises(AssertionError, match="0xfeffb: the list was cut short"):
        no_raw_mfn.assert_m2p_answer_complete(_m2p(CANDIDATES, truncated=(0xFEFFB,)), gfns)
    # A truncated gfn the check does not attack does not matter.
    no_raw_mfn.assert_m2p_answer_complete(_m2p(CANDIDATES, truncated=(0x100,)), gfns)
    with pytest.raises(AssertionError, match="positive control failed"):
        no_raw_mfn.assert_m2p_answer_complete(_m2p(CANDIDATES, map_errors=3), gfns)


def test_the_attacked_pages_are_exactly_those_whose_true_mfn_is_proven() -> None:
    contents = {0xFEFFC: _sha("xenstore ring"), 0xFEFFB: _sha("another granted page")}
    targets, left = no_raw_mfn.proven_targets(PAIRS, CANDIDATES, contents)
    assert left == []
    assert {(g, m) for g, m, _ in targets} == {(g, m) for g, ms in CANDIDATES.items() for m in ms}
    assert {(g, m) for g, m in PAIRS} <= {(g, m) for g, m, _ in targets}, "each true MFN is attacked"
    assert all(sha == contents[g] for g, _, sha in targets)


def test_a_page_the_proof_does_not_cover_or_that_is_all_zeros_is_left_out_saying_why() -> None:
    contents = {0xFEFFC: no_raw_mfn.ZERO_PAGE_SHA, 0xFEFFB: _sha("another granted page")}
    targets, left = no_raw_mfn.proven_targets(PAIRS, {0xFEFFC: CANDIDATES[0xFEFFC], 0xFEFFB: [0x2222]},
                                              contents)
    assert targets == []
    assert any("0xfeffc: all zeros" in why for why in left)
    assert any("0xfeffb: Xen's mfn 0x3a1b3 is not among its M2P candidates" in why for why in left)


def _pv_guest_and_m2p(**kwargs):
    guest = _guest("pv")
    return guest, _m2p({p.pfn: [0x9000 + p.index, p.mfn] for p in guest.pages}, **kwargs)


def test_m2p_pv_positive_control_passes_on_the_p2ms_mfns_and_fails_without_them() -> None:
    guest, m2p = _pv_guest_and_m2p()
    no_raw_mfn.test_positive_control_m2p_finds_pv_mfns(guest, m2p)
    with pytest.raises(AssertionError, match="lack the p2m MFN for pages \\[2\\]"):
        guest.pages[2].mfn = 0x6666  # the lookup did not find the page's real MFN
        no_raw_mfn.test_positive_control_m2p_finds_pv_mfns(guest, m2p)
    guest, m2p = _pv_guest_and_m2p(truncated=(0x101,))
    with pytest.raises(AssertionError, match="cut short"):
        no_raw_mfn.test_positive_control_m2p_finds_pv_mfns(guest, m2p)
    guest, m2p = _pv_guest_and_m2p(complete=False)
    with pytest.raises(AssertionError, match="unread stretch"):
        no_raw_mfn.test_positive_control_m2p_finds_pv_mfns(guest, m2p)


class _RestrictingAgent:
    """privcmd behind IOCTL_PRIVCMD_RESTRICT as the agent reports it: restricted to the
    guest, its frames map; restricted elsewhere, the ioctl fails whole with EPERM (or, with
    ``restricts`` false, the restriction is ignored)."""

    def __init__(self, guest, restricts: bool = True, maps: bool = True) -> None:
        self.guest, self.restricts, self.maps = guest, restricts, maps

    def restrict_then_map(self, domid, frames, restrict_domid):
        pages = {p.gfn: p.sha256 for p in self.guest.pages}
        if restrict_domid != domid and self.restricts:
            return MapResult.from_json({"ok": True, "call": "restrict_then_map", "rc": -1, "errno": 1,
                                        "errno_name": "EPERM", "pages": [{"frame": f} for f in frames]})
        shas = [pages[f] if self.maps else None for f in frames]
        return _mapped(frames, shas, [0 if self.maps else -22] * len(frames))


def test_restricted_fd_positive_control_passes_only_where_restriction_works_both_ways() -> None:
    guest = _guest("hvm")
    no_raw_mfn.test_positive_control_restricted_fd_maps_its_own_domain(guest, _RestrictingAgent(guest))
    with pytest.raises(AssertionError, match="refused whole with EPERM"):  # restricted elsewhere, it maps
        no_raw_mfn.test_positive_control_restricted_fd_maps_its_own_domain(
            guest, _RestrictingAgent(guest, restricts=False))
    with pytest.raises(AssertionError, match="must map its probe page"):  # restricted to the guest: nothing
        no_raw_mfn.test_positive_control_restricted_fd_maps_its_own_domain(
            guest, _RestrictingAgent(guest, maps=False))


# ------------------------------------------------------------------ no_raw_mfn: who refused /dev/mem

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009ffff : System RAM
000a0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-3fffffff : System RAM
  01000000-01ffffff : Kernel code
fee00000-fee00fff : Local APIC
100000000-13fffffff : System RAM
"""


def test_devmem_refusals_name_the_linux_rule_and_never_xen() -> None:
    ram = no_raw_mfn.system_ram(IOMEM)
    assert ram == [(0x1000, 0x9FFFF), (0x100000, 0x3FFFFFFF), (0x100000000, 0x13FFFFFFF)]
    strict = no_raw_mfn.devmem_layer(0x3A1B2000, {"errno_name": "EPERM"}, ram)
    assert "STRICT_DEVMEM" in strict and "System RAM 0x100000-0x3fffffff" in strict
    assert "Xen not asked" in strict
    beyond = no_raw_mfn.devmem_layer(0x200000000, {"errno_name": "EFAULT"}, ram)
    assert "valid_phys_addr_range" in beyond and "0x13fffffff" in beyond
    inside = no_raw_mfn.devmem_layer(0x3A1B2000, {"errno_name": "EFAULT"}, ram)
    assert "layer is not established" in inside and "inside dom0's System RAM" in inside
    read = no_raw_mfn.devmem_layer(0xF0000, {"complete": True, "sha256": "ab" * 32}, ram)
    assert "read, sha abababababab" in read and "not the MFN" in read
    lines = no_raw_mfn.devmem_refusals([(0x3A1B2, {"errno_name": "EPERM"})], IOMEM)
    assert lines == [strict]
