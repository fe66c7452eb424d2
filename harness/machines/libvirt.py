"""L1 machines as transient libvirt domains, on this host or on a remote one.

``LibvirtMachine`` has QemuMachine's interface: the Provisioner boots, snapshots
and restores it the same way. What the domain XML says, and why:

* ``<domain type='qemu'>`` (TCG) or ``type='kvm'``, as accel.py chose; the TCG
  CPU is ``qemu64`` with the ``svm`` and ``npt`` features required (Xen gets
  HVM with HAP), KVM uses ``host-passthrough``. ACPI and APIC are on (libvirt
  passes ``-no-acpi`` otherwise); poweroff, reboot and crash destroy the domain.
* Xen boots through QEMU's multiboot loader from native ``<os>`` elements:
  ``<kernel>`` is xen, ``<cmdline>`` its command line, and ``<initrd>`` the
  module list ``"vmlinuz args,initrd.img"``. libvirt 9.0 hands ``<initrd>`` to
  ``-initrd`` verbatim (it is not a QemuOpts list, so the comma is not escaped;
  checked with ``virsh domxml-to-native qemu-argv``), so no passthrough is
  needed there. A comma inside a module path or its arguments is refused, as in
  the QEMU backend.
* The disk is a fresh qcow2 overlay on the cached image (``cache=unsafe``).
* Networking is **qemu:commandline passthrough**: ``-netdev user,restrict=on,
  hostfwd=tcp:127.0.0.1:PORT-:22`` plus ``-device virtio-net-pci``. libvirt
  9.0's ``<interface type='user'>`` is slirp without ``restrict=on`` and its
  ``<portForward>`` needs the passt backend, which bookworm's libvirt does not
  pair with slirp; the passthrough keeps exactly the QEMU backend's network:
  dom0 reaches nothing, only SSH is forwarded, on the libvirt host's 127.0.0.1.
* The serial console is a ``<serial type='pty'>`` read through libvirt's stream
  API (``virDomainOpenConsole``) by a thread that appends to ``serial.log`` in
  the run directory, so ``Machine.read_serial`` and the readiness stages work
  the same for a local and a remote URI. The domain is created paused, the
  console opened, then the domain resumed, so no output is lost.
* QEMU runs under a fixed DAC label without relabeling (``<seclabel
  type='static' model='dac' relabel='no'>``): for a local URI the harness's own
  uid:gid, like the QEMU backend runs QEMU as the user (the image cache under a
  private home stays readable and nothing gets chowned); for a remote URI the
  host's default QEMU uid:gid (its capabilities' DAC ``baselabel``), which owns
  the pool volumes the harness makes there. Relabeling must stay off: libvirt's
  DAC driver takes the whole ``<initrd>`` module list for one file and fails
  ("unable to stat: .../vmlinuz root=...,.../initrd.img").

Names are ``nx-<label>-<pid>`` and every domain carries ``<metadata>`` naming
its owner (host name, pid, the pid's start time). Before starting a domain, the
machine destroys leftover ``nx-`` domains whose owner on this host is gone (a
SIGKILLed run cannot destroy its domains: libvirtd, not the harness, is QEMU's
parent). Domains owned by another host are left alone.

Snapshots: ``snapshot()`` takes an external libvirt snapshot without metadata
(``virDomainSnapshotCreateXML`` with ``NO_METADATA``): libvirt pauses the VM,
writes its memory as a libvirt save image and moves the disk onto a new
overlay; the old overlay, frozen, is copied beside the memory. The VM keeps
running. A save image pins the domain's name and UUID (``virDomainRestore``
with a changed XML fails "Target domain name ... does not match source"), and
each restored L1 needs its own name, UUID, SSH port and overlay, so a restore
rewrites the image's XML header into a per-restore copy (``restore.save``,
deleted once the domain runs) and restores that with ``virDomainRestoreFlags``.

Remote URIs (``qemu+ssh://[user@]host[:port]/system``): the boot files and
the root filesystem are uploaded once per image into a storage pool
``nested-xen`` (a directory pool at ``/var/lib/libvirt/images/nested-xen``,
created if missing; sparse stream upload), each domain gets its own qcow2
overlay volume in that pool, the console comes through the libvirt stream, and
dom0's SSH is reached through an ``ssh -L`` tunnel to the forwarded port on
the remote host's 127.0.0.1, using the URI's user, port, ``keyfile``,
``known_hosts`` and ``no_verify`` parameters. Other transports (``+tcp``,
``+tls``) are refused: nothing could reach the forwarded port. L1 snapshots
are not taken over a remote URI (the run boots cold and says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shlex
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..procs import pid_alive
from .base import LinkPorts, Machine, MachineError, MachineSpec, MachineStartError, SnapshotFiles
from .qemu import LINK_SLOT, _die_with_parent, create_overlay, free_link, free_port

log = logging.getLogger(__name__)

NAME_PREFIX = "nx-"
OWNER_NS = "urn:nested-xen:owner"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
POOL_NAME = "nested-xen"
POOL_PATH = "/var/lib/libvirt/images/nested-xen"
NET_MAC = "52:54:00:12:34:56"
REMOTE_PORTS = (20000, 60999)
INSTALL_HINT = "pip install 'nested-xen[libvirt]'"
SNAPSHOT_FORMAT = "libvirt-save"  # SnapshotFiles.stream of this backend's snapshots

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("nx", OWNER_NS)


# --------------------------------------------------------------------------- libvirt access


def import_libvirt():
    """The libvirt module, or a MachineStartError saying how to install it."""
    try:
        import libvirt
    except ImportError:
        raise MachineStartError(
            f"the libvirt backend needs libvirt-python: {INSTALL_HINT} (it compiles against "
            "libvirt-dev with pkg-config and gcc; `./setup --libvirt` installs them)"
        ) from None
    # libvirt prints every error to stderr besides raising it; the harness reports them itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def connect(uri: str):
    """An open connection to ``uri``, or a MachineStartError that says what to do."""
    libvirt = import_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise MachineStartError(
            f"cannot connect to libvirt at {uri}: {_first_line(exc)}; "
            "start libvirtd (libvirtd -d) or pass --libvirt-uri"
        ) from None
    if conn is None:  # old bindings return None instead of raising
        raise MachineStartError(f"cannot connect to libvirt at {uri}; start libvirtd (libvirtd -d) "
                                "or pass --libvirt-uri")
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _error_code(exc: BaseException) -> int | None:
    get = getattr(exc, "get_error_code", None)
    return get() if get else None


@dataclass(frozen=True)
class LibvirtUri:
    """A libvirt URI, as far as the harness needs it: local or remote, and how to SSH there."""

    uri: str
    driver: str
    transport: str
    user: str | None
    host: str | None
    port: int | None
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, uri: str) -> LibvirtUri:
        parts = urlsplit(uri)
        if not parts.scheme:
            raise MachineStartError(f"{uri!r} is not a libvirt URI (e.g. qemu:///system, "
                                    "qemu+ssh://root@HOST/system)")
        driver, _, transport = parts.scheme.partition("+")
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return cls(uri, driver, transport, unquote(parts.username) if parts.username else None,
                   parts.hostname or None, parts.port, params)

    @property
    def remote(self) -> bool:
        """Is the libvirt host another machine (as far as the harness can tell)?

        Any host name counts, 127.0.0.1 included: the harness then talks to it
        only through libvirt and SSH, which is how the remote path is tested.
        """
        return bool(self.host)

    def ssh_base(self) -> list[str]:
        """``ssh`` with the URI's user, port, key and host-key options (no destination)."""
        if self.transport != "ssh":
            raise MachineStartError(
                f"{self.uri}: dom0's SSH is forwarded on the libvirt host's 127.0.0.1, which the "
                "harness reaches through SSH; use a qemu+ssh:// URI for a remote libvirt host"
            )
        cmd = [self.params.get("command", "ssh"), "-o", "BatchMode=yes"]
        if self.port:
            cmd += ["-p", str(self.port)]
        if self.user:
            cmd += ["-l", self.user]
        if self.params.get("keyfile"):
            cmd += ["-i", self.params["keyfile"]]
        if self.params.get("known_hosts"):
            cmd += ["-o", f"UserKnownHostsFile={self.params['known_hosts']}"]
        if self.params.get("no_verify") == "1":
            cmd += ["-o", "StrictHostKeyChecking=no"]
        return cmd


# --------------------------------------------------------------------------- ownership


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclass(frozen=True)
class Owner:
    """The harness process a domain belongs to."""

    host: str
    pid: int
    start: str = ""

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()) or "")

    def element(self, volumes: tuple[str, ...] = ()) -> ET.Element:
        return ET.Element(f"{{{OWNER_NS}}}owner", {
            "host": self.host, "pid": str(self.pid), "start": self.start, "volumes": ",".join(volumes),
        })

    def alive(self, hostname: str | None = None) -> bool | None:
        """True/False for an owner on this host; None for another host's (not ours to judge)."""
        if self.host != (hostname or socket.gethostname()):
            return None
        if not pid_alive(self.pid):
            return False
        now = process_start(self.pid)
        return not (self.start and now is not None and now != self.start)


def parse_owner(domain_xml_text: str) -> tuple[Owner | None, tuple[str, ...]]:
    """The owner recorded in a domain's ``<metadata>`` and the volumes it made."""
    try:
        root = ET.fromstring(domain_xml_text)
    except ET.ParseError:
        return None, ()
    el = root.find(f"metadata/{{{OWNER_NS}}}owner")
    if el is None:
        return None, ()
    try:
        owner = Owner(el.get("host", ""), int(el.get("pid", "-1")), el.get("start", ""))
    except ValueError:
        return None, ()
    volumes = tuple(v for v in el.get("volumes", "").split(",") if v)
    return owner, volumes


def domain_name(label: str, pid: int | None = None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return f"{NAME_PREFIX}{safe}-{os.getpid() if pid is None else pid}"


def reap_domains(conn, hostname: str | None = None) -> list[str]:
    """Destroy ``nx-`` domains whose owner on this host is gone; return their names.

    Domains without nested-xen metadata, or owned by a process on another host,
    are left alone. Overlay volumes a reaped domain recorded are deleted.
    """
    reaped = []
    for dom in conn.listAllDomains(0):
        try:
            name = dom.name()
            if not name.startswith(NAME_PREFIX):
                continue
            owner, volumes = parse_owner(dom.XMLDesc(0))
        except Exception:  # noqa: BLE001 - a domain that vanished meanwhile
            continue
        if owner is None or owner.alive(hostname) is not False:
            continue
        log.warning("reaping libvirt domain %s left by a killed run (pid %d on %s)",
                    name, owner.pid, owner.host)
        with contextlib.suppress(Exception):
            dom.destroy()
        for vol in volumes:
            _delete_volume(conn, vol)
        reaped.append(name)
    return reaped


def _delete_volume(conn, name: str) -> None:
    with contextlib.suppress(Exception):
        conn.storagePoolLookupByName(POOL_NAME).storageVolLookupByName(name).delete(0)


# --------------------------------------------------------------------------- domain XML


@dataclass(frozen=True)
class BootPaths:
    """Where the libvirt host finds the files (local paths, or pool volume paths)."""

    kernel: str
    modules: tuple[tuple[str, str], ...]  # (path, args)
    disk: str


def module_list(modules: tuple[tuple[str, str], ...]) -> str:
    """The multiboot module list for ``<initrd>``: ``"path args,path args"``."""
    for path, args in modules:
        if "," in path or "," in args:
            raise MachineStartError(f"multiboot module {path} or its args contain a comma")
    return ",".join(f"{path} {args}".strip() for path, args in modules)


def tcg_cpu(cpu: str) -> tuple[str, tuple[str, ...]]:
    """``qemu64,+svm,+npt`` -> (``qemu64``, (``svm``, ``npt``))."""
    model, *flags = cpu.split(",")
    bad = [f for f in flags if not f.startswith("+")]
    if bad:
        raise MachineStartError(f"CPU {cpu!r}: only +feature flags map to libvirt, not {bad}")
    return model, tuple(f[1:] for f in flags)


def net_args(port: int, link: LinkPorts) -> list[str]:
    """QEMU arguments for the NICs, as in the QEMU backend: the restricted user network
    with dom0's SSH forwarded, and the private link NIC (UDP on 127.0.0.1, PCI slot 6)."""
    return ["-netdev", f"user,id=nxnet0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", f"virtio-net-pci,netdev=nxnet0,addr=0x3,mac={NET_MAC}",
            "-netdev", f"socket,id=link0,udp=127.0.0.1:{link.peer},localaddr=127.0.0.1:{link.local}",
            "-device", f"virtio-net-pci,netdev=link0,addr={LINK_SLOT:#x},mac=52:54:00:12:35:01"]


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _set_commandline(root: ET.Element, args: list[str]) -> None:
    for old in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(old)
    cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)


def _set_owner(root: ET.Element, owner: Owner, volumes: tuple[str, ...]) -> None:
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        root.insert(2, meta)
    for old in meta.findall(f"{{{OWNER_NS}}}owner"):
        meta.remove(old)
    meta.append(owner.element(volumes))


def domain_xml(spec: MachineSpec, name: str, port: int, link: LinkPorts, paths: BootPaths,
               owner: Owner, volumes: tuple[str, ...] = (), dac_label: str | None = None,
               domain_uuid: str | None = None) -> str:
    """The transient domain's XML (see the module docstring for each choice)."""
    if spec.iommu:
        raise MachineStartError(
            "the libvirt backend has no IOMMU for a PVH dom0 yet (libvirt 9.0 has no AMD IOMMU "
            "model): use --backend qemu for --dom0 pvh")
    kvm = spec.accel.accel == "kvm"
    dom = ET.Element("domain", {"type": "kvm" if kvm else "qemu"})
    _sub(dom, "name", name)
    _sub(dom, "uuid", domain_uuid or str(uuid.uuid4()))
    _set_owner(dom, owner, volumes)
    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.cpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_el, "kernel", paths.kernel)
    _sub(os_el, "initrd", module_list(paths.modules))
    _sub(os_el, "cmdline", spec.append)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if kvm:
        _sub(dom, "cpu", mode="host-passthrough", check="none")
    else:
        model, flags = tcg_cpu(spec.accel.cpu)
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", model, fallback="forbid")
        for flag in flags:
            _sub(cpu, "feature", policy="require", name=flag)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")
    devices = _sub(dom, "devices")
    if os.path.isabs(spec.qemu_binary):
        _sub(devices, "emulator", spec.qemu_binary)
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe")
    _sub(disk, "source", file=paths.disk)
    _sub(disk, "target", dev="vda", bus="virtio")
    _sub(disk, "address", type="pci", domain="0x0000", bus="0x00", slot="0x04", function="0x0")
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    if dac_label:
        seclabel = _sub(dom, "seclabel", type="static", model="dac", relabel="no")
        _sub(seclabel, "label", dac_label)
    _set_commandline(dom, net_args(port, link))
    return ET.tostring(dom, encoding="unicode")


def rewrite_saved_xml(xml: str, name: str, port: int, link: LinkPorts, disk: str, owner: Owner,
                      volumes: tuple[str, ...] = ()) -> str:
    """A saved domain's XML made into a new L1: its own name, UUID, SSH port, overlay, owner.

    Everything else (devices, PCI addresses, CPU) stays as libvirt saved it,
    so QEMU loads the memory stream into the same machine.
    """
    root = ET.fromstring(xml)
    root.find("name").text = name  # type: ignore[union-attr]
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.SubElement(root, "uuid")
    uuid_el.text = str(uuid.uuid4())
    _set_owner(root, owner, volumes)
    target = None
    for d in root.iterfind("devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == "vda":
            target = d
    if target is None:
        raise MachineError("the saved domain has no vda disk")
    source = target.find("source")
    if source is None:
        source = ET.SubElement(target, "source")
    source.attrib = {"file": disk}
    for backing in target.findall("backingStore"):
        target.remove(backing)  # libvirt probes the new overlay's chain itself
    _set_commandline(root, net_args(port, link))
    return ET.tostring(root, encoding="unicode")


# --------------------------------------------------------------------------- save images

SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")  # magic, version, data_len, was_running, compressed, cookieOffset
SAVE_PAD = 64 * 1024  # libvirt leaves this much room for edited XML; so do we


@dataclass(frozen=True)
class SaveImage:
    """The header of a libvirt QEMU save image (also an external snapshot's memory file)."""

    version: int
    was_running: int
    xml: str
    cookie: bytes
    stream_offset: int  # where QEMU's migration stream starts


def read_save_image(path: Path) -> SaveImage:
    with open(path, "rb") as f:
        head = f.read(SAVE_HEADER.size)
        if len(head) < SAVE_HEADER.size:
            raise MachineError(f"{path}: too short for a libvirt save image")
        magic, version, data_len, was_running, compressed, cookie_offset = SAVE_HEADER.unpack(head)
        if magic != SAVE_MAGIC:
            raise MachineError(f"{path}: not a complete libvirt save image (magic {magic!r})")
        if version != 2 or compressed != 0:
            raise MachineError(f"{path}: save image version {version}, compression {compressed}: "
                               "only uncompressed version 2 is supported")
        data = f.read(data_len)
    xml_part = data[:cookie_offset] if cookie_offset else data
    cookie = data[cookie_offset:].split(b"\0", 1)[0] if cookie_offset else b""
    return SaveImage(version, was_running, xml_part.split(b"\0", 1)[0].decode(), cookie,
                     SAVE_HEADER.size + data_len)


def save_image_header(image: SaveImage, xml: str) -> bytes:
    """Header + XML (+ cookie) for a copy of ``image`` whose domain XML is ``xml``."""
    xml_bytes = xml.encode() + b"\0"
    cookie = image.cookie + b"\0" if image.cookie else b""
    payload = xml_bytes + cookie
    data_len = len(payload) + SAVE_PAD
    head = SAVE_HEADER.pack(SAVE_MAGIC, image.version, data_len, image.was_running, 0,
                            len(xml_bytes) if cookie else 0)
    return head + payload + b"\0" * SAVE_PAD


def write_restore_image(src: Path, image: SaveImage, xml: str, dest: Path) -> None:
    """Copy the save image ``src`` to ``dest`` with its domain XML replaced."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.write(save_image_header(image, xml))
        fin.seek(image.stream_offset)
        shutil.copyfileobj(fin, fout, 8 * 2**20)


# --------------------------------------------------------------------------- remote storage


def dac_baselabel(capabilities_xml: str, virt_type: str) -> str | None:
    """The uid:gid (``+64055:+64055``) the libvirt host runs QEMU as, from its capabilities."""
    root = ET.fromstring(capabilities_xml)
    for model in root.iterfind("host/secmodel"):
        if model.findtext("model") == "dac":
            for label in model.iterfind("baselabel"):
                if label.get("type") == virt_type:
                    return (label.text or "").strip() or None
    return None


def parse_dac_label(label: str) -> tuple[int, int]:
    """``+64055:+108`` -> (64055, 108)."""
    user, _, group = label.partition(":")
    try:
        return int(user.lstrip("+")), int(group.lstrip("+"))
    except ValueError:
        raise MachineStartError(f"DAC label {label!r} is not numeric uid:gid") from None


def volume_xml(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None = None,
               owner: tuple[int, int] | None = None, mode: str = "0644") -> str:
    vol = ET.Element("volume")
    _sub(vol, "name", name)
    _sub(vol, "capacity", str(capacity), unit="bytes")
    if backing is None:
        _sub(vol, "allocation", "0", unit="bytes")
    target = _sub(vol, "target")
    _sub(target, "format", type=fmt)
    if owner is not None:
        perms = _sub(target, "permissions")
        _sub(perms, "mode", mode)
        _sub(perms, "owner", str(owner[0]))
        _sub(perms, "group", str(owner[1]))
    if backing:
        store = _sub(vol, "backingStore")
        _sub(store, "path", backing[0])
        _sub(store, "format", type=backing[1])
    return ET.tostring(vol, encoding="unicode")


def _send_sparse(stream, fd: int, size: int) -> None:
    """Send the file ``fd`` over a sparse stream: holes travel as lengths, not zeros."""

    def read(_stream, nbytes: int, fd: int) -> bytes:
        return os.read(fd, nbytes)

    def hole(_stream, fd: int) -> list:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole up to the end
            return [False, size - pos]
        os.lseek(fd, pos, os.SEEK_SET)
        if data > pos:
            return [False, data - pos]
        end = os.lseek(fd, pos, os.SEEK_HOLE)
        os.lseek(fd, pos, os.SEEK_SET)
        return [True, end - pos]

    def skip(_stream, length: int, fd: int) -> int:
        os.lseek(fd, length, os.SEEK_CUR)
        return 0

    stream.sparseSendAll(read, hole, skip, fd)


class RemoteStore:
    """Boot files and overlays in the libvirt host's ``nested-xen`` storage pool.

    Volumes belong to ``owner`` (the uid:gid QEMU runs as there), so the domain
    needs no relabeling: libvirt's DAC relabeling would take the ``<initrd>``
    module list for one file name and fail to stat it.
    """

    def __init__(self, conn, libvirt_mod, owner: tuple[int, int] | None = None) -> None:
        self.conn, self.libvirt, self.owner = conn, libvirt_mod, owner
        self._pool = None

    def pool(self):
        if self._pool is None:
            try:
                pool = self.conn.storagePoolLookupByName(POOL_NAME)
            except self.libvirt.libvirtError:
                xml = (f"<pool type='dir'><name>{POOL_NAME}</name>"
                       f"<target><path>{POOL_PATH}</path></target></pool>")
                pool = self.conn.storagePoolCreateXML(xml, self.libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
            if not pool.isActive():
                pool.create(0)
            pool.refresh(0)
            self._pool = pool
        return self._pool

    def _vol(self, name: str):
        try:
            return self.pool().storageVolLookupByName(name)
        except self.libvirt.libvirtError:
            return None

    def upload(self, local: Path, name: str) -> str:
        """``local`` as volume ``name`` (uploaded once; a marker volume says it is complete)."""
        from filelock import FileLock

        size = local.stat().st_size
        digest = hashlib.sha256(f"{self.conn.getURI()} {name}".encode()).hexdigest()[:16]
        lock = Path("/tmp") / f"nx-libvirt-upload-{digest}.lock"
        with FileLock(str(lock)):
            vol, done = self._vol(name), self._vol(name + ".ok")
            if vol is not None and done is not None and vol.info()[1] == size and self._owned(vol):
                return vol.path()
            for stale in (vol, done):
                if stale is not None:
                    stale.delete(0)
            started = time.monotonic()
            vol = self.pool().createXML(volume_xml(name, size, "raw", owner=self.owner), 0)
            stream = self.conn.newStream(0)
            fd = os.open(local, os.O_RDONLY)
            try:
                vol.upload(stream, 0, size, self.libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
                _send_sparse(stream, fd, size)
                stream.finish()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.abort()
                with contextlib.suppress(Exception):
                    vol.delete(0)
                raise
            finally:
                os.close(fd)
            self.pool().createXML(volume_xml(name + ".ok", 0, "raw"), 0)
            log.info("uploaded %s to %s volume %s in %.1f s", local, self.conn.getURI(), name,
                     time.monotonic() - started)
            return vol.path()

    def _owned(self, vol) -> bool:
        if self.owner is None:
            return True
        target = ET.fromstring(vol.XMLDesc(0)).find("target/permissions")
        return target is not None and (target.findtext("owner"), target.findtext("group")) == tuple(
            str(i) for i in self.owner)

    def overlay(self, name: str, backing: str, capacity: int) -> str:
        old = self._vol(name)
        if old is not None:
            old.delete(0)
        xml = volume_xml(name, capacity, "qcow2", (backing, "raw"), owner=self.owner, mode="0600")
        return self.pool().createXML(xml, 0).path()

    def delete(self, name: str) -> None:
        vol = self._vol(name)
        if vol is not None:
            with contextlib.suppress(self.libvirt.libvirtError):
                vol.delete(0)


# --------------------------------------------------------------------------- SSH tunnel


class SshTunnel:
    """``ssh -L`` from a local port to the forwarded dom0 SSH port on the libvirt host."""

    def __init__(self, uri: LibvirtUri, remote_port: int, log_path: Path) -> None:
        self.uri, self.remote_port, self.log_path = uri, remote_port, log_path
        self.local_port = 0
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [*self.uri.ssh_base(), "-N", "-o", "ExitOnForwardFailure=yes",
                "-o", "ServerAliveInterval=15",
                "-L", f"127.0.0.1:{self.local_port}:127.0.0.1:{self.remote_port}", str(self.uri.host)]

    def open(self, timeout: float = 60.0, attempts: int = 3) -> None:
        self.local_port = free_port()
        cmd = self.command()
        log.info("SSH tunnel: %s", shlex.join(cmd))
        with open(self.log_path, "w") as out:
            on_main = threading.current_thread() is threading.main_thread()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent if on_main else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = self.log_path.read_text(errors="replace").strip()
                if "Address already in use" in said and attempts > 1:
                    # The free port was taken between free_port() and ssh's bind.
                    log.warning("SSH tunnel: local port %d was taken; another port", self.local_port)
                    return self.open(max(deadline - time.monotonic(), 5.0), attempts - 1)
                raise MachineStartError(f"SSH tunnel to {self.uri.host} exited: {said[-1000:]}")
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex(("127.0.0.1", self.local_port)) == 0:
                    return
            time.sleep(0.2)
        self.close()
        raise MachineStartError(f"SSH tunnel to {self.uri.host} did not listen within {timeout:.0f} s")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


# --------------------------------------------------------------------------- the machine


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
            if _error_code(exc) == getattr(self.libvirt, "VIR_ERR_NO_DOMAIN", -1):
                return f"domain {self.name} is gone (QEMU exited){self._qemu_log_hint()}"
            return f"libvirt: {_first_line(exc)}"
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

    def wait_incoming(self, timeout: float = 120.0, incoming: SnapshotFiles | None = None) -> float:
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
            self._pump.join(timeout=10)
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
