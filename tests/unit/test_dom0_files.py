"""harness/dom0_files.py: one list of what goes into dom0, one install step, and the
snapshot key covers every file prepare() puts in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from harness import dom0_files, provision
from harness.accel import AccelChoice
from harness.agent import build
from harness.agent.client import AgentError
from harness.agent.nxagent import AGENT_VERSION
from harness.config import RunConfig, load_recipe
from harness.host import machine_spec
from harness.imaging import HostImage
from harness.machines.base import MachineSpec
from harness.provision import GuestPayload

TCG = AccelChoice("tcg", "qemu64,+svm,+npt", "test")


def image(tmp_path: Path) -> HostImage:
    d = tmp_path / "image"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"xen_file": "xen-4.17-amd64.gz",
                                                 "kernel_file": "vmlinuz-6.1.0-50-amd64"}))
    return HostImage("bookworm", "0123456789abcdef", d)


def spec_for(tmp_path: Path) -> MachineSpec:
    return machine_spec("h1", load_recipe("bookworm"), image(tmp_path), RunConfig(), TCG, tmp_path / "run")


class RecordingRemote:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def put(self, local, remote, mode=None):
        self.calls.append(("put", Path(local), remote, mode))

    def put_text(self, text, remote, mode=None):
        self.calls.append(("text", text, remote, mode))


def test_every_prepared_file_exists_and_has_one_place() -> None:
    remotes = [f.remote for f in dom0_files.PREPARED + dom0_files.ON_DEMAND]
    assert len(remotes) == len(set(remotes))
    for f in dom0_files.PREPARED + dom0_files.ON_DEMAND:
        assert [f.text is not None, f.local is not None, f.built is not None].count(True) == 1, f
        if f.local is not None:
            assert f.local.is_file(), f
    assert dom0_files.AGENT.remote == "/usr/local/lib/nested-xen/nxagent.py"
    assert "ExecStart=/usr/bin/python3 /usr/local/lib/nested-xen/nxchannel.py" in dom0_files.CHANNEL_UNIT


def test_install_puts_each_entry_with_its_mode(tmp_path: Path) -> None:
    payload = GuestPayload(kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initramfs.gz")
    remote = RecordingRemote()
    cache = tmp_path / "cache"
    dom0_files.install(remote, dom0_files.PREPARED + dom0_files.payload_files(payload), cache)
    built = build.built_agent(cache)  # the agent was built into the run's cache, and only there
    assert built.read_bytes() == build.agent_bytes() == dom0_files.AGENT.content()
    assert remote.calls[:3] == [
        ("put", built, "/usr/local/lib/nested-xen/nxagent.py", 0o755),
        ("put", dom0_files.WATCH_PATH, "/usr/local/lib/nested-xen/nxwatch.py", 0o755),
        ("put", dom0_files.CHANNEL_PATH, "/usr/local/lib/nested-xen/nxchannel.py", 0o755),
    ]
    unit = "/etc/systemd/system/nx-channel.service"
    assert remote.calls[3] == ("text", dom0_files.CHANNEL_UNIT, unit, None)
    guest = "/var/lib/nested-xen/guest"
    assert remote.calls[4:] == [("put", tmp_path / "vmlinuz", f"{guest}/vmlinuz", None),
                                ("put", tmp_path / "initramfs.gz", f"{guest}/initramfs.gz", None)]
    assert dom0_files.payload_files(None) == ()
    with pytest.raises(ValueError, match="run's cache"):
        dom0_files.install(RecordingRemote(), [dom0_files.AGENT])


def test_snapshot_key_covers_every_prepared_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision, "qemu_version", lambda binary: "QEMU emulator version 7.2")
    prov = object.__new__(provision.Provisioner)
    prov.cfg, prov.setup_guests = RunConfig(), None
    img, spec = image(tmp_path), spec_for(tmp_path)
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initramfs.gz").write_bytes(b"initramfs")
    payload = GuestPayload(kernel=tmp_path / "vmlinuz", initramfs=tmp_path / "initramfs.gz")
    key = prov.snapshot_key(img, spec, payload)
    assert prov.snapshot_key(img, spec, payload) == key
    (tmp_path / "initramfs.gz").write_bytes(b"another initramfs")
    assert prov.snapshot_key(img, spec, payload) != key
    key = prov.snapshot_key(img, spec, payload)
    for entry in dom0_files.PREPARED:
        copy = tmp_path / f"copy-{Path(entry.remote).name}"
        copy.write_bytes(entry.content() + b"\n# changed")
        copied = dataclasses.replace(entry, local=copy, text=None, built=None, data=None)
        changed = tuple(copied if e is entry else e for e in dom0_files.PREPARED)
        monkeypatch.setattr(provision, "PREPARED", changed)
        assert prov.snapshot_key(img, spec, payload) != key, entry.remote
        monkeypatch.setattr(provision, "PREPARED", dom0_files.PREPARED)
    # A file put in on demand is not in a snapshot, and not in its key.
    assert dom0_files.STREAM not in dom0_files.PREPARED


class PreparedHost:
    """dom0 as prepare() sees it: files put, commands run, the agent answering ``info``."""

    def __init__(self, version: str) -> None:
        self.name, self.channel = "h1", None
        self.remote = RecordingRemote()
        self.version = version

        def run_expect(cmd, timeout=None):
            self.remote.calls.append(("run", cmd))

        def as_runner():
            def run(cmd, stdin, timeout):
                self.remote.calls.append(("agent", cmd))
                return 0, json.dumps({"ok": True, "call": "info", "agent_version": self.version}), ""
            return run

        self.remote.run_expect, self.remote.as_runner = run_expect, as_runner


def test_prepare_checks_the_installed_agents_version(tmp_path: Path) -> None:
    host = PreparedHost(AGENT_VERSION)
    provision.prepare(host, None, tmp_path / "cache")
    kinds = [c[0] for c in host.remote.calls]
    assert kinds.index("agent") > max(i for i, k in enumerate(kinds) if k in ("put", "text"))
    assert host.remote.calls[kinds.index("agent")][1].endswith("nxagent.py info")
    assert ("run", "sync") in host.remote.calls
    assert (tmp_path / "cache" / "agent").is_dir()

    stale = PreparedHost("0.9")
    with pytest.raises(AgentError, match=r"\[h1\] the dom0 agent just installed: .*version '0.9'"):
        provision.prepare(stale, None, tmp_path / "cache")
    assert ("run", "sync") not in stale.remote.calls


@pytest.mark.parametrize("backend", ["qemu", "libvirt"])
def test_snapshot_key_binds_no_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """The key's device part comes from the machine spec: no machine is made (which would
    take a UDP port pair for its link), under either backend."""
    import socket

    from harness.machines import qemu

    monkeypatch.setattr(provision, "qemu_version", lambda binary: "QEMU emulator version 7.2")
    prov = object.__new__(provision.Provisioner)
    prov.cfg, prov.setup_guests = RunConfig(backend=backend), None
    spec = spec_for(tmp_path)
    before = qemu.QemuMachine(spec).device_model()  # what the key held, made by a machine

    def bind(self, address):
        raise AssertionError(f"the snapshot key bound {address}")

    monkeypatch.setattr(socket.socket, "bind", bind)
    key = prov.snapshot_key(image(tmp_path), spec, None)
    assert qemu.device_model(spec) == before  # the same devices: snapshots keep their keys
    assert len(key) == 16
