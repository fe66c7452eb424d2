"""The libvirt backend end to end: a real Xen boot to dom0 SSH, an L1 snapshot
and its restore, a boot through a remote URI (qemu+ssh to this machine, through
a private sshd on 127.0.0.1), and reaping of a SIGKILLed run's domain.

Needs libvirt-python (``pip install 'nested-xen[libvirt]'``), a running
libvirtd at qemu:///system (``./setup --libvirt`` starts it) and, for the
remote test, root and sshd. One VM at a time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed: "
                              "pip install 'nested-xen[libvirt]'")

from harness.agent.client import REMOTE_AGENT_PATH  # noqa: E402
from harness.config import RunConfig  # noqa: E402
from harness.guest_payload import guest_payload_for  # noqa: E402
from harness.machines.libvirt import POOL_NAME, connect, reap_domains  # noqa: E402
from harness.machines.qemu import free_port  # noqa: E402
from harness.provision import Provisioner  # noqa: E402

pytestmark = pytest.mark.e2e

LOCAL_URI = "qemu:///system"


@pytest.fixture(scope="module")
def conn():
    c = connect(LOCAL_URI)
    yield c
    c.close()


@pytest.fixture(scope="module")
def lv_config(e2e_config: RunConfig) -> RunConfig:
    return dataclasses.replace(e2e_config, backend="libvirt", libvirt_uri=LOCAL_URI)


def active(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}


def test_cold_boot_snapshot_and_restore(lv_config, conn, artifacts_dir, record_property):
    prov = Provisioner(lv_config, guest_payload=guest_payload_for(lv_config))
    host = prov.host("bookworm", "lv-cold", artifacts_dir / "lv-cold", snapshot="refresh")
    name = host.machine.name
    try:
        assert host.timings["path"] == "cold"
        assert name in active(conn)
        assert "Domain-0" in host.remote.check_output("xl list")
        assert "Xen version" in host.machine.read_serial()  # read through the console stream
        assert host.facts().accel == "tcg" or host.facts().accel == "kvm"
        record_property("libvirt_cold_boot_s", host.timings["boot_total"])
    finally:
        host.stop()
    assert name not in active(conn), "the transient domain must disappear on stop"
    assert not list((artifacts_dir / "lv-cold").glob("disk*.qcow2")), "overlays left behind"

    host = prov.host("bookworm", "lv-restore", artifacts_dir / "lv-restore", snapshot="auto")
    name = host.machine.name
    try:
        assert host.timings["path"] == "restored"
        assert host.timings["restore"] < 120
        assert "Domain-0" in host.remote.check_output("xl list")
        # What prepare() put into dom0 before the snapshot is there after it.
        assert host.remote.run(f"test -x {REMOTE_AGENT_PATH}").rc == 0
        remote_now = float(host.remote.check_output("date +%s.%N"))
        assert abs(remote_now - time.time()) < 10, "dom0 clock not synced after restore"
        record_property("libvirt_restore_s", host.timings["restore"])
    finally:
        host.stop()
    assert name not in active(conn)
    assert not (artifacts_dir / "lv-restore" / "restore.save").exists()


# ---------------------------------------------------------------------- remote URI


@pytest.fixture(scope="module")
def ssh_uri(tmp_path_factory) -> str:
    """A private sshd on 127.0.0.1 and a qemu+ssh URI to this machine's libvirtd through it."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if os.geteuid() != 0 or not Path(sshd).exists():
        pytest.skip("the remote-URI test needs root and openssh-server (./setup --libvirt)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAllowTcpForwarding yes\n"
    )
    # libvirt's ssh transport and the harness's tunnel both run this, which keeps
    # the throwaway host key out of ~/.ssh/known_hosts.
    wrapper = d / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec ssh -o UserKnownHostsFile={d / 'known_hosts'} "
                       "-o StrictHostKeyChecking=no \"$@\"\n")
    wrapper.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    log = open(d / "sshd.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert proc.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
        time.sleep(0.1)
    yield f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={d / 'client_key'}&command={wrapper}"
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def test_remote_uri_boot(lv_config, conn, ssh_uri, artifacts_dir, record_property):
    cfg = dataclasses.replace(lv_config, libvirt_uri=ssh_uri)
    prov = Provisioner(cfg, guest_payload=guest_payload_for(cfg))
    host = prov.host("bookworm", "lv-remote", artifacts_dir / "lv-remote", snapshot="off")
    machine = host.machine
    name = machine.name
    try:
        assert machine.remote and machine.tunnel is not None
        # dom0's SSH comes through the tunnel, not from the libvirt host's forwarded port.
        assert host.remote.port == machine.tunnel.local_port != machine.port
        assert "Domain-0" in host.remote.check_output("xl list")
        assert "Xen version" in machine.read_serial()
        pool = conn.storagePoolLookupByName(POOL_NAME)
        vols = set(pool.listVolumes())
        image_dir = host.image.dir.name
        assert {f"{image_dir}-xen", f"{image_dir}-rootfs.ext4", f"{name}.qcow2"} <= vols
        xml = conn.lookupByName(name).XMLDesc(0)
        assert "/var/lib/libvirt/images/nested-xen/" in xml  # the uploaded files, not the cache
        record_property("libvirt_remote_cold_boot_s", host.timings["boot_total"])
        tunnel = machine.tunnel.proc
    finally:
        host.stop()
    assert name not in active(conn)
    assert f"{name}.qcow2" not in set(conn.storagePoolLookupByName(POOL_NAME).listVolumes())
    assert tunnel.poll() is not None, "the SSH tunnel outlived the machine"


# ---------------------------------------------------------------------- reaping


def test_sigkill_of_runner_leaves_domain_and_next_run_reaps(tmp_path, lv_config, conn):
    cache = lv_config.resolved_cache_dir()
    config = tmp_path / "run.yaml"
    config.write_text(f"artifacts_dir: {tmp_path / 'artifacts'}\nsnapshot: 'off'\n"
                      f"backend: libvirt\nlibvirt_uri: {LOCAL_URI}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "boot", "--config", str(config), "true"],
        env=dict(os.environ, NESTED_XEN_CACHE=str(cache)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    name = f"nx-bookworm-cli-{proc.pid}"
    try:
        deadline = time.monotonic() + 300
        while name not in active(conn):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the domain never appeared"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    try:
        # libvirtd, not the harness, is QEMU's parent: the domain outlives the killed run...
        assert name in active(conn)
        # ...until the next run reaps it (LibvirtMachine.start does this first).
        assert name in reap_domains(conn)
        assert name not in active(conn)
        assert reap_domains(conn) == []
    finally:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name).destroy()
