"""known_issues.yaml: validation, matching by check, guest type, versions and accel,
and the effect inside pytest (a strict xfail)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.config import ConfigError
from harness.known_issues import (
    BOOT_CHECK,
    GUEST_DEATH,
    HOST_DEATH,
    KNOWN_ISSUES,
    decide,
    emulator_fault,
    load_known_issues,
    match,
)

FACTS = SimpleNamespace(xen_version="4.17.5", kernel_release="6.1.0-50-amd64", dom0_mode="pv",
                        accel="tcg")


def write(tmp_path, text):
    path = tmp_path / "known.yaml"
    path.write_text(text)
    return path


def test_repository_file_loads():
    for issue in load_known_issues(KNOWN_ISSUES):
        assert issue.check in (BOOT_CHECK, GUEST_DEATH, HOST_DEATH) or (issue.check.startswith("plugins/")
                                                           and "::test_" in issue.check)
        assert issue.reason and issue.signature is not None and issue.signature.pattern


def test_an_entry_naming_no_check_is_rejected(tmp_path):
    text = "- check: host_death\n  signature: x\n  reason: r\n"
    with pytest.raises(ConfigError, match=r"entry 1 \(host_death\): check: expected "
                                          r"plugins/FILE.py::test_name or one of boot, guest-death, "
                                          r"host-death"):
        load_known_issues(write(tmp_path, text))


def test_an_entry_without_a_signature_is_rejected_naming_it(tmp_path):
    text = """
- check: plugins/a.py::test_a
  signature: no such line
  evidence: [failure, dmesg]
  reason: r
- check: plugins/migration.py::test_save_restore
  guests: [pvh]
  reason: a triple fault
"""
    with pytest.raises(ConfigError, match=r"entry 2 \(plugins/migration.py::test_save_restore\): "
                                          r"`signature` is required"):
        load_known_issues(write(tmp_path, text))


def test_boot_entries_may_still_say_console(tmp_path):
    [issue] = load_known_issues(write(tmp_path, "- check: boot\n  reason: r\n  console: 'guard page'\n"
                                                       "  evidence: [serial]\n"))
    assert issue.seen_in({"serial": "... stack guard page was hit"})
    assert not issue.seen_in({"serial": "all fine"})
    assert not issue.seen_in({"failure": "... stack guard page was hit"})  # not the evidence it reads


def test_decide_needs_versions_and_signature(tmp_path):
    issues = load_known_issues(write(tmp_path, """
- check: plugins/t.py::test_x
  xen: ">=4.17,<4.18"
  signature: 'd\\d+v\\d+ Triple fault'
  evidence: [failure, dmesg]
  reason: triple fault
"""))
    check = "plugins/t.py::test_x"
    hit = decide(issues, check, "pvh", FACTS, {"dmesg": "(XEN) d3v0 Triple fault"})
    assert hit.matched is issues[0] and hit.considered == ()
    miss = decide(issues, check, "pvh", FACTS, {"failure": "memory corrupted after restore"})
    assert miss.matched is None and miss.considered == (issues[0],)
    assert "signature is absent" in miss.note() and "Triple fault" in miss.note()
    newer = SimpleNamespace(**{**vars(FACTS), "xen_version": "4.20.0"})
    assert decide(issues, check, "pvh", newer, {"dmesg": "(XEN) d3v0 Triple fault"}) == decide(
        issues, check, "pvh", newer, {})


def test_emulator_fault_is_a_guest_death_entry_or_the_checks_own(tmp_path):
    issues = load_known_issues(write(tmp_path, """
- check: guest-death
  guests: [pvh]
  signature: 'd\\d+v\\d+ Triple fault'
  evidence: [dmesg]
  reason: TCG nested SVM
- check: plugins/t.py::test_x
  signature: 'Failed to get types for pfn batch'
  evidence: [failure, dmesg]
  reason: log-dirty
"""))
    assert emulator_fault(issues, "pvh", FACTS, {"dmesg": "(XEN) d9v0 Triple fault"}).check == GUEST_DEATH
    assert emulator_fault(issues, "pv", FACTS, {"dmesg": "(XEN) d9v0 Triple fault"}) is None
    assert emulator_fault(issues, "pvh", FACTS, {"failure": "Failed to get types for pfn batch"}) is None
    assert emulator_fault(issues, "pv", FACTS, {"failure": "Failed to get types for pfn batch"},
                          check="plugins/t.py::test_x").check == "plugins/t.py::test_x"
    # a guest-death entry never reads the failure text, only the dead domain's own lines
    assert emulator_fault(issues, "pvh", FACTS, {"failure": "(XEN) d9v0 Triple fault"}) is None


def test_match_by_guest_versions_and_accel(tmp_path):
    issues = load_known_issues(write(tmp_path, """
- check: plugins/migration.py::test_localhost_migration
  guests: [pvh]
  xen: ">=4.17,<4.18"
  kernel: "<6.2"
  accel: tcg
  signature: 'd\\d+v\\d+ Triple fault'
  evidence: [failure, dmesg]
  reason: PVH guest triple-faults
"""))
    check = "plugins/migration.py::test_localhost_migration"
    assert match(issues, check, "pvh", FACTS) is not None
    assert match(issues, check, "pv", FACTS) is None
    assert match(issues, "plugins/migration.py::test_save_restore", "pvh", FACTS) is None
    newer = SimpleNamespace(**{**vars(FACTS), "xen_version": "4.20.0"})
    assert match(issues, check, "pvh", newer) is None
    kvm = SimpleNamespace(**{**vars(FACTS), "accel": "kvm"})
    assert match(issues, check, "pvh", kvm) is None


def test_match_by_qemu_version(tmp_path):
    issues = load_known_issues(write(tmp_path, """
- check: plugins/guests_smoke.py::test_probe_reported_every_page
  guests: [pvh, hvm]
  accel: tcg
  qemu: "<8"
  signature: Triple fault
  evidence: [failure, dmesg]
  reason: QEMU 7.2's nested SVM
"""))
    check = "plugins/guests_smoke.py::test_probe_reported_every_page"
    old_qemu = SimpleNamespace(**{**vars(FACTS), "qemu_version": "7.2"})
    new_qemu = SimpleNamespace(**{**vars(FACTS), "qemu_version": "10.0"})
    assert match(issues, check, "pvh", old_qemu) is not None
    assert match(issues, check, "pvh", new_qemu) is None


@pytest.mark.parametrize("text, message", [
    ("- check: x\n", "`reason` is required"),
    ("- check: x\n  reason: r\n  colour: red\n", "unknown key"),
    ("- check: x\n  reason: r\n  signature: s\n  xen: 'about 4.17'\n", "Invalid specifier"),
    ("- check: x\n  reason: r\n  signature: s\n  console: s\n", "give `signature` only"),
    ("- check: x\n  reason: r\n  signature: '(unclosed'\n", "signature: not a regular expression"),
    ("check: x\n", "expected a list"),
])
def test_bad_entries_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_known_issues(write(tmp_path, text))
