"""L1 snapshots: cold boot saves, later hosts restore in seconds, a bad snapshot
falls back to a cold boot, and concurrent restores do not interfere."""

from __future__ import annotations

import threading

import pytest

from harness.provision import Provisioner

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def snap_key(e2e_provisioner: Provisioner, artifacts_dir) -> str:
    """Make sure a snapshot exists (cold boot + save if none fits) and return its key."""
    prov = e2e_provisioner
    host = prov.host("bookworm", "snap-seed", artifacts_dir / "snap-seed", snapshot="auto")
    host.stop()
    recipe, image = prov.image("bookworm")
    from harness.host import machine_spec

    spec = machine_spec("snap-seed", recipe, image, prov.cfg, prov.accel, artifacts_dir / "snap-seed")
    key = prov.snapshot_key(image, spec, prov.guest_payload(image))
    assert prov.snapshots.lookup(key), "cold boot did not leave a snapshot"
    return key


def test_restore_answers_and_clock_is_current(e2e_provisioner, snap_key, artifacts_dir):
    import time

    host = e2e_provisioner.host("bookworm", "snap-restore", artifacts_dir / "snap-restore")
    try:
        assert host.timings["path"] == "restored"
        assert host.timings["restore"] < 30
        # dom0 answered on the virtio-serial channel (which set its clock) before SSH
        assert host.channel is not None, "the restore did not get an answer on the channel"
        assert host.timings["restore"] <= host.timings["restore_ssh"]
        ran = host.channel.request("run", timeout=60, argv=["xl", "list"])
        assert ran["rc"] == 0 and "Domain-0" in ran["stdout"]
        remote_now = float(host.remote.check_output("date +%s.%N"))
        assert abs(remote_now - time.time()) < 5, "dom0 clock not synced after restore"
        assert "Domain-0" in host.remote.check_output("xl list")
    finally:
        host.stop()


def test_two_concurrent_restores_do_not_interfere(e2e_provisioner, snap_key, artifacts_dir):
    hosts, errors = {}, []

    def restore(i: int) -> None:
        try:
            hosts[i] = e2e_provisioner.host("bookworm", f"snap-par{i}", artifacts_dir / f"snap-par{i}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=restore, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert {h.timings["path"] for h in hosts.values()} == {"restored"}
        ports = {h.machine.ssh_address[1] for h in hosts.values()}
        assert len(ports) == 2
        # Each dom0 writes its own file; neither sees the other's (separate overlays).
        for i, h in hosts.items():
            h.remote.run_expect(f"echo {i} > /root/which && sync")
        for i, h in hosts.items():
            assert h.remote.check_output("cat /root/which").strip() == str(i)
    finally:
        for h in hosts.values():
            h.stop()


def test_corrupted_snapshot_falls_back_to_cold_boot(e2e_provisioner, snap_key, artifacts_dir, caplog):
    prov = e2e_provisioner
    files = prov.snapshots.lookup(snap_key)
    with open(files.memory, "r+b") as f:
        f.seek(0)
        f.write(b"garbage!" * 512)
    host = prov.host("bookworm", "snap-corrupt", artifacts_dir / "snap-corrupt")
    try:
        assert host.timings["path"] == "cold"
        assert "discarding L1 snapshot" in caplog.text
    finally:
        host.stop()
    # The cold boot saved a good snapshot again.
    assert prov.snapshots.lookup(snap_key)
