"""``LibvirtMachine``: an L1 VM run as a transient libvirt domain (the package
docstring says how)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import threading
import time
import uuid
from pathlib import Path

from ... import timeouts as t
from ..base import Machine, MachineError, MachineSpec, MachineStartError, SnapshotFiles
from ..common import create_overlay, free_link, free_port
from .domain_xml import BootPaths, domain_xml, rewrite_saved_xml
from .ownership import Owner, domain_name, reap_domains
from .save_image import read_save_image, write_restore_image
from .storage import RemoteStore, dac_baselabel, parse_dac_label
from .tunnel import SshTunnel
from .uri import LibvirtUri, connect, error_code, first_line, import_libvirt

log = logging.getLogger("harness.machines.libvirt")  # one logger for the backend

REMOTE_PORTS = (20000, 60999)
SNAPSHOT_FORMAT = "libvirt-save"  # SnapshotFiles.stream of this backend's snapshots


class LibvirtMachine(Machine):
    """An L1 VM run as a transient libvirt domain (see the module docstring)."""

    def __init__(self, spec: MachineSpec, uri: str = "qemu:///system") -> None:
        self.spec = spec
        self.uri = LibvirtUri.parse(uri)
        self.run_dir = spec.run_dir
        self.name = domain_name(spec.name)
        self.overlay = self.run_dir / "disk.qcow2"  # local URIs
        self.port = 0  # dom0's SSH on the libvirt host's 127.0.0.1
        self.link = spec.link or free_link()
        self.conn = None
        self.dom = None
        self.libvirt = None
        self.volumes: list[str] = []  # remote volumes this machine made
        self.tunnel: SshTunnel | None = None
        self._console = None
        self._console_conn = None
        self._pump: threading.Thread | None = None
        self._remote_label: str | None = None
        self.started_at = 0.0

    # ------------------------------------------------------------------ paths
    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def ssh_address(self) -> tuple[str, int]:
        if self.tunnel is not None:
            return ("127.0.0.1", self.tunnel.local_port)
        return ("127.0.0.1", 0 if self.uri.remote else self.port)

    @property
    def remote(self) -> bool:
        return self.uri.remote

    # ------------------------------------------------------------------ start
    def _connect(self):
        if self.conn is None:
            self.libvirt = import_libvirt()
            self.conn = connect(self.uri.uri)
        return self.conn

    def _dac_label(self) -> str:
        """Who QEMU runs as, with no relabeling: this user for a local URI, the libvirt
        host's own QEMU user for a remote one (it owns the pool volumes we make)."""
        if not self.remote:
            return f"+{os.getuid()}:+{os.getgid()}"
        if self._remote_label is None:
            virt_type = "kvm" if self.spec.accel.accel == "kvm" else "qemu"
            self._remote_label = dac_baselabel(self.conn.getCapabilities(), virt_type) or "+0:+0"
        return self._remote_label

    def _pick_port(self) -> int:
        return random.randint(*REMOTE_PORTS) if self.remote else free_port()

    def _boot_paths(self, incoming: SnapshotFiles | None) -> BootPaths:
        spec = self.spec
        if not self.remote:
            backing, fmt = (incoming.disk, "qcow2") if incoming else (spec.disk, "raw")
            create_overlay(self.overlay, backing, fmt)
            return BootPaths(str(spec.kernel), tuple((str(m.path), m.args) for m in spec.modules),
                             str(self.overlay))
        if incoming:
            raise MachineError("L1 snapshots are not restored over a remote libvirt URI")
        store = RemoteStore(self.conn, self.libvirt, parse_dac_label(self._dac_label()))

        def up(path: Path) -> str:
            return store.upload(path, f"{path.parent.name}-{path.name}")

        kernel = up(spec.kernel)
        modules = tuple((up(m.path), m.args) for m in spec.modules)
        rootfs = up(spec.disk)
        vol = f"{self.name}.qcow2"
        self.volumes.append(vol)
        disk = store.overlay(vol, rootfs, spec.disk.stat().st_size)
        return BootPaths(kernel, modules, disk)

    def domain_xml(self, paths: BootPaths) -> str:
        return domain_xml(self.spec, self.name, self.port, self.link, paths, Owner.me(),
                          tuple(self.volumes), self._dac_label())

    def start(self, incoming: SnapshotFiles | None = None) -> None:
        conn = self._connect()
        reap_domains(conn)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log.unlink(missing_ok=True)
        paths = self._boot_paths(incoming)
        for attempt in range(3):
            self.port = self._pick_port()
            try:
                self.dom = self._restore(incoming, paths) if incoming else self._create(paths)
                break
            except self.libvirt.libvirtError as exc:
                if "host forwarding" in str(exc) and attempt < 2:
                    log.warning("port %d was taken on the libvirt host; retrying with another", self.port)
                    continue
                if "can't bind" in str(exc) and self.spec.link is None and attempt < 2:
                    log.warning("link port %d was taken; retrying with another", self.link.local)
                    self.link = free_link()
                    continue
                self._cleanup_files()
                raise MachineStartError(f"libvirt could not start {self.name} at {self.uri.uri}: "
                                        f"{str(exc).strip()[-2000:]}") from None
        self.started_at = time.monotonic()
        try:
            self._open_console()
            self.dom.resume()
            if self.remote:
                self.tunnel = SshTunnel(self.uri, self.port, self.run_dir / "ssh-tunnel.log")
                self.tunnel.open()
        except BaseException:
            self.stop()
            raise

    def _create(self, paths: BootPaths):
        xml = self.domain_xml(paths)
        (self.run_dir / "domain.xml").write_text(xml + "\n")
        log.info("creating libvirt domain %s at %s", self.name, self.uri.uri)
        return self.conn.createXML(xml, self.libvirt.VIR_DOMAIN_START_PAUSED)

    def _restore(self, incoming: SnapshotFiles, paths: BootPaths):
        if incoming.stream != SNAPSHOT_FORMAT:
            raise MachineStartError(f"{incoming.memory} is a {incoming.stream!r} snapshot, not a libvirt one")
        image = read_save_image(incoming.memory)
        xml = rewrite_saved_xml(image.xml, self.name, self.port, self.link, paths.disk, Owner.me(),
                                tuple(self.volumes))
        (self.run_dir / "domain.xml").write_text(xml + "\n")
        restore_file = self.run_dir / "restore.save"
        write_restore_image(incoming.memory, image, xml, restore_file)
        log.info("restoring libvirt domain %s from %s", self.name, incoming.memory)
        try:
            self.conn.restoreFlags(str(restore_file), None, self.libvirt.VIR_DOMAIN_SAVE_PAUSED)
        finally:
            restore_file.unlink(missing_ok=True)
        return self.conn.lookupByName(self.name)

    def _open_console(self) -> None:
        # The console gets a connection of its own: a blocking stream recv in the pump
        # thread and the main thread's calls on one shared client were seen to hang
        # (virDomainGetState never returned while the pump waited for console data).
        self._console_conn = connect(self.uri.uri)
        dom = self._console_conn.lookupByName(self.name)
        stream = self._console_conn.newStream(0)
        dom.openConsole(None, stream, self.libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self._console = stream
        self._pump = threading.Thread(target=self._pump_console, args=(stream,), daemon=True,
                                      name=f"console-{self.name}")
        self._pump.start()

    def _pump_console(self, stream) -> None:
        with open(self.serial_log, "ab") as out:
            while True:
                try:
                    data = stream.recv(65536)
                except Exception:  # noqa: BLE001 - the stream ends when the domain goes
                    return
                if not isinstance(data, bytes) or not data:
                    return
                out.write(data)
                out.flush()

    # ------------------------------------------------------------------ control
    def alive(self) -> str | None:
        if self.dom is None:
            return "not started"
        try:
            state, reason = self.dom.state()
        except Exception as exc:  # noqa: BLE001 - libvirtError, or a dropped connection
            if error_code(exc) == getattr(self.libvirt, "VIR_ERR_NO_DOMAIN", -1):
                return f"domain {self.name} is gone (QEMU exited){self._qemu_log_hint()}"
            return f"libvirt: {first_line(exc)}"
        lv = self.libvirt
        if state in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_PAUSED, lv.VIR_DOMAIN_BLOCKED):
            return None
        return f"domain state {state} (reason {reason}){self._qemu_log_hint()}"

    def _qemu_log_hint(self) -> str:
        path = Path("/var/log/libvirt/qemu") / f"{self.name}.log"
        if self.remote or not path.exists():
            return ""
        with contextlib.suppress(OSError):
            tail = path.read_text(errors="replace").strip().splitlines()[-5:]
            return f"; {path}: " + " | ".join(tail)
        return ""

    def wait_incoming(self, timeout: float = t.RESTORE_S, incoming: SnapshotFiles | None = None) -> float:
        """After start(incoming=...): libvirt restored synchronously; check it runs."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            status = self.alive()
            if status is not None:
                raise MachineError(f"restored domain stopped: {status}")
            if self.dom.state()[0] == self.libvirt.VIR_DOMAIN_RUNNING:
                return time.monotonic() - started
            time.sleep(0.05)
        raise MachineError(f"restore did not finish within {timeout:.0f} s")

    def snapshot(self, dest_dir: Path) -> SnapshotFiles:
        """External libvirt snapshot: memory to ``dest_dir``, disk frozen, VM keeps running."""
        if self.remote:
            raise MachineError("L1 snapshots are not taken over a remote libvirt URI")
        if self.dom is None:
            raise MachineError("the domain is not running")
        dest_dir.mkdir(parents=True, exist_ok=True)
        memory = dest_dir / "memory"
        frozen = self.overlay
        fresh = self.run_dir / f"disk-{int(time.time() * 1000)}.qcow2"
        xml = (f"<domainsnapshot><name>nx-snap-{uuid.uuid4().hex[:8]}</name>"
               f"<memory snapshot='external' file='{memory}'/>"
               f"<disks><disk name='vda' snapshot='external' type='file'>"
               f"<driver type='qcow2'/><source file='{fresh}'/></disk></disks></domainsnapshot>")
        flags = self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA | \
            self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        try:
            self.dom.snapshotCreateXML(xml, flags)
        except self.libvirt.libvirtError as exc:
            raise MachineError(f"libvirt snapshot of {self.name} failed: {exc}") from None
        self.overlay = fresh
        disk = dest_dir / "disk.qcow2"
        shutil.copyfile(frozen, disk)
        return SnapshotFiles(memory=memory, disk=disk, stream=SNAPSHOT_FORMAT)

    def stop(self) -> None:
        """Destroy the domain (a transient one disappears), close streams, remove overlays."""
        if self.dom is not None:
            with contextlib.suppress(Exception):
                self.dom.destroy()
        if self._console is not None:
            with contextlib.suppress(Exception):
                self._console.abort()
            self._console = None
        if self._pump is not None:
            self._pump.join(timeout=t.PROCESS_EXIT_S)
            self._pump = None
        if self._console_conn is not None:
            with contextlib.suppress(Exception):
                self._console_conn.close()
            self._console_conn = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        self._cleanup_files()
        self.dom = None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def _cleanup_files(self) -> None:
        for disk in self.run_dir.glob("disk*.qcow2"):
            disk.unlink(missing_ok=True)
        (self.run_dir / "restore.save").unlink(missing_ok=True)
        if self.volumes and self.conn is not None:
            store = RemoteStore(self.conn, self.libvirt)
            for vol in self.volumes:
                store.delete(vol)
            self.volumes.clear()
