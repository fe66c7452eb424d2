"""Boot faults: each ends in a clear error naming the stage, with the serial log
kept, and leaves no QEMU process behind."""

from __future__ import annotations

import dataclasses
import time

import pytest

from harness.host import XenHost, machine_spec
from harness.machines.base import MachineCrashed, MachineExited, StageTimeout
from harness.machines.qemu import QemuMachine

pytestmark = pytest.mark.e2e


def _host(prov, name, run_dir, **recipe_changes):
    recipe, image = prov.image("bookworm")
    recipe = dataclasses.replace(recipe, **recipe_changes)
    spec = machine_spec(name, recipe, image, prov.cfg, prov.accel, run_dir)
    return XenHost.create(name, QemuMachine(spec, prov.registry), image, recipe, prov.cfg.timeouts)


def test_no_ssh_fails_at_the_deadline_with_serial_tail(short_timeouts, artifacts_dir, no_leftover_qemu):
    prov = short_timeouts(dom0_ssh=8.0)
    host = _host(prov, "fault-nossh", artifacts_dir / "fault-nossh")
    started = time.monotonic()
    with pytest.raises(StageTimeout) as err:
        try:
            host.boot(prov.cfg.timeouts)
        finally:
            host.stop()
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert err.value.stage == "dom0-ssh"
    assert "dom0 did not answer over SSH" in message
    assert "Last serial lines" in message and "Linux version" in host.machine.read_serial()
    assert host.machine.serial_log.exists(), "the full serial log must be kept"
    # Xen + dom0 kernel stages come first (~10 s under TCG), then the 8 s SSH deadline.
    assert elapsed < 8.0 + prov.cfg.timeouts.xen_banner + prov.cfg.timeouts.dom0_kernel


def test_unbootable_hypervisor_is_reported_as_qemu_exit(e2e_provisioner, artifacts_dir, tmp_path,
                                                        no_leftover_qemu):
    prov = e2e_provisioner
    recipe, image = prov.image("bookworm")
    bogus = tmp_path / "not-a-kernel"
    bogus.write_bytes(b"\0" * 4096)
    spec = dataclasses.replace(
        machine_spec("fault-noxen", recipe, image, prov.cfg, prov.accel, artifacts_dir / "fault-noxen"),
        kernel=bogus,
    )
    host = XenHost.create("fault-noxen", QemuMachine(spec, prov.registry), image, recipe, prov.cfg.timeouts)
    with pytest.raises((MachineExited, Exception)) as err:
        try:
            host.boot(prov.cfg.timeouts)
        finally:
            host.stop()
    assert "QEMU" in str(err.value)


def test_dom0_panic_fails_fast_naming_the_crash(e2e_provisioner, artifacts_dir, no_leftover_qemu):
    prov = e2e_provisioner
    recipe, _ = prov.image("bookworm")
    host = _host(prov, "fault-panic", artifacts_dir / "fault-panic",
                 dom0_cmdline=recipe.dom0_cmdline + " init=/bin/false")
    started = time.monotonic()
    with pytest.raises((MachineCrashed, StageTimeout)) as err:
        try:
            host.boot(dataclasses.replace(prov.cfg.timeouts, dom0_ssh=240.0))
        finally:
            host.stop()
    assert isinstance(err.value, MachineCrashed), f"expected a crash, got: {err.value}"
    assert time.monotonic() - started < 200
