"""known_issues.yaml: validation, matching by check, guest type, versions and accel,
and the effect inside pytest (a strict xfail)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.config import ConfigError
from harness.known_issues import BOOT_CHECK, KNOWN_ISSUES, load_known_issues, match

FACTS = SimpleNamespace(xen_version="4.17.5", kernel_release="6.1.0-50-amd64", dom0_mode="pv",
                        accel="tcg")


def write(tmp_path, text):
    path = tmp_path / "known.yaml"
    path.write_text(text)
    return path


def test_repository_file_loads():
    for issue in load_known_issues(KNOWN_ISSUES):
        assert issue.check == BOOT_CHECK or (issue.check.startswith("plugins/") and "::test_" in issue.check)
        assert issue.reason


def test_match_by_guest_versions_and_accel(tmp_path):
    issues = load_known_issues(write(tmp_path, """
- check: plugins/migration.py::test_localhost_migration
  guests: [pvh]
  xen: ">=4.17,<4.18"
  kernel: "<6.2"
  accel: tcg
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
    ("- check: x\n  reason: r\n  xen: 'about 4.17'\n", "Invalid specifier"),
    ("check: x\n", "expected a list"),
])
def test_bad_entries_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_known_issues(write(tmp_path, text))
