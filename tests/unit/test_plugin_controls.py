"""The controls of smoke, guests_smoke, migration, privcmd_mmapbatch and paging: each
catches its fault, and FAILS when the fault is absent or cannot be seen. Only the dom0
side is faked (the agent's answers, as harness.agent.client parses them; what `xl` and
the shell print); the assertions are the plugins' own."""

from __future__ import annotations

import errno
import hashlib
from types import SimpleNamespace

import pytest

from harness.agent.client import MapResult
from harness.guests import ProbePageInfo
from harness.probe_report import ProbePage, expected_page_bytes, format_probe_line, page_digest
from harness.xen import XenInfo
from plugins import _privcmd_table as table
from plugins import guests_smoke, migration, paging, privcmd_mmapbatch, smoke

NONCE = "ab" * 16


def _model_sha(nonce: str, index: int) -> str:
    return hashlib.sha256(expected_page_bytes(nonce, index)).hexdigest()


class MemoryAgent:
    """The agent mapping frames of a guest whose memory is ``memory`` (frame -> sha256); a
    frame not in it answers -EINVAL, as Xen does for a gfn with no page."""

    def __init__(self, memory: dict[int, str]) -> None:
        self.memory = memory

    def map_foreign(self, domid, frames, want="sha256"):
        shas = [self.memory.get(f) for f in frames]
        pages = [{"frame": f, "sha256": s} for f, s in zip(frames, shas, strict=True)]
        return MapResult.from_json({"ok": True, "call": "mmapbatch_v2", "rc": 0, "pages": pages,
                                    "errors": [0 if s else -errno.EINVAL for s in shas]})

    def p2m(self, domid, pfns):
        return {}


def _probe_guest(n: int = 4, kind: str = "hvm") -> SimpleNamespace:
    pages = [ProbePageInfo(i, 0x100 + i, _model_sha(NONCE, i)) for i in range(n)]
    return SimpleNamespace(type=kind, domid=5, pages=pages, report=SimpleNamespace(nonce=NONCE),
                           spec=SimpleNamespace(probe_pages=n, memory_mb=256))


# ------------------------------------------------------------------ smoke


def test_missing_cap_control_catches_hap_gone_from_the_real_xl_info() -> None:
    info = XenInfo({"virt_caps": "pv hvm hap shadow", "xen_major": "4", "xen_minor": "17"})
    smoke.assert_caps(info, smoke.REQUIRED_CAPS)  # the real check passes first
    smoke.control_missing_cap(info, "hap")


def test_missing_cap_control_fails_when_what_it_removes_is_not_required() -> None:
    info = XenInfo({"virt_caps": "pv hvm hap shadow"})
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        smoke.control_missing_cap(info, "shadow")  # no fault for assert_caps


DMESG = "(XEN) Xen version 4.17.5\n(XEN) HVM: HAP supported\n(XEN) Brought up 2 CPUs\n"


def test_injected_bug_control_catches_the_bug_line() -> None:
    smoke.assert_clean_dmesg(DMESG)
    smoke.control_injected_line(DMESG)


def test_injected_bug_control_fails_when_the_injected_line_is_no_fault() -> None:
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        smoke.control_injected_line(DMESG, "(XEN) d1v0: upcall vector f3")


def test_injected_bug_control_fails_when_only_another_problem_is_reported() -> None:
    # A log that already shows a WARN would fail the assertion whatever was injected:
    # the control must see ITS line reported, not any problem.
    dirty = DMESG + "(XEN) Xen WARN at domain.c:42\n"
    with pytest.raises(AssertionError, match="the injected line was not reported"):
        smoke.control_injected_line(dirty, "(XEN) nothing wrong here")


# ------------------------------------------------------------------ guests_smoke


def _console(n: int = 4) -> str:
    pages = [ProbePage(i, 0x100 + i, _model_sha(NONCE, i)) for i in range(n)]
    lines = [format_probe_line({"ev": "hello", "v": 1, "nonce": NONCE, "pages": n, "page_size": 4096,
                                "tick_ms": 0})]
    lines += [format_probe_line({"ev": "page", "i": p.index, "pfn": p.pfn, "sha256": p.sha256})
              for p in pages]
    lines.append(format_probe_line({"ev": "ready", "pages": n, "digest": page_digest(pages)}))
    return "\n".join(lines) + "\n"


def test_corrupted_report_control_rejects_a_reversed_hash() -> None:
    guests_smoke.assert_corruption_rejected(_console(), _model_sha(NONCE, 0))


def test_corrupted_report_control_fails_when_nothing_was_corrupted() -> None:
    with pytest.raises(AssertionError, match="nothing was corrupted"):
        guests_smoke.assert_corruption_rejected(_console(), "0" * 64)


def test_dom0_reading_is_compared_with_the_model_not_the_report() -> None:
    guest = _probe_guest()
    agent = MemoryAgent({p.pfn: _model_sha(NONCE, p.index) for p in guest.pages})
    guests_smoke.test_dom0_reads_the_modelled_bytes_at_every_reported_frame(guest, agent)
    # The report agrees with itself, but dom0 reads other bytes at page 2's frame: caught.
    agent.memory[0x102] = _model_sha(NONCE, 7)
    with pytest.raises(AssertionError, match="1 of 4 reported frames"):
        guests_smoke.test_dom0_reads_the_modelled_bytes_at_every_reported_frame(guest, agent)


def test_probe_page_count_is_checked_against_what_the_guest_was_asked_for() -> None:
    guest = _probe_guest()
    guest.timings = {"ready": 1.0}
    guests_smoke.test_probe_reported_every_page(guest, lambda *a: None)
    guest.spec.probe_pages = 64  # the report (4 pages) is complete by itself, but short
    with pytest.raises(AssertionError, match="reported 4 pages, nxprobe.pages=64"):
        guests_smoke.test_probe_reported_every_page(guest, lambda *a: None)


def test_other_nonce_control_catches_the_wrong_model() -> None:
    guest = _probe_guest()
    agent = MemoryAgent({p.pfn: _model_sha(NONCE, p.index) for p in guest.pages})
    guests_smoke.test_negative_control_model_of_another_nonce_is_caught(guest, agent)


def test_other_nonce_control_fails_when_frames_do_not_map_or_match_any_model() -> None:
    guest = _probe_guest()
    # Frame 0x101 maps nothing: an unmapped frame is no evidence the comparison reads content.
    agent = MemoryAgent({p.pfn: _model_sha(NONCE, p.index) for p in guest.pages if p.index != 1})
    with pytest.raises(AssertionError, match="must map"):
        guests_smoke.test_negative_control_model_of_another_nonce_is_caught(guest, agent)
    # Without the fault: the "other" model is the frames' real content.
    other = guests_smoke.other_nonce(NONCE)
    agent = MemoryAgent({p.pfn: _model_sha(other, p.index) for p in guest.pages})
    with pytest.raises(AssertionError, match="only 0 of 4"):
        guests_smoke.test_negative_control_model_of_another_nonce_is_caught(guest, agent)


# ------------------------------------------------------------------ migration (the plugin is not edited here)


class _MigGuest(SimpleNamespace):
    def check_alive(self):
        return SimpleNamespace(domid=self.domid)

    def resolve_mfns(self, p2m):
        pass


def test_migration_corruption_control_catches_the_one_wrong_expectation() -> None:
    guest = _MigGuest(**vars(_probe_guest()))
    agent = MemoryAgent({p.pfn: p.sha256 for p in guest.pages})
    migration.test_negative_control_corruption_is_detected(guest, agent)
    assert guest.pages[0].sha256 == _model_sha(NONCE, 0), "the control restores the expectation"


def test_migration_corruption_control_fails_without_its_fault_or_with_another() -> None:
    guest = _MigGuest(**vars(_probe_guest()))
    memory = {p.pfn: p.sha256 for p in guest.pages}
    control = migration.test_negative_control_corruption_is_detected
    with pytest.raises(AssertionError):  # page 0 really holds what the "wrong" hash says: no fault
        control(guest, MemoryAgent({**memory, 0x100: "0" * 64}))
    with pytest.raises(AssertionError):  # page 1 is also wrong: not only the injected fault is seen
        control(guest, MemoryAgent({**memory, 0x101: "f" * 64}))


# ------------------------------------------------------------------ privcmd: every dom0 mode x guest type


def _table_guest(kind: str) -> SimpleNamespace:
    # A PV guest's frame is its MFN (ProbePageInfo.gfn), a translated guest's its pfn.
    pages = [ProbePageInfo(i, 0x100 + i, f"{i:064x}", 0x5000 + i if kind == "pv" else None) for i in range(2)]
    return SimpleNamespace(type=kind, domid=7, spec=SimpleNamespace(memory_mb=256), pages=pages)


def _ctx(guest) -> dict:
    if guest.type == "pv":
        return {"p2m": {p: 0x5000 + p for p in range(256 * 256)}, "guest_mfn": (0x5000, 0x5000)}
    return {"guest_mfn": (0xFEFFF, 0x1A2B3C)}


def _as_the_table_says(guest, mode: str) -> list:
    """What a host behaving exactly as the table says answers, content included."""
    ctx = _ctx(guest)
    rows, _ = privcmd_mmapbatch.askable(table.rows_for(guest.type, mode), ctx)
    content = {p.gfn: p.sha256 for p in guest.pages}
    out = []
    for row in rows:
        asked = row.frames(guest, ctx)
        errors = row.expected(guest, asked)
        frames = [SimpleNamespace(frame=f, error=e, sha256=content.get(f) if e == 0 and asked.domid is None
                                  else None) for f, e in zip(asked.frames, errors, strict=True)]
        result = SimpleNamespace(crashed=None, timed_out=False, ok=True, rc=0, errno=None, error=None,
                                 frames=frames)
        if row.rc:
            result.rc, result.errno = -1, -row.rc
        out.append((row, asked, result))
    return out


COMBINATIONS = [(mode, kind) for mode in ("pv", "pvh") for kind in ("pv", "pvh", "hvm")]


@pytest.mark.parametrize(("mode", "kind"), COMBINATIONS)
def test_each_privcmd_control_asserts_something_or_is_skipped_with_the_reason(mode: str, kind: str) -> None:
    guest = _table_guest(kind)
    answers = _as_the_table_says(guest, mode)
    controls = [("valid", privcmd_mmapbatch.assert_corrupted_table_caught),
                ("valid", privcmd_mmapbatch.assert_wrong_content_caught),
                (None, privcmd_mmapbatch.assert_every_row_catches)]
    for cls, control in controls:
        reason = privcmd_mmapbatch.unasserted(kind, mode, answers, cls)
        if (mode, kind) in table.NEVER_RUN:
            assert reason and "does not assert" in reason, (control.__name__, reason)
            continue
        assert reason is None, (control.__name__, reason)
        control(guest, answers, mode)


def test_under_a_pvh_dom0_an_hvm_guests_controls_would_fail_or_assert_nothing() -> None:
    """Why they are skipped there: no row is asserted, so two controls fail by construction
    and the third passes having corrupted nothing."""
    guest = _table_guest("hvm")
    answers = _as_the_table_says(guest, "pvh")
    with pytest.raises(AssertionError):
        privcmd_mmapbatch.assert_corrupted_table_caught(guest, answers, "pvh")
    with pytest.raises(AssertionError):
        privcmd_mmapbatch.assert_wrong_content_caught(guest, answers, "pvh")
    assert privcmd_mmapbatch.wrong_expectations_missed(guest, answers, "pvh") == []  # nothing tried
    with pytest.raises(AssertionError, match="no row is left to corrupt"):
        privcmd_mmapbatch.assert_every_row_catches(guest, answers, "pvh")


@pytest.mark.parametrize("kind", ["pv", "pvh", "hvm"])
def test_corrupted_table_control_fails_when_compare_is_blind_to_the_valid_row(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    guest = _table_guest(kind)
    answers = _as_the_table_says(guest, "pv")
    privcmd_mmapbatch.assert_corrupted_table_caught(guest, answers, "pv")
    real = privcmd_mmapbatch.compare
    monkeypatch.setattr(privcmd_mmapbatch, "compare",
                        lambda g, a, mode="pv": [m for m in real(g, a, mode) if m.cls != "valid"])
    with pytest.raises(AssertionError):
        privcmd_mmapbatch.assert_corrupted_table_caught(guest, answers, "pv")


def test_corrupted_table_control_fails_when_the_valid_row_already_mismatches() -> None:
    guest = _table_guest("pvh")
    answers = _as_the_table_says(guest, "pv")
    i = next(i for i, (r, _, _) in enumerate(answers) if r.cls == "valid")
    row, asked, result = answers[i]
    result.frames[0].error = -errno.EINVAL  # the host already answers what the corruption expects
    with pytest.raises(AssertionError):
        privcmd_mmapbatch.assert_corrupted_table_caught(guest, answers, "pv")


# ------------------------------------------------------------------ paging: skip only when the build lacks it


class _Dom0Shell:
    """dom0's shell as paging.py asks it: which tool paths exist, what they and /boot say."""

    def __init__(self, tools: dict[str, str], outputs: dict[str, str]) -> None:
        self.tools, self.outputs = tools, outputs

    def run(self, command: str, timeout: float | None = None):
        if command.startswith("for f in"):
            name = command.split(" do ")[0].rsplit("/", 1)[-1].strip(" ;")
            return SimpleNamespace(rc=0, stdout=self.tools.get(name, "") + "\n")
        out = next((text for prefix, text in self.outputs.items() if command.startswith(prefix)), "")
        return SimpleNamespace(rc=0 if out else 1, stdout=out)


ENOSYS_LOG = ("paging: detail: xenpaging init\n"
              "paging: detail: watching '/local/domain/3/memory/target-tot_pages'\n"
              "paging: error: Error initialising shared page(38 = Function not implemented)\n")
EOPNOTSUPP_LOG = "paging: error: Error initialising shared page(95 = Operation not supported)\n"
HYPFS = "/usr/lib/xen-4.17/bin/xenhypfs"


def test_the_booted_xens_own_config_decides_first() -> None:
    shell = _Dom0Shell({"xenhypfs": HYPFS}, {f"{HYPFS} cat": "CONFIG_HVM=y\nCONFIG_MEM_PAGING=y\n",
                                             "ls /boot": "/boot/xen-4.17-amd64.config\n",
                                             "cat /boot": "CONFIG_HVM=y\n"})
    build = paging.read_build(shell, "4.17.5")
    assert build.built is True and "/buildinfo/config" in build.source


def test_without_hypfs_the_boot_config_of_that_version_decides() -> None:
    shell = _Dom0Shell({}, {"ls /boot/xen-4.17*": "/boot/xen-4.17-amd64.config\n",
                            "cat /boot/xen-4.17-amd64.config": "CONFIG_HVM=y\nCONFIG_MEM_ACCESS=y\n"})
    assert paging.read_build(shell, "4.17.5") == paging.PagingBuild(False, "/boot/xen-4.17-amd64.config")


def test_no_config_anywhere_is_unknown_not_absent() -> None:
    shell = _Dom0Shell({"xenhypfs": HYPFS}, {f"{HYPFS} cat": "xenhypfs: No such file or directory\n"})
    build = paging.read_build(shell, "4.22.0")
    assert build.built is None and "no build config" in build.source
    assert paging.paging_built_in("xenhypfs: No such file or directory\n") is None


@pytest.mark.parametrize(("built", "log", "skips"), [
    (None, ENOSYS_LOG, True),       # no config; Xen's own answer says the op is compiled out
    (True, ENOSYS_LOG, False),      # the build says it pages: ENOSYS is a regression
    (None, EOPNOTSUPP_LOG, False),  # another refusal is no evidence of a missing feature
    (None, "paging: error: Error initialising xenstore connection(2 = No such file or directory)\n", False),
    (None, "", False),
])
def test_an_exited_xenpaging_is_a_skip_only_when_the_build_lacks_paging(built, log: str, skips: bool) -> None:
    build = paging.PagingBuild(built, "from the test")
    if skips:
        with pytest.raises(pytest.skip.Exception, match="Function not implemented"):
            paging.judge_exit(log, build)
    else:
        with pytest.raises(pytest.fail.Exception, match="xenpaging exited"):
            paging.judge_exit(log, build)


def test_xenpaging_is_found_where_debian_or_an_own_build_installs_it() -> None:
    shell = _Dom0Shell({}, {})
    assert paging.find_tool(shell, "xenpaging", "4.17.5") is None
    shell = _Dom0Shell({"xenpaging": "/usr/local/lib/xen/bin/xenpaging"}, {})
    assert paging.find_tool(shell, "xenpaging", "4.22.0") == "/usr/local/lib/xen/bin/xenpaging"
