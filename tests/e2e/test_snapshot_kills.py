"""A runner killed (SIGKILL) while it saves or restores an L1 snapshot leaves no
QEMU behind and no half-written snapshot in the cache; the next run recovers.

The runner is `nested-xen boot` in a child process, sharing the image cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import qemu_pids

# Three L1 lifetimes, each killed mid-save or mid-restore (206 s warm): nightly
# (tox -e e2e-nightly); the push run keeps the corrupted-snapshot fallback (test_snapshots.py).
pytestmark = [pytest.mark.e2e, pytest.mark.nightly]

LABEL = "bookworm-cli"


def _boot(tmp_path: Path, cache: Path, snapshot: str, name: str) -> subprocess.Popen:
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"artifacts_dir: {tmp_path / name}\nsnapshot: '{snapshot}'\n")
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "boot", "--config", str(config), "true"],
        env=dict(os.environ, NESTED_XEN_CACHE=str(cache)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait(what: str, found, proc: subprocess.Popen, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the runner ended before {what}:\n{proc.stdout.read()}")
        time.sleep(interval)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _kill_runner(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _no_qemu_left(timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while qemu_pids(LABEL) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not qemu_pids(LABEL), f"QEMU left behind: {qemu_pids(LABEL)}"


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    return out


def test_kill_mid_save_then_mid_restore(tmp_path, e2e_config):
    cache = e2e_config.resolved_cache_dir()
    snaps = cache / "snapshots"

    # 1. Killed while saving: the temp dir is all there is, never a snapshot.
    proc = _boot(tmp_path, cache, "refresh", "save")

    def saving():
        for tmp in snaps.glob(f".tmp-*-{proc.pid}"):
            if (tmp / "memory").exists() and (tmp / "memory").stat().st_size > 0:
                return tmp
        return None

    tmp = _wait("the snapshot save", saving, proc, timeout=600)
    _kill_runner(proc)
    key = tmp.name.split("-")[1]
    _no_qemu_left()
    assert not (snaps / key / "meta.json").exists(), "a half-written snapshot is in the cache"

    # 2. The next run boots cold (nothing to restore), saves, and clears the leftover.
    out = _finish(_boot(tmp_path, cache, "auto", "after-save-kill"))
    assert '"path": "cold"' in out, out
    assert (snaps / key / "meta.json").exists(), out
    assert not tmp.exists(), "the killed run's temp snapshot was not cleaned up"
    before = {p.name: p.stat().st_mtime_ns for p in (snaps / key).iterdir()}

    # 3. Killed while restoring: QEMU goes, the snapshot is untouched.
    proc = _boot(tmp_path, cache, "auto", "restore")

    def restoring():
        pids = []
        for pid in qemu_pids(LABEL):
            try:
                if b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                continue
        return pids

    _wait("QEMU loading the snapshot", restoring, proc, timeout=120, interval=0.01)
    _kill_runner(proc)
    _no_qemu_left()
    assert {p.name: p.stat().st_mtime_ns for p in (snaps / key).iterdir()} == before
    assert not list(snaps.glob(".tmp-*")), "a temp snapshot was left behind"

    # 4. And it still restores.
    out = _finish(_boot(tmp_path, cache, "auto", "after-restore-kill"))
    assert '"path": "restored"' in out, out
