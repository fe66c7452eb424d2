"""Ctrl-C / SIGTERM / SIGKILL of the runner mid-boot leave no QEMU behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.machines.qemu import Registry

from .conftest import qemu_pids

pytestmark = pytest.mark.e2e


def _as_from_a_terminal() -> None:
    # A job that a non-interactive shell put in the background inherits SIGINT ignored
    # (this test run may be one: CI, nohup, `cmd &`), and Python then installs no
    # KeyboardInterrupt handler. The runner under test gets Ctrl-C's default, as it would
    # when started from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def boots():
    """Start `nested-xen boot`; whatever a failed assertion leaves running is killed (its
    QEMU dies with it: PR_SET_PDEATHSIG) and its registry entry reaped, so it cannot
    disturb the next test (a leftover runner of the same host name did, once)."""
    started: list[tuple[subprocess.Popen, Path]] = []

    def start(tmp_path: Path, cache: Path) -> subprocess.Popen:
        env = dict(os.environ, NESTED_XEN_CACHE=str(cache))
        config = tmp_path / "run.yaml"
        config.write_text(f"artifacts_dir: {tmp_path / 'artifacts'}\nsnapshot: 'off'\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "boot", "--config", str(config), "true"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=_as_from_a_terminal,
        )
        started.append((proc, cache))
        return proc

    yield start
    for proc, cache in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            for pid in qemu_pids("bookworm-cli"):
                _gone(pid, 20)
            Registry(cache / "run").reap()


def _wait_for_qemu(proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = qemu_pids("bookworm-cli")
        if pids:
            return pids[0]
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("QEMU never started")


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_boot_stops_qemu(tmp_path, e2e_config, sig, boots):
    cache = e2e_config.resolved_cache_dir()
    proc = boots(tmp_path, cache)
    qemu = _wait_for_qemu(proc)
    time.sleep(3)  # mid-boot: Xen is up, dom0 is booting
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (130, 2, 0), out
    assert _gone(qemu, 20), f"QEMU {qemu} survived {sig.name} of the runner"
    assert not list((cache / "run").glob("nested-xen-bookworm-cli.json")), "registry entry left"


def test_sigkill_of_runner_kills_qemu_and_next_run_reaps(tmp_path, e2e_config, boots):
    cache = e2e_config.resolved_cache_dir()
    proc = boots(tmp_path, cache)
    qemu = _wait_for_qemu(proc)
    proc.kill()
    proc.wait(timeout=30)
    # PR_SET_PDEATHSIG: the kernel kills QEMU with its parent.
    assert _gone(qemu, 20), f"QEMU {qemu} survived SIGKILL of the runner"
    entries = list((cache / "run").glob("nested-xen-bookworm-cli.json"))
    assert entries, "the killed run could not remove its registry entry"
    assert json.loads(entries[0].read_text())["qemu_pid"] == qemu
    Registry(cache / "run").reap()
    assert not entries[0].exists(), "the next run must reap the stale entry"
