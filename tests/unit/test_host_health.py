"""After every module (harness/fixtures/hosts.py after_module): a host that died after a
module's last passing check is an incident, judged on its serial tail; Xen problem lines
printed while the module ran are an error (issue 26, route 6)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness import incidents
from harness.fixtures import hosts
from harness.known_issues import KNOWN_ISSUES, load_known_issues

PVH_DOM0_FAULT = ("(XEN) d0v1 Triple fault - invoking HVM shutdown action 1\n"
                  "(XEN) RIP:    e008:[<ffff82d04029a1b0>] svm_asm_do_resume+0x\n(XEN) RFLAGS: 0\n"
                  "(XEN) CONTEXT: hvm guest (d0v1)")


class FakeHost:
    """dom0 at the SSH boundary: `xl list` answers or not, `xl dmesg` says what it says."""

    def __init__(self, answers: bool, dmesg: str = "", serial: str = "") -> None:
        self.name, self.answers, self.text, self.serial = "bookworm-main-0", answers, dmesg, serial
        self.xl = SimpleNamespace(dmesg=lambda: self.text)
        self.remote = SimpleNamespace(run=self._run)
        self.machine = SimpleNamespace(read_serial=lambda: self.serial, alive=lambda: None if answers else 1)

    def _run(self, command, timeout):
        if not self.answers:
            raise OSError("Timeout opening channel")
        return SimpleNamespace(rc=0)


@pytest.fixture
def request_for(monkeypatch):
    monkeypatch.setattr(hosts, "HEALTH_PATIENCE_S", 0.0)
    incidents.clear()
    issues = load_known_issues(KNOWN_ISSUES)
    config = SimpleNamespace(stash={hosts.ISSUES_KEY: issues})
    yield SimpleNamespace(module=SimpleNamespace(__name__="plugins.translation"), config=config,
                          node=SimpleNamespace(nodeid="plugins/translation.py"))
    incidents.clear()
    hosts.FACTS_BY_IMAGE.clear()


def test_a_healthy_host_with_no_new_problem_lines_passes(request_for):
    host = FakeHost(True, "(XEN) Xen WARN at old.c:1\n(XEN) d1v0: upcall vector f3\n")
    seen = hosts.xen_problems(host)
    assert hosts.after_module(request_for, host, "bookworm", seen) is False


def test_a_new_xen_warn_while_the_module_ran_is_an_error(request_for):
    host = FakeHost(True, "(XEN) Xen WARN at old.c:1\n")
    seen = hosts.xen_problems(host)
    host.text += "(XEN) Xen WARN at p2m.c:42\n(d5) BUG: kernel NULL pointer dereference\n"
    with pytest.raises(AssertionError,
                       match=r"1 panic/BUG/WARN/assertion line.*\n\(XEN\) Xen WARN at p2m.c:42$"):
        hosts.after_module(request_for, host, "bookworm", seen)


def test_a_host_dead_after_the_module_without_a_signature_is_an_error_and_an_incident(request_for):
    hosts.FACTS_BY_IMAGE["bookworm"] = SimpleNamespace(xen_version="4.17.5", kernel_release="6.1.0",
                                                       dom0_mode="pv", accel="tcg", qemu_version="7.2")
    host = FakeHost(False, serial="[  812.1] Out of memory: Killed process 211 (sshd)")
    with pytest.raises(hosts.HostDiedAfterModule, match="stopped answering after the checks of "
                                                       "plugins.translation(?s:.*)Out of memory"):
        hosts.after_module(request_for, host, "bookworm", [])
    [incident] = incidents.INCIDENTS
    assert (incident.subject, incident.phase, incident.action, incident.signature) == (
        "host", "between-checks", "failed", None)


def test_a_host_dead_after_the_module_of_a_known_fault_is_replaced_not_an_error(request_for):
    hosts.FACTS_BY_IMAGE["trixie"] = SimpleNamespace(xen_version="4.20.5", kernel_release="6.12.0",
                                                     dom0_mode="pvh", accel="tcg", qemu_version="10.0.13")
    host = FakeHost(False, serial=PVH_DOM0_FAULT)
    assert hosts.after_module(request_for, host, "trixie", []) is True
    [incident] = incidents.INCIDENTS
    assert incident.action == "recreated" and incident.signature.startswith("host-death")
