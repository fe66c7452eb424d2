"""Storage on a remote libvirt host: the ``nested-xen`` pool, sparse uploads of the
boot files and root filesystem, per-domain overlay volumes, and the DAC label
QEMU runs as there."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ..base import MachineStartError

log = logging.getLogger("harness.machines.libvirt")  # one logger for the backend

POOL_NAME = "nested-xen"
POOL_PATH = "/var/lib/libvirt/images/nested-xen"


def sub_element(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    """A child element (the volume XML here and the domain XML use it)."""
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


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
    sub_element(vol, "name", name)
    sub_element(vol, "capacity", str(capacity), unit="bytes")
    if backing is None:
        sub_element(vol, "allocation", "0", unit="bytes")
    target = sub_element(vol, "target")
    sub_element(target, "format", type=fmt)
    if owner is not None:
        perms = sub_element(target, "permissions")
        sub_element(perms, "mode", mode)
        sub_element(perms, "owner", str(owner[0]))
        sub_element(perms, "group", str(owner[1]))
    if backing:
        store = sub_element(vol, "backingStore")
        sub_element(store, "path", backing[0])
        sub_element(store, "format", type=backing[1])
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
        """``local`` as volume ``name``, uploaded once per build of that file: a marker
        volume ``<name>.ok-<stamp>`` says the upload is complete and which file it holds
        (its size and mtime). A rebuilt image keeps its name and often its size (a sparse
        ext4 of a fixed size) but not its content -- its dom0 SSH key is new -- so the
        name and size alone would boot the old rootfs, whose dom0 refuses the new key."""
        from filelock import FileLock

        st = local.stat()
        size = st.st_size
        marker = f"{name}.ok-{hashlib.sha256(f'{size} {st.st_mtime_ns}'.encode()).hexdigest()[:12]}"
        digest = hashlib.sha256(f"{self.conn.getURI()} {name}".encode()).hexdigest()[:16]
        lock = Path("/tmp") / f"nx-libvirt-upload-{digest}.lock"
        with FileLock(str(lock)):
            vol, done = self._vol(name), self._vol(marker)
            if vol is not None and done is not None and vol.info()[1] == size and self._owned(vol):
                return vol.path()
            markers = [self._vol(v) for v in self.pool().listVolumes()
                       if v == f"{name}.ok" or v.startswith(f"{name}.ok-")]
            for stale in (vol, *markers):
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
            self.pool().createXML(volume_xml(marker, 0, "raw"), 0)
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
