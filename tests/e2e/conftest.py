"""End-to-end tests of the harness itself: real QEMU, real Xen, injected faults.

They share the image cache with the main run (so the image is built once) and
write under the run's artifacts dir.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.config import RunConfig, Timeouts
from harness.guest_payload import guest_payload_for
from harness.machines.qemu import NAME_PREFIX
from harness.provision import Provisioner


def qemu_pids(label: str = "") -> list[int]:
    """PIDs of QEMU processes this harness started (optionally for one label)."""
    out = subprocess.run(["pgrep", "-f", f"{NAME_PREFIX}{label}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


@pytest.fixture(scope="session")
def e2e_config(nx_config: RunConfig, artifacts_dir: Path) -> RunConfig:
    return dataclasses.replace(nx_config, artifacts_dir=artifacts_dir)


@pytest.fixture(scope="session")
def e2e_provisioner(e2e_config: RunConfig) -> Provisioner:
    return Provisioner(e2e_config, guest_payload=guest_payload_for(e2e_config))


@pytest.fixture
def short_timeouts(e2e_config: RunConfig):
    def make(**kwargs: float) -> Provisioner:
        cfg = dataclasses.replace(e2e_config, timeouts=dataclasses.replace(Timeouts(), **kwargs))
        return Provisioner(cfg, guest_payload=guest_payload_for(cfg))

    return make


@pytest.fixture
def no_leftover_qemu() -> Iterator[None]:
    before = set(qemu_pids())
    yield
    left = set(qemu_pids()) - before
    assert not left, f"QEMU processes left behind: {sorted(left)}"
