"""Unit tests for harness.machines: readiness stages, the QEMU command line, the registry.

No VM is booted: wait_ready runs against a fake Machine with an in-memory
console, and QemuMachine is only asked for its command line (or started with
a QEMU binary that does not exist).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.accel import AccelChoice
from harness.machines.base import (
    LinkPorts,
    Machine,
    MachineCrashed,
    MachineExited,
    MachineSpec,
    MachineStartError,
    Module,
    SnapshotFiles,
    Stage,
    StageTimeout,
)
from harness.machines.qemu import NAME_PREFIX, QemuMachine, Registry, free_port

FAST = 0.005


class FakeMachine(Machine):
    """A machine whose console is a list of chunks revealed one per read."""

    def __init__(self, tmp_path: Path, chunks: list[str], statuses: list[str | None] | None = None):
        self.chunks = list(chunks)
        self.shown = 0
        self.statuses = list(statuses or [])
        self.alive_calls = 0
        self.log_path = tmp_path / "serial.log"

    @property
    def serial_log(self) -> Path:
        return self.log_path

    @property
    def ssh_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 2222)

    def read_serial(self) -> str:
        self.shown = min(self.shown + 1, len(self.chunks))
        return "".join(self.chunks[: self.shown])

    def alive(self) -> str | None:
        self.alive_calls += 1
        return self.statuses.pop(0) if self.statuses else None

    def start(self, incoming: SnapshotFiles | None = None) -> None:
        raise NotImplementedError

    def snapshot(self, dest_dir: Path) -> SnapshotFiles:
        raise NotImplementedError

    def stop(self) -> None:
        pass


def stage(name: str, pattern: str | None = None, timeout: float = 2.0, **kw: object) -> Stage:
    return Stage(name, timeout, f"hint for {name}", pattern=pattern, interval=FAST, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ wait_ready


def test_stages_found_as_console_grows(tmp_path: Path) -> None:
    m = FakeMachine(tmp_path, ["SeaBIOS\n", "", "(XEN) Xen version 4.17.5 (Debian)\n", "",
                               "[    0.000000] Linux version 6.1.0-28-amd64\n", "login:\n"])
    times = m.wait_ready([stage("xen", r"Xen version \d+\.\d+"), stage("dom0", r"Linux version \d+")])
    assert list(times) == ["xen", "dom0"]
    assert all(isinstance(v, float) and v >= 0 for v in times.values())
    assert m.shown >= 5  # it had to keep reading until the kernel line appeared


def test_stages_must_appear_in_order(tmp_path: Path) -> None:
    # "second" appears before "first": once "first" is found, the earlier "second"
    # does not count, and the wait for it times out.
    m = FakeMachine(tmp_path, ["second\nfirst\n"])
    with pytest.raises(StageTimeout) as info:
        m.wait_ready([stage("one", "first"), stage("two", "second", timeout=0.05)])
    assert info.value.stage == "two"


def test_same_pattern_twice_needs_two_occurrences(tmp_path: Path) -> None:
    m = FakeMachine(tmp_path, ["tick\n", "tock\n", "tick\n"])
    assert list(m.wait_ready([stage("a", "tick"), stage("b", "tick")])) == ["a", "b"]
    assert m.shown == 3


def test_stage_timeout_message(tmp_path: Path) -> None:
    lines = [f"line {i}\n" for i in range(50)]
    m = FakeMachine(tmp_path, ["".join(lines)])
    started = time.monotonic()
    with pytest.raises(StageTimeout) as info:
        m.wait_ready([Stage("xen", 0.1, "Xen did not boot", pattern="Xen version", interval=FAST)])
    assert time.monotonic() - started < 2
    msg = str(info.value)
    assert msg.startswith("Xen did not boot (stage 'xen' not reached within 0.1 s)")
    assert str(m.serial_log) in msg
    assert "line 49" in msg and "line 20" in msg  # the last 30 lines
    assert "line 19\n" not in msg
    assert info.value.log_path == m.serial_log
    assert info.value.tail.splitlines()[-1] == "line 49"


def test_machine_exited(tmp_path: Path) -> None:
    m = FakeMachine(tmp_path, ["qemu-system-x86_64: -accel kvm: failed to initialize kvm\n"],
                    statuses=[None, None, "exit status 1"])
    with pytest.raises(MachineExited) as info:
        m.wait_ready([stage("xen", "Xen version", timeout=5)])
    msg = str(info.value)
    assert "QEMU exited (exit status 1) while waiting for stage 'xen'" in msg
    assert "failed to initialize kvm" in msg
    assert m.alive_calls == 3


@pytest.mark.parametrize("panic", ["Kernel panic - not syncing: VFS: Unable to mount root fs",
                                   "(XEN) Panic on CPU 1:"])
def test_machine_crashed(tmp_path: Path, panic: str) -> None:
    m = FakeMachine(tmp_path, ["(XEN) Xen version 4.17.5\n", f"{panic}\n"])
    with pytest.raises(MachineCrashed) as info:
        m.wait_ready([stage("xen", "Xen version"), stage("dom0", "Linux version", timeout=5)])
    assert info.value.stage == "dom0"
    first = str(info.value).splitlines()[0]
    assert first.startswith("crash on the console while waiting for stage 'dom0': ")
    assert ("Kernel panic - not syncing" in first) or ("Panic on CPU 1" in first)


def test_crash_beats_pattern_in_the_same_read(tmp_path: Path) -> None:
    m = FakeMachine(tmp_path, ["Kernel panic - not syncing: x\nLinux version 6.1\n"])
    with pytest.raises(MachineCrashed):
        m.wait_ready([stage("dom0", "Linux version")])


def test_probe_stage(tmp_path: Path) -> None:
    answers = iter([False, False, True])
    calls: list[int] = []

    def probe() -> bool:
        calls.append(1)
        return next(answers)

    m = FakeMachine(tmp_path, ["(XEN) Xen version 4.17\n", "more\n"])
    times = m.wait_ready([stage("xen", "Xen version"), stage("ssh", probe=probe)])
    assert list(times) == ["xen", "ssh"]
    assert len(calls) == 3


def test_probe_stage_timeout(tmp_path: Path) -> None:
    m = FakeMachine(tmp_path, ["booted\n"])
    with pytest.raises(StageTimeout, match="hint for ssh \\(stage 'ssh'"):
        m.wait_ready([stage("ssh", probe=lambda: False, timeout=0.05)])


def test_read_serial_of_missing_file(tmp_path: Path) -> None:
    class FileMachine(FakeMachine):
        read_serial = Machine.read_serial

    m = FileMachine(tmp_path, [])
    assert m.read_serial() == "" and m.serial_tail() == ""
    m.serial_log.write_text("a\nb\nc\n")
    assert m.serial_tail(2) == "b\nc"


# ------------------------------------------------------------------ QEMU command line


@pytest.fixture
def spec(tmp_path: Path) -> MachineSpec:
    files = tmp_path / "image"
    files.mkdir()
    for name in ("xen", "vmlinuz", "initrd.img", "rootfs.ext4"):
        (files / name).write_bytes(b"\0" * 4096)
    return MachineSpec(
        name="h1",
        kernel=files / "xen",
        append="console=com1 dom0_mem=1024M,max:1024M",
        modules=(Module(files / "vmlinuz", "root=/dev/vda console=hvc0"), Module(files / "initrd.img")),
        disk=files / "rootfs.ext4",
        memory_mb=3072,
        cpus=2,
        accel=AccelChoice("tcg", "qemu64,+svm,+npt", "test"),
        run_dir=tmp_path / "run",
    )


def arg_after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_command_line(spec: MachineSpec) -> None:
    m = QemuMachine(spec)
    m.port = 40022
    cmd = m.command_line()
    assert cmd[0] == "qemu-system-x86_64"
    assert "-no-reboot" in cmd
    assert "-daemonize" not in cmd
    assert "-incoming" not in cmd
    net = arg_after(cmd, "-netdev")
    assert "restrict=on" in net.split(",")
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in net
    assert arg_after(cmd, "-kernel") == str(spec.kernel)
    assert arg_after(cmd, "-append") == spec.append
    image = spec.kernel.parent
    assert arg_after(cmd, "-initrd") == (
        f"{image / 'vmlinuz'} root=/dev/vda console=hvc0,{image / 'initrd.img'}"
    )
    assert arg_after(cmd, "-cpu") == "qemu64,+svm,+npt"
    assert arg_after(cmd, "-accel") == "tcg,thread=multi"
    assert arg_after(cmd, "-m") == "3072" and arg_after(cmd, "-smp") == "2"
    assert arg_after(cmd, "-name").startswith(f"{NAME_PREFIX}h1,")
    assert f"file={spec.run_dir / 'disk.qcow2'}," in arg_after(cmd, "-drive")
    assert arg_after(cmd, "-chardev") == f"file,id=ser0,path={spec.run_dir / 'serial.log'}"
    assert arg_after(cmd, "-qmp").startswith("unix:/tmp/")


def test_channel_port_is_a_virtio_serial_port_on_a_host_socket(spec: MachineSpec) -> None:
    m = QemuMachine(spec)
    cmd = m.command_line()
    chardevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-chardev"]
    devices = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]
    assert f"socket,id=nxchan,path={m.channel_path},server=on,wait=off" in chardevs
    assert "virtio-serial-pci,id=vser0,addr=0x5" in devices
    assert "virtserialport,bus=vser0.0,chardev=nxchan,name=org.nested-xen.channel" in devices
    assert len(str(m.channel_path)) < 108  # AF_UNIX path limit
    # behind the IOMMU of a PVH dom0 like every virtio device
    iommu = QemuMachine(dataclasses.replace(spec, iommu=True)).command_line()
    assert any(d.startswith("virtio-serial-pci,") and "iommu_platform=on" in d
               for d in (iommu[i + 1] for i, a in enumerate(iommu) if a == "-device"))


def test_command_line_incoming(spec: MachineSpec, tmp_path: Path) -> None:
    files = SnapshotFiles(memory=tmp_path / "snap/memory", disk=tmp_path / "snap/disk.qcow2")
    cmd = QemuMachine(spec).command_line(incoming=files)
    assert arg_after(cmd, "-incoming") == f"exec:cat {files.memory}"


def _link_netdev(cmd: list[str]) -> str:
    return next(cmd[i + 1] for i, a in enumerate(cmd) if a == "-netdev" and "id=link0" in cmd[i + 1])


def test_every_machine_has_a_link_nic_on_its_own_ports(spec: MachineSpec) -> None:
    a, b = QemuMachine(spec), QemuMachine(spec)
    assert a.link.local != a.link.peer
    assert {a.link.local, a.link.peer}.isdisjoint({b.link.local, b.link.peer})
    netdev = _link_netdev(a.command_line())
    assert netdev == (f"socket,id=link0,udp=127.0.0.1:{a.link.peer},"
                      f"localaddr=127.0.0.1:{a.link.local}")
    devices = [a.command_line()[i + 1] for i, x in enumerate(a.command_line()) if x == "-device"]
    assert any("netdev=link0" in d and "addr=0x6" in d for d in devices)


def test_linked_machine_uses_the_reversed_ports(spec: MachineSpec) -> None:
    first = QemuMachine(spec)
    second = QemuMachine(dataclasses.replace(spec, link=first.link.reversed()))
    assert second.link == LinkPorts(first.link.peer, first.link.local)
    assert f"udp=127.0.0.1:{first.link.local}" in _link_netdev(second.command_line())


def test_device_model_ignores_ports_and_paths(spec: MachineSpec, tmp_path: Path) -> None:
    """The snapshot key's device part: the same for two machines with different
    ports, run dirs and link backends, different when a device changes."""
    a = QemuMachine(spec)
    b = QemuMachine(dataclasses.replace(spec, run_dir=tmp_path / "other", link=LinkPorts(1, 2)))
    assert a.device_model() == b.device_model()
    assert any(d.startswith("-device virtio-net-pci,netdev=link0") for d in a.device_model())
    assert QemuMachine(dataclasses.replace(spec, cpus=spec.cpus + 1)).device_model() != a.device_model()


@pytest.mark.parametrize("where", ["path", "args"])
def test_module_with_comma_is_refused(spec: MachineSpec, tmp_path: Path, where: str) -> None:
    if where == "path":
        bad = Module(tmp_path / "odd,name" / "vmlinuz", "root=/dev/vda")
    else:
        bad = Module(spec.modules[0].path, "dom0_mem=1G,max:1G")
    cmd_spec = dataclasses.replace(spec, modules=(bad, spec.modules[1]))
    with pytest.raises(MachineStartError, match="contain a comma"):
        QemuMachine(cmd_spec).command_line()


def test_start_with_missing_qemu_binary(spec: MachineSpec, tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (the overlay is made before QEMU runs)")
    missing = dataclasses.replace(spec, qemu_binary=str(tmp_path / "no-such-qemu"))
    registry = Registry(tmp_path / "registry")
    m = QemuMachine(missing, registry)
    with pytest.raises(MachineStartError) as info:
        m.start()
    msg = str(info.value)
    assert "apt-get install" in msg and "no-such-qemu" in msg
    assert m.overlay.exists()  # qemu-img made the overlay; QEMU itself was missing
    assert m.alive() == "not started"
    assert list(registry.dir.glob("*.json")) == []
    m.stop()
    assert not m.overlay.exists()


def test_alive_and_stop_without_start(spec: MachineSpec) -> None:
    m = QemuMachine(spec)
    assert m.alive() == "not started"
    m.stop()  # idempotent, nothing to do
    assert m.ssh_address == ("127.0.0.1", 0)


# ------------------------------------------------------------------ free_port


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# ------------------------------------------------------------------ Registry.reap


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper():
    """Start `python3 -c sleep ARGS...`; kill whatever is still running at the end."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def write_entry(registry: Registry, name: str, qemu_pid: int, owner_pid: int) -> Path:
    registry.dir.mkdir(parents=True, exist_ok=True)
    path = registry.dir / f"{name}.json"
    path.write_text(json.dumps({"qemu_pid": qemu_pid, "owner_pid": owner_pid, "name": name}))
    return path


def test_reap_kills_orphan_of_dead_owner(tmp_path: Path, sleeper) -> None:
    proc = sleeper("nested-xen-fake")
    registry = Registry(tmp_path / "run")
    entry = write_entry(registry, "nested-xen-fake", proc.pid, dead_pid())
    assert registry.reap() == ["nested-xen-fake"]
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert not entry.exists()


def test_reap_keeps_entry_of_live_owner(tmp_path: Path, sleeper) -> None:
    proc = sleeper("nested-xen-mine")
    registry = Registry(tmp_path / "run")
    entry = registry.add("nested-xen-mine", proc.pid)
    assert json.loads(entry.read_text())["owner_pid"] == os.getpid()
    assert registry.reap() == []
    assert entry.exists()
    assert proc.poll() is None


def test_reap_spares_unrelated_process(tmp_path: Path, sleeper) -> None:
    # The pid was reused by something that is not our VM: never kill it.
    proc = sleeper("something-else")
    registry = Registry(tmp_path / "run")
    entry = write_entry(registry, "nested-xen-fake", proc.pid, dead_pid())
    assert registry.reap() == []
    assert proc.poll() is None
    assert not entry.exists()


def test_reap_drops_entries_of_gone_vms_and_garbage(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run")
    gone = write_entry(registry, "nested-xen-gone", dead_pid(), dead_pid())
    garbage = registry.dir / "broken.json"
    garbage.write_text("{not json")
    assert registry.reap() == []
    assert not gone.exists() and not garbage.exists()


def test_reap_of_missing_directory(tmp_path: Path) -> None:
    assert Registry(tmp_path / "nothing").reap() == []


def test_reap_recognises_real_qemu_argv(tmp_path: Path, sleeper) -> None:
    # The argv QemuMachine really gives QEMU: "-name nested-xen-h1,debug-threads=on".
    proc = sleeper("-name", f"{NAME_PREFIX}h1,debug-threads=on")
    registry = Registry(tmp_path / "run")
    write_entry(registry, f"{NAME_PREFIX}h1", proc.pid, dead_pid())
    assert registry.reap() == [f"{NAME_PREFIX}h1"]


def test_reap_removes_qmp_sockets_of_dead_runs(tmp_path: Path) -> None:
    dead, live = tmp_path / f"nx-qmp-{dead_pid()}-h1.sock", tmp_path / f"nx-qmp-{os.getpid()}-h2.sock"
    other = tmp_path / "nx-qmp-notapid-h3.sock"
    for path in (dead, live, other):
        path.touch()
    Registry._reap_sockets(tmp_path)
    assert not dead.exists()
    assert live.exists() and other.exists()


class FakeQmp:
    """QMP at the boundary: answers the migration commands like a QEMU with ``caps``."""

    def __init__(self, caps: list[str]) -> None:
        self.caps = caps
        self.sent: list[tuple[str, dict]] = []

    def cmd(self, name: str, **args: object) -> object:
        self.sent.append((name, args))
        if name == "query-migrate-capabilities":
            return [{"capability": c, "state": False} for c in self.caps]
        if name == "query-migrate":
            return {"status": "completed"}
        if name == "migrate" and str(args["uri"]).startswith("file:"):
            Path(str(args["uri"])[5:]).write_bytes(b"ram")
        return {}


@pytest.mark.parametrize(("caps", "stream"), [
    (["xbzrle", "postcopy-ram"], "stream"),            # QEMU 7.2 (bookworm)
    (["xbzrle", "multifd", "mapped-ram"], "mapped-ram"),  # QEMU >= 9.0
])
def test_snapshot_uses_mapped_ram_where_present(spec: MachineSpec, tmp_path: Path, caps, stream) -> None:
    machine = QemuMachine(spec)
    machine.run_dir.mkdir(parents=True, exist_ok=True)
    machine.overlay.write_bytes(b"disk")
    machine.qmp = FakeQmp(caps)
    files = machine.snapshot(tmp_path / "snap")
    assert files.stream == stream
    migrate = next(args for name, args in machine.qmp.sent if name == "migrate")
    if stream == "mapped-ram":
        assert migrate["uri"] == f"file:{files.memory}"
        set_caps = next(args for name, args in machine.qmp.sent if name == "migrate-set-capabilities")
        assert {c["capability"] for c in set_caps["capabilities"]} == {"mapped-ram", "multifd"}
    else:
        assert migrate["uri"] == f"exec:cat > {files.memory}"
        assert "migrate-set-capabilities" not in [name for name, _ in machine.qmp.sent]
    assert [name for name, _ in machine.qmp.sent][-1] == "cont"
    # Restoring a mapped-ram snapshot defers the incoming side until the capability is set.
    cmd = QemuMachine(spec).command_line(incoming=files)
    assert arg_after(cmd, "-incoming") == ("defer" if stream == "mapped-ram" else f"exec:cat {files.memory}")


# ------------------------------------------------------------ which QEMU runs an L1


def _fake_qemu(path: Path, version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("line, version", [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", (7, 2)),
    ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", (10, 0)),
    ("something else", None),
])
def test_parse_qemu_version(line: str, version: tuple[int, int] | None) -> None:
    from harness.machines.qemu import parse_qemu_version

    assert parse_qemu_version(line) == version


def test_find_qemu_takes_the_system_one_when_it_fits_else_a_private_one(tmp_path: Path) -> None:
    from harness.machines.qemu import find_qemu, qemu_candidates

    system = str(_fake_qemu(tmp_path / "bin" / "qemu-system-x86_64", "7.2.22"))
    cache = tmp_path / "cache"
    newest = _fake_qemu(cache / "qemu" / "10.0.2" / "usr/bin/qemu-system-x86_64", "10.0.2")
    _fake_qemu(cache / "qemu" / "9.2.0" / "usr/bin/qemu-system-x86_64", "9.2.0")
    assert [v for _b, v in qemu_candidates(system, cache)] == [(7, 2), (10, 0), (9, 2)]
    assert find_qemu("", system, cache) == system
    assert find_qemu("<8", system, cache) == system
    assert find_qemu(">=8", system, cache) == str(newest)
    assert find_qemu(">=9,<10", system, cache).endswith("9.2.0/usr/bin/qemu-system-x86_64")
    with pytest.raises(MachineStartError, match=r"needs QEMU >=11 under TCG \(recipe x\).*7\.2.*\./setup"):
        find_qemu(">=11", system, cache, why="recipe x")


def test_machine_spec_uses_the_recipes_qemu_range_under_tcg_only(tmp_path: Path) -> None:
    from harness.accel import AccelChoice
    from harness.config import RunConfig, load_recipe
    from harness.host import qemu_for

    system = str(_fake_qemu(tmp_path / "bin" / "qemu-system-x86_64", "7.2.22"))
    private = _fake_qemu(tmp_path / "cache" / "qemu" / "10.0.2" / "usr/bin/qemu-system-x86_64", "10.0.2")
    cfg = RunConfig(qemu_binary=system, cache_dir=tmp_path / "cache")
    trixie = load_recipe("trixie")
    assert trixie.qemu_tcg, "trixie's recipe names the QEMU range its guests need under TCG"
    tcg = AccelChoice(accel="tcg", cpu="qemu64,+svm,+npt", reason="test")
    kvm = dataclasses.replace(tcg, accel="kvm", cpu="host")
    assert qemu_for(trixie, cfg, tcg) == str(private)
    assert qemu_for(trixie, cfg, kvm) == system
    assert qemu_for(load_recipe("bookworm"), cfg, tcg) == system
