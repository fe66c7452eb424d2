"""Smoke checks: Xen booted with HVM + HAP, dom0 has privcmd and the Xen daemons,
and the hypervisor log is clean. Each check has a negative control that feeds the
same assertion real data with the fault injected, so the assertion is shown to bite.
"""

from __future__ import annotations

import re

import pytest

from harness.plugins import check
from harness.xen import XenInfo, dmesg_problems

REQUIRED_CAPS = {"hvm", "hap"}
# name -> command-line pattern (Debian runs the OCaml oxenstored by default)
DAEMONS = {"xenstored": r"/o?xenstored( |$)", "xenconsoled": r"/xenconsoled( |$)"}


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


@check()
def test_negative_control_missing_cap_is_caught(xl):
    info = xl.info()
    raw = dict(info.raw, virt_caps=" ".join(sorted(info.virt_caps - {"hap"})))
    with pytest.raises(AssertionError, match="hap"):
        assert_caps(XenInfo(raw), REQUIRED_CAPS)


@check()
def test_versions_recorded(host_facts, record_property):
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", host_facts.xen_version), host_facts
    assert re.match(r"\d+\.\d+", host_facts.kernel_release), host_facts
    assert host_facts.dom0_mode in ("pv", "pvh"), host_facts
    for key, value in host_facts.as_dict().items():
        record_property(key, value)


@check()
def test_privcmd_present(dom0):
    assert_char_device(dom0, "/dev/xen/privcmd")


@check()
def test_negative_control_absent_device_is_caught(dom0):
    with pytest.raises(AssertionError):
        assert_char_device(dom0, "/dev/xen/privcmd-absent")


@check()
@pytest.mark.parametrize("daemon", DAEMONS)
def test_xen_daemon_running(dom0, daemon):
    assert_running(dom0, daemon, DAEMONS[daemon])


@check()
def test_negative_control_absent_daemon_is_caught(dom0):
    with pytest.raises(AssertionError):
        assert_running(dom0, "xenstored-absent", "/xenstored-absent( |$)")


@check()
def test_xl_dmesg_clean(xl):
    assert_clean_dmesg(xl.dmesg())


@check()
def test_negative_control_injected_bug_is_caught(xl):
    text = xl.dmesg() + "\n(XEN) Xen BUG at page_alloc.c:1234\n"
    with pytest.raises(AssertionError, match="Xen BUG"):
        assert_clean_dmesg(text)
