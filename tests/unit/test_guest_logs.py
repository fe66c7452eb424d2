"""A failed guest operation's evidence (harness/guest_logs.py, harness/xen.py's guest_logs,
plugins/migration.py and translation.py) against a local shell standing in for dom0's SSH,
with what Debian testing gave: Xen 4.20's libxl restoring an HVM guest under QEMU 11.1."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.guest_logs import DMESG_TITLE, Side, check_dir, log_evidence
from harness.metrics import MetricsSink
from harness.remote import CommandResult, RemoteError
from harness.verdict import EVIDENCE_KEY, SHOWN_KEY
from harness.xen import XEN_LOG_DIR, Xl, guest_log_paths, guest_logs
from plugins import migration, translation

NAME = "nx-mig-hvm-256"
# `xl -vvv restore` on Debian testing (Xen 4.20.4, qemu-system-xen 1:11.1.2+ds-3), timestamped
# as plugins/migration.py runs it: the domain it created is d6; the saved one was d5.
RESTORE_LOG = """\
1796539413.804961 libxl: debug: libxl_create.c:1339:initiate_domain_create: Domain 6:restoring, not running
1796539415.112233 libxl: error: libxl_dm.c:3102:device_model_spawn_outcome: Domain 6:domain 6 device model: \
spawn failed (rc=-3)
1796539415.112300 libxl: error: libxl_create.c:1833:domcreate_devmodel_started: Domain 6:device model \
did not start: -3
1796539415.200000 libxl: error: libxl_domain.c:1182:libxl__destroy_domid: Domain 6:Non-existant domain
1796539415.300000 Domain creation failed
"""
FD_LINE = ("xen-qemu-system-i386: -incoming fd:15: fd: migration to a file is not supported. "
           "Use file: instead.")
# the device model's log: older lines first (more than the 15 the failure message carries)
QEMU_DM_LOG = "".join(f"qemu-dm startup line {i}\n" for i in range(20)) + FD_LINE + "\n"
XL_LOG = ("Waiting for domain nx-mig-hvm-256 (domid 6) to die [pid 2231]\n"
          "libxl: error: libxl_dm.c:3102:device_model_spawn_outcome: Domain 6:domain 6 device model: "
          "spawn failed (rc=-3)\n")
# The host's `xl dmesg`: another domain's lines (d3, d4) beside the migrated guest's (d5, d6).
DMESG = """\
(XEN) d3v0: upcall vector f3
(XEN) d5v0 save: HVM context saved
(XEN) d4v0 Triple fault - invoking HVM shutdown action 1
(XEN) d6v0 restore: HVM context not loaded
(XEN) HVM d4v0 save: CPU
"""


class Dom0:
    """dom0's SSH as a local bash: /var/log/xen is a directory of the test's; `xl dmesg`
    answers DMESG; every command is kept."""

    def __init__(self, logs: Path, dmesg: str = DMESG, label: str = "nx-l1") -> None:
        self.logs, self.dmesg, self.label, self.commands = logs, dmesg, label, []

    def run(self, command, timeout=None, **_):
        self.commands.append(command)
        if command.startswith("xl dmesg"):
            return CommandResult(command, 0, self.dmesg, "", self.label, 0.1)
        local = command.replace(XEN_LOG_DIR, str(self.logs))
        done = subprocess.run(["bash", "-c", local], capture_output=True, text=True, timeout=timeout)
        return CommandResult(command, done.returncode, done.stdout, done.stderr, self.label, 0.1)

    def check_output(self, command, **kwargs):
        return self.run(command, **kwargs).stdout


class Lost(Dom0):
    def run(self, command, timeout=None, **_):
        raise RemoteError("[nx-l1] transport failed: dom0 stopped answering")


def logs_of_testing(tmp_path: Path, incoming: bool = False) -> Path:
    """/var/log/xen after the failed restore (or, ``incoming``, the failed receive)."""
    logs = tmp_path / "var-log-xen"
    logs.mkdir()
    suffix = "--incoming" if incoming else ""
    (logs / f"qemu-dm-{NAME}{suffix}.log").write_text(QEMU_DM_LOG)
    (logs / f"xl-{NAME}.log").write_text(XL_LOG)
    (logs / "qemu-dm-nx-mig-hvm-2560.log").write_text("another guest's device model\n")
    return logs


def node_for(nodeid: str = "plugins/migration.py::test_save_restore[hvm-256M-idle]"):
    return SimpleNamespace(nodeid=nodeid, stash=pytest.Stash())


def evidence_of(node) -> dict[str, list[str]]:
    return node.stash.get(EVIDENCE_KEY, {})


# ------------------------------------------------------------------ harness/xen.py


def test_guest_logs_reads_the_guests_own_logs_in_one_command(tmp_path):
    dom0 = Dom0(logs_of_testing(tmp_path, incoming=True))
    found = Xl(dom0).guest_logs(NAME)
    assert len(dom0.commands) == 1
    assert [(g.kind, g.name) for g in found] == [("toolstack", f"xl-{NAME}.log"),
                                                 ("device-model", f"qemu-dm-{NAME}--incoming.log")]
    assert found[1].text == QEMU_DM_LOG and found[0].text == XL_LOG
    assert found[1].tail(1) == FD_LINE
    # another guest whose name starts with this one's is not this guest
    assert f"{XEN_LOG_DIR}/qemu-dm-{NAME}.log" in guest_log_paths([NAME])
    assert not any("2560" in g.path for g in found)


def test_guest_logs_of_a_guest_without_any(tmp_path):
    (tmp_path / "empty").mkdir()
    assert guest_logs(Dom0(tmp_path / "empty"), [NAME]) == []


# ------------------------------------------------------------------ harness/guest_logs.py


def test_log_evidence_keeps_hands_over_and_says_the_device_models_last_lines(tmp_path):
    node = node_for()
    dest = check_dir(tmp_path / "artifacts", node.nodeid)
    said = log_evidence(node, [Side("nx-l1", Dom0(logs_of_testing(tmp_path)))], [NAME], dest)
    # evidence by kind, each the guest's own log, for the known-issue matcher
    assert evidence_of(node) == {"device-model": [QEMU_DM_LOG], "toolstack": [XL_LOG]}
    # the artifacts, beside the check's serial log and xl dmesg
    assert (dest / f"nx-l1-qemu-dm-{NAME}.log").read_text() == QEMU_DM_LOG
    assert (dest / f"nx-l1-xl-{NAME}.log").read_text() == XL_LOG
    assert dest.parent.name == "failures"
    # the failure message: the device model's own last 15 lines, and where the rest is
    assert FD_LINE in said and "startup line 6\n" in said and "startup line 5\n" not in said
    assert f"qemu-dm-{NAME}.log on nx-l1" in said and str(dest) in said


def test_log_evidence_from_a_dom0_that_does_not_answer_says_so_and_raises_nothing(tmp_path):
    node = node_for()
    said = log_evidence(node, [Side("nx-l1", Lost(tmp_path))], [NAME], tmp_path / "dest")
    assert "could not be read" in said and "stopped answering" in said
    assert evidence_of(node) == {}


# ------------------------------------------------------------------ plugins/migration.py


class Host:
    """What measure() uses of a XenHost."""

    def __init__(self, remote) -> None:
        self.name, self.remote, self.xl = "nx-l1", remote, Xl(remote)
        self.image = SimpleNamespace(name="testing")

    def facts(self):
        return SimpleNamespace(xen_version="4.20.4", kernel_release="7.2.12", dom0_mode="pv", accel="tcg")


class NoWatch:
    def __init__(self, remote, name) -> None:
        pass

    def stop(self) -> str:
        return ""


def test_a_failed_restore_reports_the_device_model_and_only_its_own_dmesg_lines(tmp_path, monkeypatch):
    """save_restore of an HVM guest on testing: the failure message carries the device
    model's line, not the host-wide `xl dmesg` tail (d3's and d4's lines are another
    domain's); dmesg evidence is the saved d5's and the restored d6's lines only."""
    monkeypatch.setattr(migration, "Watch", NoWatch)
    monkeypatch.setattr(migration.time, "sleep", lambda s: None)
    dom0 = Dom0(logs_of_testing(tmp_path))
    guest = SimpleNamespace(name=NAME, domid=5, type="hvm", spec=SimpleNamespace(memory_mb=256))
    metrics = MetricsSink(tmp_path / "artifacts" / "metrics.json")
    node = node_for()
    rec = migration.measure("save_restore", guest, Host(dom0), None, metrics, None, 0,
                            lambda: (RESTORE_LOG, 1, 3.2), node)
    with pytest.raises(AssertionError) as failed:
        migration._assert_good(rec, RESTORE_LOG[-3000:], SimpleNamespace())
    message = str(failed.value)
    assert FD_LINE in message and "spawn failed (rc=-3)" in message
    assert "upcall vector f3" not in message and "Triple fault" not in message
    assert evidence_of(node)["dmesg"] == ["(XEN) d5v0 save: HVM context saved\n"
                                          "(XEN) d6v0 restore: HVM context not loaded"]
    assert evidence_of(node)["device-model"] == [QEMU_DM_LOG]
    assert node.stash[SHOWN_KEY] == [(DMESG_TITLE, DMESG.rstrip("\n"))]
    assert (check_dir(tmp_path / "artifacts", node.nodeid) / f"nx-l1-qemu-dm-{NAME}.log").is_file()


def test_a_migration_that_passes_reads_no_evidence(tmp_path, monkeypatch):
    monkeypatch.setattr(migration, "Watch", NoWatch)
    monkeypatch.setattr(migration.time, "sleep", lambda s: None)
    dom0 = Dom0(logs_of_testing(tmp_path))
    guest = SimpleNamespace(name=NAME, domid=5, type="hvm", spec=SimpleNamespace(memory_mb=256))
    monkeypatch.setattr(migration, "memory_intact", lambda guest, agent: [])
    node = node_for()
    sink = MetricsSink(tmp_path / "metrics.json")
    rec = migration.measure("localhost_migrate", guest, Host(dom0), None, sink, None, 0,
                            lambda: (RESTORE_LOG, 0, 3.2), node)
    assert rec.ok and dom0.commands == [] and evidence_of(node) == {} and SHOWN_KEY not in node.stash


# ------------------------------------------------------------------ plugins/translation.py


class FailingRestore(Xl):
    """`xl save` succeeds; `xl restore` fails as on testing (xl's own stderr)."""

    def save(self, name, path, timeout=900.0):
        return CommandResult("xl save", 0, "", "", "nx-l1", 1.0)

    def restore(self, path, timeout=900.0):
        from harness.xen import XlError

        raise XlError(CommandResult("xl -vvv restore", 1, "", RESTORE_LOG, "nx-l1", 2.0))


class Kept:
    """The guest's own remote (mkdir and rm of the save file): kept, not run."""

    def __init__(self) -> None:
        self.commands = []

    def run(self, command, timeout=None):
        self.commands.append(command)
        return CommandResult(command, 0, "", "", "nx-l1", 0.0)

    run_expect = run


def test_translations_failed_restore_says_what_the_device_model_said(tmp_path):
    dom0 = Dom0(logs_of_testing(tmp_path))
    guest = SimpleNamespace(name=NAME, domid=5, remote=Kept())
    node = node_for("plugins/translation.py::test_translation_survives_save_restore[hvm]")
    with pytest.raises(AssertionError) as failed:
        translation.restored(guest, FailingRestore(dom0), node, tmp_path / "artifacts")
    assert "Domain creation failed" in str(failed.value) and FD_LINE in str(failed.value)
    assert evidence_of(node)["device-model"] == [QEMU_DM_LOG]
    assert guest.domid == 6  # the domain the restore created, as before
