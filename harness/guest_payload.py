"""Build the L2 guest initramfs: busybox, the memory probe and a tiny /init.

The archive is written by a pure-Python cpio "newc" writer, so neither root
(for the device nodes) nor the ``cpio`` tool is needed. ``/init`` mounts the
pseudo filesystems, prints ``NXPROBE-INIT up`` and starts ``/probe`` with its
output on the console; the probe reads its options (``nxprobe.pages=`` etc.)
from the kernel command line. See images/guests/probe.c and
harness/probe_report.py for the console protocol.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .timeouts import COMPILE_S

if TYPE_CHECKING:
    from .config import RunConfig
    from .dom0_files import GuestPayload
    from .imaging import HostImage

PROBE_SOURCE = Path(__file__).resolve().parent.parent / "images" / "guests" / "probe.c"
PAYLOAD_VERSION = 1
PROBE_CFLAGS = ("-static", "-O2", "-Wall", "-Wextra")
GZIP_LEVEL = 6
COMPILE_TIMEOUT_S = COMPILE_S  # why: harness/timeouts.py

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"

# Applets /init uses, plus a few for poking at a guest by hand.
BUSYBOX_APPLETS = (
    "sh", "mount", "umount", "sleep", "cat", "echo", "mkdir", "ls", "ps", "dmesg",
    "uname", "free", "kill", "true", "false", "poweroff", "reboot", "sync", "grep",
)  # fmt: skip

# (path, major, minor): nodes /init and the probe need before devtmpfs is up.
DEVICE_NODES = (
    ("dev/console", 5, 1),
    ("dev/null", 1, 3),
    ("dev/urandom", 1, 9),
    ("dev/hvc0", 229, 0),
    ("dev/ttyS0", 4, 64),
)

INIT_SCRIPT = """\
#!/bin/sh
# nested-xen L2 guest init: start the memory probe, then idle forever.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
# Keep the probe's locked pages where they are (best effort).
echo 0 > /proc/sys/vm/compact_unevictable_allowed 2>/dev/null || true
echo never > /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || true
echo "NXPROBE-INIT up" > /dev/console
/probe > /dev/console 2>&1 &
while :; do sleep 3600; done
"""


class GuestPayloadError(RuntimeError):
    """The guest payload could not be built; the message says what to install or fix."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``name`` is relative (no leading slash)."""

    name: str
    mode: int  # file type bits | permission bits, as in st_mode
    data: bytes = b""  # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _newc_member(ino: int, entry: CpioEntry) -> bytes:
    """Header, NUL-terminated name and data, each padded to 4 bytes."""
    name = entry.name.lstrip("/").encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
        0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
    )  # fmt: skip
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def newc_cpio_bytes(entries: Iterable[CpioEntry]) -> bytes:
    """An uncompressed newc archive of entries (uid/gid 0, mtime 0), with trailer."""
    members = [_newc_member(ino, entry) for ino, entry in enumerate(entries, start=1)]
    members.append(_newc_member(0, CpioEntry(TRAILER_NAME, 0)))
    return b"".join(members)


def write_newc_cpio(
    entries: Iterable[CpioEntry], out_path: Path, *, gzip_level: int | None = GZIP_LEVEL
) -> Path:
    """Write entries as a newc archive, gzipped unless gzip_level is None.

    Parents must come before their children. The file is replaced atomically.
    """
    data = newc_cpio_bytes(entries)
    if gzip_level is not None:
        data = gzip.compress(data, compresslevel=gzip_level, mtime=0)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out_path)
    return out_path


def _is_dynamic_elf(data: bytes) -> bool:
    """True if data is an ELF with a PT_INTERP segment (dynamically linked)."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise GuestPayloadError("not an ELF executable")
    is64 = data[4] == 2
    order = "<" if data[5] == 1 else ">"
    if is64:
        (phoff,) = struct.unpack_from(order + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    else:
        (phoff,) = struct.unpack_from(order + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
    for i in range(phnum):
        offset = phoff + i * phentsize
        if offset + 4 > len(data):
            break
        if struct.unpack_from(order + "I", data, offset)[0] == 3:  # PT_INTERP
            return True
    return False


def _read_static_binary(path: Path, what: str, fix: str) -> bytes:
    """Read an executable that must run without a libc in the initramfs."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GuestPayloadError(f"cannot read {what} at {path}: {exc}; {fix}") from exc
    try:
        dynamic = _is_dynamic_elf(data)
    except GuestPayloadError as exc:
        raise GuestPayloadError(f"{what} at {path}: {exc}; {fix}") from None
    if dynamic:
        raise GuestPayloadError(
            f"{what} at {path} is dynamically linked and cannot run in the guest initramfs; {fix}"
        )
    return data


def initramfs_entries(busybox: bytes, probe: bytes) -> list[CpioEntry]:
    """The guest initramfs layout, parents before children."""
    entries = [CpioEntry.directory(name) for name in ("bin", "dev", "proc", "sys", "tmp")]
    entries.append(CpioEntry.file("bin/busybox", busybox, 0o755))
    entries += [CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS]
    entries += [CpioEntry.chardev(name, major, minor) for name, major, minor in DEVICE_NODES]
    entries.append(CpioEntry.file("probe", probe, 0o755))
    entries.append(CpioEntry.file("init", INIT_SCRIPT.encode(), 0o755))
    return entries


def build_guest_initramfs(busybox: Path, probe: Path, out: Path) -> Path:
    """Write a gzipped newc initramfs with busybox, the probe and /init to out."""
    busybox_data = _read_static_binary(
        busybox, "busybox", "install the static one: apt-get install busybox-static"
    )
    probe_data = _read_static_binary(
        probe, "probe", f"build it with compile_probe() from {PROBE_SOURCE}"
    )
    return write_newc_cpio(initramfs_entries(busybox_data, probe_data), Path(out))


def compile_probe(src: Path, out: Path, cc: str = "gcc") -> Path:
    """Compile probe.c statically; raise GuestPayloadError saying what to install."""
    hint = "install it with: apt-get install gcc libc6-dev (libc6-dev has the static libc)"
    compiler = shutil.which(cc)
    if compiler is None:
        raise GuestPayloadError(f"C compiler {cc!r} not found; {hint}")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [compiler, *PROBE_CFLAGS, "-o", str(tmp), str(src)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestPayloadError(f"running {' '.join(cmd)} failed: {exc}; {hint}") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise GuestPayloadError(
            f"compiling {src} with {cc} failed (exit {proc.returncode}); if the error is "
            f"about missing headers or libc.a, {hint}\n{proc.stderr.strip()}"
        )
    os.replace(tmp, out)
    return out


def guest_payload_for(cfg: RunConfig) -> Callable[[HostImage], GuestPayload]:
    """A function building (and caching) the guest payload for an image: keyed by the
    probe's source, this module, the image's busybox and PAYLOAD_VERSION."""
    from .dom0_files import GuestPayload

    def build(image: HostImage) -> GuestPayload:
        h = hashlib.sha256()
        for path in (PROBE_SOURCE, Path(__file__), image.busybox):
            h.update(path.read_bytes())
        h.update(str(PAYLOAD_VERSION).encode())
        out = cfg.resolved_cache_dir() / "guests" / f"{image.name}-{image.key}-{h.hexdigest()[:12]}"
        initramfs = out / "initramfs.gz"
        if not initramfs.exists():
            tmp = out.with_name(out.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            probe = compile_probe(PROBE_SOURCE, tmp / "probe")
            build_guest_initramfs(image.busybox, probe, tmp / "initramfs.gz")
            tmp.rename(out)
        return GuestPayload(kernel=image.guest_kernel, initramfs=initramfs)

    return build
