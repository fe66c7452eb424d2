"""`pytest -n 2`: each xdist worker gets its own L1 restored from the same
snapshot, with its own ports, disk overlay and metrics file; the run passes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Two cold L1s at once on 2 cores (~5 min with an empty cache): nightly (tox -e e2e-nightly).
pytestmark = [pytest.mark.e2e, pytest.mark.nightly]

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, cache: Path, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    artifacts = tmp_path / name
    config = tmp_path / "run.yaml"
    config.write_text("snapshot_guests: []\n")  # smoke needs no guests: keep the L1s light
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "plugins/smoke.py", "-n", "2", "-p", "no:cacheprovider",
         "-q", f"--nx-config={config}", f"--artifacts-dir={artifacts}"],
        cwd=ROOT, env=dict(os.environ, NESTED_XEN_CACHE=str(cache)),
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    return proc, artifacts


def test_two_workers_each_get_their_own_host(tmp_path, e2e_config):
    cache = e2e_config.resolved_cache_dir()
    _run(tmp_path, cache, "seed")  # boots cold and saves the snapshot if none fits yet
    proc, artifacts = _run(tmp_path, cache, "restored")
    hosts = sorted((artifacts / "hosts").iterdir())
    assert {h.name.split("-")[1] for h in hosts} == {"gw0", "gw1"}, [h.name for h in hosts]
    cmdlines = [(h / "qemu.cmdline").read_text() for h in hosts]
    assert all("-incoming" in c for c in cmdlines), "each worker's L1 must be restored from the snapshot"
    ports = {c.split("hostfwd=tcp:127.0.0.1:")[1].split("-")[0] for c in cmdlines}
    assert len(ports) == 2, "the two workers' L1s shared an SSH port"
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in .*", summary), proc.stdout[-3000:]
