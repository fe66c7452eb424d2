"""Smoke checks: Xen booted with HVM + HAP, dom0 has privcmd and the Xen daemons,
and the hypervisor log is clean. Each check has a negative control that feeds the
same assertion real data with the fault injected, so the assertion is shown to bite.
"""

from __future__ import annotations

import re

import pytest

from harness.dom0_layout import PRIVCMD_DEVICE
from harness.plugins import check
from harness.xen import XenInfo, dmesg_problems

REQUIRED_CAPS = {"hvm", "hap"}
# name -> command-line pattern (Debian runs the OCaml oxenstored by default)
DAEMONS = {"xenstored": r"/o?xenstored( |$)", "xenconsoled": r"/xenconsoled( |$)"}
PRIVCMD = PRIVCMD_DEVICE
ABSENT = "-nx-absent"  # appended to a real name: what dom0 lacks in the controls


class Swapped:
    """dom0 as an assertion sees it, with one real name swapped for a missing one in
    every command: the fault is injected below the assertion, which runs unchanged."""

    def __init__(self, dom0, real: str, missing: str) -> None:
        self.dom0, self.real, self.missing = dom0, real, missing

    def run(self, command: str):
        return self.dom0.run(command.replace(self.real, self.missing))


def assert_caps(info: XenInfo, required: set[str]) -> None:
    missing = required - info.virt_caps
    assert not missing, f"Xen lacks {sorted(missing)}; virt_caps: {sorted(info.virt_caps)}"


def assert_char_device(dom0, path: str) -> None:
    # testinfra's File has no character-device test; `test -c` is the same check.
    assert dom0.run(f"test -c {path}").rc == 0, f"{path} is not a character device in dom0"


def assert_running(dom0, name: str, pattern: str) -> None:
    out = dom0.run(f"pgrep -f '{pattern}'")
    assert out.rc == 0 and out.stdout.strip(), f"{name} is not running in dom0"


def assert_clean_dmesg(text: str) -> None:
    problems = dmesg_problems(text)
    assert not problems, "xl dmesg shows:\n" + "\n".join(problems)


@check()
def test_xen_has_hvm_and_hap(xl):
    assert_caps(xl.info(), REQUIRED_CAPS)


def control_missing_cap(info: XenInfo, cap: str) -> None:
    """The real `xl info`, through the real assertion, with ``cap`` gone from virt_caps."""
    raw = dict(info.raw, virt_caps=" ".join(sorted(info.virt_caps - {cap})))
    with pytest.raises(AssertionError, match=re.escape(repr(cap))):
        assert_caps(XenInfo(raw), REQUIRED_CAPS)


@check()
def test_negative_control_missing_cap_is_caught(xl):
    control_missing_cap(xl.info(), "hap")


@check()
def test_versions_recorded(host_facts, record_property):
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", host_facts.xen_version), host_facts
    assert re.match(r"\d+\.\d+", host_facts.kernel_release), host_facts
    assert host_facts.dom0_mode in ("pv", "pvh"), host_facts
    for key, value in host_facts.as_dict().items():
        record_property(key, value)


@check()
def test_privcmd_present(dom0):
    assert_char_device(dom0, PRIVCMD)


def control_absent_device(dom0, device: str) -> None:
    """The real device path, through the real assertion, with the device gone."""
    with pytest.raises(AssertionError, match=re.escape(device)):
        assert_char_device(Swapped(dom0, device, device + ABSENT), device)


@check()
def test_negative_control_absent_device_is_caught(dom0):
    control_absent_device(dom0, PRIVCMD)


@check()
@pytest.mark.parametrize("daemon", DAEMONS)
def test_xen_daemon_running(dom0, daemon):
    assert_running(dom0, daemon, DAEMONS[daemon])


def control_absent_daemon(dom0, daemon: str) -> None:
    """The real daemon's pattern, through the real assertion, with the daemon gone."""
    pattern = DAEMONS[daemon]
    gone = Swapped(dom0, pattern, pattern.replace(daemon, daemon + ABSENT))
    with pytest.raises(AssertionError, match=daemon):
        assert_running(gone, daemon, pattern)


@check()
@pytest.mark.parametrize("daemon", DAEMONS)
def test_negative_control_absent_daemon_is_caught(dom0, daemon):
    control_absent_daemon(dom0, daemon)


@check()
def test_xl_dmesg_clean(xl):
    assert_clean_dmesg(xl.dmesg())


INJECTED_BUG = "(XEN) Xen BUG at page_alloc.c:1234"


def control_injected_line(dmesg: str, line: str = INJECTED_BUG) -> None:
    """The real `xl dmesg` with ``line`` appended, through the real assertion: that line
    (not whatever else the log may show) must be among the problems it reports."""
    with pytest.raises(AssertionError) as caught:
        assert_clean_dmesg(dmesg + "\n" + line + "\n")
    assert line in str(caught.value), f"the injected line was not reported:\n{caught.value}"


@check()
def test_negative_control_injected_bug_is_caught(xl):
    control_injected_line(xl.dmesg())
