"""plugins/xen_tools_tests.py against a local shell standing in for dom0's SSH: discovery,
the timeout, the verdict with the program's own output, domain clean-up, xenstore
timings; and known issues decided by their signature once a check has run."""

from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import pytest

from harness.known_issues import KNOWN_ISSUES, load_known_issues, match
from harness.remote import CommandResult
from harness.xen import Domain
from plugins import xen_tools_tests as tt

pytest_plugins = ["pytester"]


class ShellRemote:
    """Runs each command in a local bash, as dom0's SSH would; `xl list` (the health
    check) answers ``xl_rc``."""

    def __init__(self, xl_rc: int = 0) -> None:
        self.commands: list[str] = []
        self.xl_rc = xl_rc

    def run(self, command, timeout=None, **_):
        self.commands.append(command)
        if command.startswith("xl list"):
            return CommandResult(command, self.xl_rc, "", "", "sh", 0.1)
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout)
        return CommandResult(command, done.returncode, done.stdout, done.stderr, "sh",
                             time.monotonic() - started)


class FakeXl:
    """`xl list` answers from a domain table; the domains in ``appear`` show up from the
    ``appear_at``-th list on (the program ran in between); `xl destroy` drops a domain."""

    def __init__(self, before: list[Domain], appear: list[Domain] = (), appear_at: int = 2) -> None:
        self.domains, self.appear, self.appear_at = list(before), list(appear), appear_at
        self.remote, self.destroyed, self.calls = self, [], 0

    def list(self):
        self.calls += 1
        if self.calls == self.appear_at:
            self.domains += self.appear
        return list(self.domains)

    def run(self, command, timeout=None, **_):
        domid = int(command.split()[-1])
        self.destroyed.append(domid)
        self.domains = [d for d in self.domains if d.domid != domid]
        return CommandResult(command, 0, "", "", "sh", 0.1)


def dom(name: str, domid: int) -> Domain:
    return Domain(name, domid, 256, 1, "-b----")


def script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_check_names_select_one_program_each():
    assert tt.check_name("test-resource") == "test_resource"
    assert tt.check_name("test-cpu-policy") == "test_cpu_policy"
    assert tt.check_name("test_vpci") == "test_vpci"
    names = [tt.check_name(p) for p in tt.KNOWN_PROGRAMS]
    assert len(set(names)) == len(names)
    for name in names:  # each a collected check of its own, selectable with -k
        assert callable(getattr(tt, name)) and getattr(tt, name).__name__ == name
    assert [n for n in names if "test_resource" in n] == ["test_resource"]


def test_discover_finds_what_the_host_installed_first_dir_wins(tmp_path):
    new, old = tmp_path / "xen-4.21" / "tests", tmp_path / "xen-4.21" / "bin"
    for d in (new, old):
        d.mkdir(parents=True)
    script(new, "test-xenstore", "true\n")
    script(new, "test-pdx-new", "true\n")  # in */tests any executable is a test
    script(old, "test-xenstore", "true\n")
    script(old, "test-tsx", "true\n")
    script(old, "xl", "true\n")  # not a test in */bin
    (old / "test-notexec").write_text("")
    dirs = tt.search_dirs("4.21.0", (str(tmp_path / "xen-{mm}" / "tests"), str(tmp_path / "xen-{mm}" / "bin"),
                                      str(tmp_path / "absent")))
    found = tt.discover(ShellRemote(), dirs)
    assert found == {"test-xenstore": f"{new}/test-xenstore", "test-pdx-new": f"{new}/test-pdx-new",
                     "test-tsx": f"{old}/test-tsx"}
    assert tt.unknown_programs(found) == [f"{new}/test-pdx-new"]


def test_a_failing_program_fails_its_case_with_its_own_output(tmp_path):
    path = script(tmp_path, "fails", "echo 'NXNEG: broken'\necho 'on stderr' >&2\nexit 3\n")
    xl = FakeXl([dom("Domain-0", 0)])
    case = tt.run_case(ShellRemote(), xl, "fails", path, 30)
    assert case.run.rc == 3 and not case.run.timed_out
    with pytest.raises(AssertionError, match=r"fails exited 3 after [\d.]+ s") as caught:
        tt.judge(case)
    assert "NXNEG: broken" in str(caught.value) and "on stderr" in str(caught.value)


def test_a_hung_program_is_killed_at_its_timeout_with_its_children(tmp_path):
    marker = f"sleep 6{time.monotonic_ns() % 1000:03d}"  # pgrep with [x] below: not itself
    path = script(tmp_path, "hangs", f"echo 'NXNEG: started'\n{marker}\necho never\n")
    started = time.monotonic()
    case = tt.run_case(ShellRemote(), FakeXl([dom("Domain-0", 0)]), "hangs", path, 1)
    assert time.monotonic() - started < 20
    assert case.run.timed_out and case.run.rc == 124
    with pytest.raises(AssertionError, match="did not finish within 1 s and was killed") as caught:
        tt.judge(case)
    assert "NXNEG: started" in str(caught.value) and "never" not in str(caught.value)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1


def test_a_passing_program_passes(tmp_path):
    path = script(tmp_path, "passes", "echo 'Done: all ok'\n")
    case = tt.run_case(ShellRemote(), FakeXl([dom("Domain-0", 0)]), "passes", path, 30)
    tt.judge(case)
    assert case.run.output() == "--- stdout ---\nDone: all ok\n"
    sick = tt.run_case(ShellRemote(xl_rc=1), FakeXl([dom("Domain-0", 0)]), "passes", path, 30)
    with pytest.raises(AssertionError, match="dom0's `xl list` failed after passes"):
        tt.judge(sick)


def test_new_domains_are_destroyed_and_shared_guests_checked():
    before = [dom("Domain-0", 0), dom("nx-shared-pv", 3), dom("nx-shared-hvm", 4)]
    xl = FakeXl(before, appear=[dom("test-resource", 7), dom("nx-other", 8)], appear_at=1)
    xl.domains = [d for d in xl.domains if d.name != "nx-shared-hvm"]  # a shared guest died meanwhile
    report = tt.clean_up_domains(xl, before, settle_s=0)
    assert xl.destroyed == [7] and report.destroyed == ["test-resource (7)"]  # nx-* is never destroyed
    assert report.left == [] and report.shared_changed == ["nx-shared-hvm: domid 4 -> gone"]


def test_domains_are_destroyed_when_the_run_itself_raises():
    class Broken(ShellRemote):
        def run(self, command, timeout=None, **_):
            raise RuntimeError("transport lost")

    xl = FakeXl([dom("Domain-0", 0)], appear=[dom("test-resource", 9)])
    with pytest.raises(RuntimeError, match="transport lost"):
        tt.run_case(Broken(), xl, "test-resource", "/x/test-resource", 30)
    assert xl.destroyed == [9]


def test_xenstore_timings_become_records():
    out = ("read 1    : 1183230 ns\nta rmw    : 21830566 ns\n"
           "write 2000: avg: 2000 ns (1000 ns .. 3000 ns)\nta err    : failed (ret = 2, stage run)\n")
    assert tt.xenstore_timings(out) == {"read 1": 1183230, "ta rmw": 21830566, "write 2000": 2000}
    facts = SimpleNamespace(xen_version="4.17.5", kernel_release="6.1.0", dom0_mode="pv", accel="tcg")
    run = tt.ProgramRun("test-xenstore", "/p/test-xenstore", 0, out, "", 5.0, 300)
    records = tt.measurements(run, facts, "bookworm")
    rmw = next(r for r in records if r.workload == "ta rmw")
    assert rmw.kind == "xenstore" and rmw.total_s == pytest.approx(0.021830566) and rmw.image == "bookworm"
    from harness.report import summary_rows

    row = next(r for r in summary_rows(records) if r[4] == "ta rmw")
    assert row[1] == "xenstore" and row[7] == "0.022 [0.022-0.022]"  # milliseconds stay readable
    failed = tt.ProgramRun("test-xenstore", "/p/test-xenstore", 3, out, "", 5.0, 300)
    assert tt.measurements(failed, facts, "bookworm") == []


TCG = SimpleNamespace(xen_version="4.17.5", kernel_release="6.1.0-50-amd64", dom0_mode="pv", accel="tcg",
                    qemu_version="7.2")


def test_tsx_known_issue_is_scoped_to_tcg_and_has_its_signature():
    issues = load_known_issues(KNOWN_ISSUES)
    issue = match(issues, "plugins/xen_tools_tests.py::test_tsx", None, TCG)
    assert issue is not None and issue.signature is not None
    assert issue.seen_in({"failure": "--- stdout ---\nHost reports no RTM, but appears available\n"})
    assert not issue.seen_in({"failure": "test-tsx exited 139"})
    kvm = SimpleNamespace(**{**vars(TCG), "accel": "kvm"})
    assert match(issues, "plugins/xen_tools_tests.py::test_tsx", None, kvm) is None
    assert match(issues, "plugins/xen_tools_tests.py::test_resource", None, TCG) is None
    qemu10 = SimpleNamespace(**{**vars(TCG), "qemu_version": "10.0"})  # XBEGIN raises #UD there
    assert match(issues, "plugins/xen_tools_tests.py::test_tsx", None, qemu10) is None


def test_programs_installed_where_the_plugin_does_not_look_are_found(tmp_path):
    looked = tmp_path / "lib" / "xen-4.21" / "bin"
    other = tmp_path / "libexec" / "xen-4.21" / "tests"
    for d in (looked, other):
        d.mkdir(parents=True)
    script(looked, "test-tsx", "true\n")
    script(other, "test-new", "true\n")
    script(tmp_path / "libexec", "test-other", "true\n")  # not under a *xen* directory
    assert tt.stray_programs(ShellRemote(), [str(looked)], root=str(tmp_path)) == [f"{other}/test-new"]


def test_only_the_shared_guests_alive_when_a_program_starts_are_watched():
    """A shared guest that died before the program is not the program's death: it is
    not watched (the next check that takes it creates it again); live ones are."""
    from harness.guests import Guest, GuestSpec
    from harness.verdict import WATCHED_KEY

    xl = SimpleNamespace(list=lambda: [dom("nx-shared-pv", 3)])
    alive = Guest(GuestSpec(type="pv", name="nx-shared-pv"), xl, domid=3)
    dead = Guest(GuestSpec(type="pvh", name="nx-shared-pvh"), xl, domid=4)
    host = SimpleNamespace(xl=xl, guest_pool=SimpleNamespace(guests={"pv": alive, "pvh": dead}))
    node = SimpleNamespace(stash=pytest.Stash())
    tt.watch_shared_guests(SimpleNamespace(node=node), host)
    assert node.stash[WATCHED_KEY] == [alive]
