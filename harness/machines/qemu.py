"""QEMU run directly as a child process, controlled over QMP.

The VM boots Xen through QEMU's multiboot loader (``-kernel xen -initrd
"vmlinuz args,initrd"``), its disk is a qcow2 overlay on the cached image, its
serial console goes to a file, and dom0's SSH is forwarded on 127.0.0.1 only,
with user networking restricted so dom0 can reach nothing outside this host.

QEMU is never daemonized (QMP migration to a file fails that way); it runs in
its own session so Ctrl-C reaches the harness, which stops it, and it gets
SIGKILL if the harness dies (PR_SET_PDEATHSIG). A registry of running VMs lets
the next run reap what a SIGKILLed run could not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from .. import timeouts as t
from ..dom0_layout import CHANNEL_NAME
from ..procs import pid_alive
from .base import LinkPorts, Machine, MachineError, MachineSpec, MachineStartError, SnapshotFiles
from .common import LINK_SLOT, create_overlay, die_with_parent, free_link, free_port
from .qemu_choice import (  # noqa: F401 (re-exported: callers import them from here)
    IOMMU_DEVICE,
    PRIVATE_QEMU_GLOB,
    VIRTIO_BEHIND_IOMMU,
    find_qemu,
    iommu_device,
    l1_iommu,
    parse_qemu_release,
    parse_qemu_version,
    qemu_candidates,
    qemu_version,
    qemu_version_label,
    with_iommu,
)

log = logging.getLogger(__name__)

NAME_PREFIX = "nested-xen-"
QMP_SOCKET_PREFIX = "nx-qmp-"
CHANNEL_SOCKET_PREFIX = "nx-chan-"
# The virtio-serial port dom0's nxchannel.py answers on: CHANNEL_NAME (harness/dom0_layout.py).
CHANNEL_SLOT = 0x5


class Registry:
    """Running VMs, one JSON file each, so a later run can reap orphans."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def add(self, name: str, qemu_pid: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps({"qemu_pid": qemu_pid, "owner_pid": os.getpid(), "name": name}))
        return path

    def reap(self) -> list[str]:
        """Kill VMs whose owning harness process is gone; return what was reaped."""
        reaped = []
        for entry in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(entry.read_text())
            except (OSError, ValueError):
                entry.unlink(missing_ok=True)
                continue
            if _alive(data.get("owner_pid", -1)):
                continue
            pid = data.get("qemu_pid", -1)
            if _alive(pid) and _is_our_qemu(pid, data.get("name", "")):
                log.warning("reaping VM %s (pid %s) left by a killed run", data.get("name"), pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                reaped.append(data.get("name", "?"))
            entry.unlink(missing_ok=True)
        self._reap_sockets()
        return reaped

    @staticmethod
    def _reap_sockets(tmp: Path = Path("/tmp")) -> None:
        """QMP and channel sockets (``nx-qmp-<harness pid>-<label>.sock``, ``nx-chan-...``)
        of harness runs that are gone."""
        for prefix in (QMP_SOCKET_PREFIX, CHANNEL_SOCKET_PREFIX):
            for sock in tmp.glob(f"{prefix}*.sock"):
                pid = sock.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    sock.unlink(missing_ok=True)


_alive = pid_alive


def _is_our_qemu(pid: int, name: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = name.encode()
    return any(arg == want or arg.startswith(want + b",") for arg in cmdline)


def command_line(spec: MachineSpec, port: int, link: LinkPorts, overlay: Path, serial_log: Path,
                 qmp_path: Path, channel_path: Path, incoming: SnapshotFiles | None = None) -> list[str]:
    """QEMU's command line for an L1 of ``spec``: dom0's SSH forwarded from ``port``, the
    link NIC on ``link``'s UDP ports, and these run files."""
    modules = ",".join(f"{m.path} {m.args}".strip() for m in spec.modules)
    for m in spec.modules:
        if "," in str(m.path) or "," in m.args:
            raise MachineStartError(f"multiboot module {m.path} or its args contain a comma")
    net = (
        f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"
    )
    cmd = [
        spec.qemu_binary,
        "-name", f"{NAME_PREFIX}{spec.name},debug-threads=on",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-machine", "pc",
        *spec.accel.qemu_args(),
        "-smp", str(spec.cpus),
        "-m", str(spec.memory_mb),
        "-kernel", str(spec.kernel),
        "-append", spec.append,
        "-initrd", modules,
        "-drive", f"if=none,id=disk0,file={overlay},format=qcow2,cache=unsafe",
        "-device", "virtio-blk-pci,drive=disk0,addr=0x4",
        "-netdev", net,
        "-device", "virtio-net-pci,netdev=net0,addr=0x3,mac=52:54:00:12:34:56",
        "-chardev", f"file,id=ser0,path={serial_log}",
        "-serial", "chardev:ser0",
        # dom0's nxchannel.py: answers as soon as a restored VM runs (no sshd fork,
        # no key exchange), and when SSH does not.
        "-device", f"virtio-serial-pci,id=vser0,addr={CHANNEL_SLOT:#x}",
        "-chardev", f"socket,id=nxchan,path={channel_path},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=nxchan,name={CHANNEL_NAME}",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    # Every L1 has the link NIC, linked or not, so that one snapshot serves both;
    # the netdev backend is not part of the migration stream.
    cmd += ["-netdev", f"socket,id=link0,udp=127.0.0.1:{link.peer},localaddr=127.0.0.1:{link.local}",
            "-device", f"virtio-net-pci,netdev=link0,addr={LINK_SLOT:#x},mac=52:54:00:12:35:01"]
    if spec.iommu:
        cmd = with_iommu(cmd, l1_iommu(spec))
    if incoming and incoming.stream == "mapped-ram":
        cmd += ["-incoming", "defer"]  # capabilities first, then migrate-incoming
    elif incoming:
        cmd += ["-incoming", f"exec:cat {shlex.quote(str(incoming.memory))}"]
    return cmd


def device_model(spec: MachineSpec) -> list[str]:
    """The parts of the command line a memory snapshot depends on (machine, CPU,
    devices), without run-specific paths, ports and backends: part of the snapshot key.
    Made from ``spec`` alone: no machine, no port taken."""
    here = Path("/nonexistent")
    cmd = command_line(spec, 0, LinkPorts(0, 0), here, here, here, here)
    keep = {"-machine", "-cpu", "-accel", "-device", "-smp", "-m", "-nodefaults"}
    return [f"{a} {b}" for a, b in zip(cmd, cmd[1:] + [""], strict=True) if a in keep]


class QemuMachine(Machine):
    """An L1 VM run by QEMU and controlled over its QMP socket."""

    def __init__(self, spec: MachineSpec, registry: Registry | None = None) -> None:
        self.spec = spec
        self.registry = registry
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.qmp = None
        self.run_dir = spec.run_dir
        self.overlay = self.run_dir / "disk.qcow2"
        self._registry_entry: Path | None = None
        self.started_at = 0.0
        self.link = spec.link or free_link()

    # ------------------------------------------------------------------ paths
    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def qmp_path(self) -> Path:
        # AF_UNIX paths are limited to 108 bytes: keep the socket short.
        return Path(f"/tmp/{QMP_SOCKET_PREFIX}{os.getpid()}-{self.spec.name}.sock")

    @property
    def channel_path(self) -> Path:
        return Path(f"/tmp/{CHANNEL_SOCKET_PREFIX}{os.getpid()}-{self.spec.name}.sock")

    @property
    def ssh_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    # ------------------------------------------------------------------ start
    def command_line(self, incoming: SnapshotFiles | None = None) -> list[str]:
        return command_line(self.spec, self.port, self.link, self.overlay, self.serial_log,
                            self.qmp_path, self.channel_path, incoming)

    def device_model(self) -> list[str]:
        return device_model(self.spec)

    def start(self, incoming: SnapshotFiles | None = None) -> None:
        if self.registry:
            self.registry.reap()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        backing, fmt = (incoming.disk, "qcow2") if incoming else (self.spec.disk, "raw")
        create_overlay(self.overlay, backing, fmt)
        for attempt in range(3):
            self.port = free_port()
            if self._launch(incoming, attempt):
                return
        raise MachineStartError(f"QEMU did not start; see {self.run_dir / 'qemu.log'}")

    def _launch(self, incoming: SnapshotFiles | None, attempt: int) -> bool:
        cmd = self.command_line(incoming)
        (self.run_dir / "qemu.cmdline").write_text(" ".join(cmd) + "\n")
        self.serial_log.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        self.channel_path.unlink(missing_ok=True)
        log.info("starting %s: %s", self.spec.name, " ".join(cmd))
        stderr = open(self.run_dir / "qemu.log", "w")  # noqa: SIM115 - owned by the child
        try:
            # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only a
            # QEMU started from the main thread gets it; others rely on the registry.
            on_main = threading.current_thread() is threading.main_thread()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True, preexec_fn=die_with_parent if on_main else None,
            )
        except FileNotFoundError:
            raise MachineStartError(
                f"{cmd[0]} is not installed: run `apt-get install qemu-system-x86`"
            ) from None
        finally:
            stderr.close()
        self.started_at = time.monotonic()
        if self.registry:
            self._registry_entry = self.registry.add(f"{NAME_PREFIX}{self.spec.name}", self.proc.pid)
        try:
            self._connect_qmp()
        except MachineStartError:
            text = (self.run_dir / "qemu.log").read_text(errors="replace")
            self._kill()
            if "Could not set up host forwarding" in text and attempt < 2:
                log.warning("port %d was taken; retrying with another", self.port)
                return False
            if "can't bind" in text and self.spec.link is None and attempt < 2:
                log.warning("link port %d was taken; retrying with another", self.link.local)
                self.link = free_link()
                return False
            raise MachineStartError(f"QEMU failed to start: {text.strip()[-2000:]}") from None
        return True

    def _connect_qmp(self, timeout: float = t.QMP_CONNECT_S) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol
        from qemu.qmp.protocol import ConnectError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive() is not None:
                raise MachineStartError("QEMU exited during start")
            if self.qmp_path.exists():
                qmp = QEMUMonitorProtocol(str(self.qmp_path))
                try:
                    qmp.connect()
                except (OSError, ConnectError):  # ConnectError: QEMU quit mid-handshake (bad option)
                    time.sleep(0.05)
                    continue
                qmp.settimeout(t.QMP_REPLY_S)
                self.qmp = qmp
                return
            time.sleep(0.05)
        raise MachineStartError("QMP socket did not appear")

    # ------------------------------------------------------------------ control
    def alive(self) -> str | None:
        if self.proc is None:
            return "not started"
        rc = self.proc.poll()
        if rc is None:
            return None
        if rc < 0:
            return f"killed by signal {-rc}"
        return f"exit status {rc}"

    def qmp_cmd(self, name: str, **args: object) -> object:
        if self.qmp is None:
            raise MachineError("QMP is not connected")
        try:
            return self.qmp.cmd(name, **args)
        except Exception as exc:  # noqa: BLE001 - qemu.qmp raises several unrelated types
            status = self.alive() or "still running"
            log_tail = (self.run_dir / "qemu.log").read_text(errors="replace")[-1500:].strip()
            raise MachineError(f"QMP {name} failed ({type(exc).__name__}: {exc}); QEMU {status}"
                               + (f"; qemu.log: {log_tail}" if log_tail else "")) from exc

    def wait_incoming(self, timeout: float = t.RESTORE_S, incoming: SnapshotFiles | None = None) -> float:
        """After start(incoming=...): wait until the VM runs; return seconds."""
        started = time.monotonic()
        if incoming is not None and incoming.stream == "mapped-ram":
            self._set_file_capabilities()
            self.qmp_cmd("migrate-incoming", uri=f"file:{incoming.memory}")
        while time.monotonic() - started < timeout:
            status = self.alive()
            if status is not None:
                raise MachineError(f"QEMU exited while restoring ({status}): "
                                   f"{(self.run_dir / 'qemu.log').read_text(errors='replace')[-1500:]}")
            state = self.qmp_cmd("query-status")["status"]  # type: ignore[index]
            if state == "running":
                return time.monotonic() - started
            if state in ("paused", "postmigrate", "prelaunch"):
                migrate = self.qmp_cmd("query-migrate")
                if state == "paused" or migrate.get("status") == "completed":  # type: ignore[union-attr]
                    self.qmp_cmd("cont")
            time.sleep(0.05)
        raise MachineError(f"restore did not finish within {timeout:.0f} s")

    def snapshot(self, dest_dir: Path) -> SnapshotFiles:
        """Save memory and freeze the disk; the VM keeps running on a new overlay.

        The current overlay becomes the read-only backing of a fresh one, so
        the frozen disk matches the memory stream exactly; it is then copied
        into ``dest_dir`` (written under temporary names by the caller).
        """
        dest_dir.mkdir(parents=True, exist_ok=True)
        memory = dest_dir / "memory"
        frozen = self.overlay
        fresh = self.run_dir / f"disk-{int(time.time() * 1000)}.qcow2"
        stream = self.file_migration()
        self.qmp_cmd("stop")
        try:
            self.qmp_cmd("blockdev-snapshot-sync", device="disk0",
                         **{"snapshot-file": str(fresh), "format": "qcow2"})
            self.overlay = fresh
            if stream == "mapped-ram":
                self._set_file_capabilities()
                self.qmp_cmd("migrate", uri=f"file:{memory}")
            else:
                self.qmp_cmd("migrate", uri=f"exec:cat > {shlex.quote(str(memory))}")
            self._wait_migration()
        finally:
            self.qmp_cmd("cont")
        disk = dest_dir / "disk.qcow2"
        shutil.copyfile(frozen, disk)
        return SnapshotFiles(memory=memory, disk=disk, stream=stream)

    def file_migration(self) -> str:
        """"mapped-ram" where this QEMU has the capability (>= 9.0), else "stream"."""
        caps = self.qmp_cmd("query-migrate-capabilities")
        names = {c["capability"] for c in caps}  # type: ignore[union-attr]
        return "mapped-ram" if "mapped-ram" in names else "stream"

    def _set_file_capabilities(self) -> None:
        caps = self.qmp_cmd("query-migrate-capabilities")
        names = {c["capability"] for c in caps}  # type: ignore[union-attr]
        wanted = [{"capability": "mapped-ram", "state": True}]
        if "multifd" in names:
            wanted.append({"capability": "multifd", "state": True})
        self.qmp_cmd("migrate-set-capabilities", capabilities=wanted)
        if "multifd" in names:
            self.qmp_cmd("migrate-set-parameters", **{"multifd-channels": max(2, self.spec.cpus)})

    def _wait_migration(self, timeout: float = t.SNAPSHOT_SAVE_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.qmp_cmd("query-migrate")
            status = info.get("status")  # type: ignore[union-attr]
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise MachineError(f"QEMU migration to file {status}: {info}")
            time.sleep(0.1)
        raise MachineError("QEMU migration to file did not complete")

    def stop(self) -> None:
        """Stop QEMU: QMP quit, then SIGTERM, then SIGKILL. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                if self.qmp is not None:
                    self.qmp.settimeout(t.QMP_QUIT_S)
                    self.qmp.cmd("quit")
            try:
                self.proc.wait(timeout=t.PROCESS_EXIT_S)
            except subprocess.TimeoutExpired:
                self._kill()
        self._close_qmp()
        if self._registry_entry:
            self._registry_entry.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        self.channel_path.unlink(missing_ok=True)
        for disk in self.run_dir.glob("disk*.qcow2"):
            disk.unlink(missing_ok=True)

    def _kill(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, t.SIGTERM_EXIT_S), (signal.SIGKILL, t.PROCESS_EXIT_S)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
        self._close_qmp()

    def _close_qmp(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
