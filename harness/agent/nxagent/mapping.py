"""The mapping calls (MMAPBATCH_V2, MMAPBATCH, MMAP, restrict then map) and /dev/mem reads.

The ``body_*`` functions run in the forked child (isolation.py).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import mmap
import os

from . import abi, privcmd
from .abi import (
    ERR_SENTINEL,
    IOCTL,
    PRIVCMD_MMAPBATCH_MFN_ERROR,
    PRIVCMD_MMAPBATCH_PAGED_ERROR,
    PRIVCMD_PATH,
    XEN_PAGE_SIZE,
    PrivcmdMmap,
    PrivcmdMmapBatch,
    PrivcmdMmapBatchV2,
    PrivcmdMmapEntry,
    c_domid_t,
    c_xen_pfn_t,
)
from .errors import EnvironmentProblem, errno_name
from .isolation import Channel


def _ioctl_fields(rc: int, err: int, errors: list) -> dict:
    return {
        "rc": rc,
        "errno": err,
        "errno_name": errno_name(err),
        "errors": errors,
        "error_names": [errno_name(e) for e in errors],
    }


def ioctl_mmapbatch_v2(fd: int, domid: int, addr: int, frames: list) -> tuple[dict, list]:
    """IOCTL_PRIVCMD_MMAPBATCH_V2: per-frame 0/-errno in a separate int array."""
    n = len(frames)
    size = max(n, 1)
    arr = (c_xen_pfn_t * size)(*frames)
    errs = (ctypes.c_int * size)(*([ERR_SENTINEL] * size))
    arg = PrivcmdMmapBatchV2(
        num=n, dom=domid, addr=addr, arr=ctypes.addressof(arr), err=ctypes.addressof(errs)
    )
    rc, err = privcmd.privcmd_ioctl(fd, IOCTL["MMAPBATCH_V2"], arg)
    raw = [None if errs[i] == ERR_SENTINEL else errs[i] for i in range(n)]
    valid = rc >= 0 or err == errno.ENOENT
    errors = raw if valid else [None] * n
    fields = _ioctl_fields(rc, err, errors)
    fields.update(per_frame_valid=valid, raw_errors=raw)
    return fields, [e == 0 for e in errors]


def decode_v1_frame(orig: int, raw: int) -> tuple[int | None, str]:
    """Decode one frame of an MMAPBATCH (v1) array after the call.

    The kernel ORs PRIVCMD_MMAPBATCH_PAGED_ERROR (0x80000000) into the frame for
    -ENOENT and PRIVCMD_MMAPBATCH_MFN_ERROR (0xf0000000) for any other error;
    the errno itself is lost, so mfn_error is reported as -EINVAL (the value
    libxenforeignmemory substitutes).  Returns (error, status) with status in
    ok, paged, mfn_error, error_ambiguous, ambiguous, unexpected.
    """
    if raw == orig:
        if orig & PRIVCMD_MMAPBATCH_PAGED_ERROR:
            return None, "ambiguous"  # an error would not have changed this frame
        return 0, "ok"
    as_mfn_error = raw == orig | PRIVCMD_MMAPBATCH_MFN_ERROR
    as_paged = raw == orig | PRIVCMD_MMAPBATCH_PAGED_ERROR
    if as_mfn_error and as_paged:
        return None, "error_ambiguous"
    if as_paged:
        return -errno.ENOENT, "paged"
    if as_mfn_error:
        return -errno.EINVAL, "mfn_error"
    return None, "unexpected"


def ioctl_mmapbatch_v1(fd: int, domid: int, addr: int, frames: list) -> tuple[dict, list]:
    """IOCTL_PRIVCMD_MMAPBATCH: errors come back as bits ORed into the frame array."""
    n = len(frames)
    size = max(n, 1)
    arr = (c_xen_pfn_t * size)(*frames)
    arg = PrivcmdMmapBatch(num=n, dom=domid, addr=addr, arr=ctypes.addressof(arr))
    rc, err = privcmd.privcmd_ioctl(fd, IOCTL["MMAPBATCH"], arg)
    raw = [arr[i] for i in range(n)]
    decoded = [decode_v1_frame(frames[i], raw[i]) for i in range(n)]
    valid = rc >= 0 or err == errno.ENOENT
    errors = [d[0] for d in decoded] if valid else [None] * n
    fields = _ioctl_fields(rc, err, errors)
    fields.update(
        per_frame_valid=valid, raw_frames=raw, v1_status=[d[1] for d in decoded]
    )
    return fields, [e == 0 for e in errors]


def ioctl_mmap(fd: int, domid: int, addr: int, frames: list) -> tuple[dict, list]:
    """IOCTL_PRIVCMD_MMAP: one {va, mfn, npages=1} entry per frame, one rc for all."""
    n = len(frames)
    entries = (PrivcmdMmapEntry * max(n, 1))()
    for i in range(n):
        entries[i].va = addr + i * XEN_PAGE_SIZE
        entries[i].mfn = frames[i]
        entries[i].npages = 1
    arg = PrivcmdMmap(num=n, dom=domid, entry=ctypes.addressof(entries))
    rc, err = privcmd.privcmd_ioctl(fd, IOCTL["MMAP"], arg)
    fields = _ioctl_fields(rc, err, [None] * n)
    fields["per_frame_valid"] = False
    # The kernel stops at the first failing entry: only rc == 0 says all are mapped.
    return fields, [rc >= 0] * n


MAPPERS = {
    "mmapbatch_v2": ioctl_mmapbatch_v2,
    "mmapbatch": ioctl_mmapbatch_v1,
    "mmap": ioctl_mmap,
}


def touch_pages(addr: int, frames: list, mapped: list, want: str, chan: Channel) -> None:
    """Hash (and maybe copy) every page whose frame mapped; never touch the others."""
    if want == "none":
        return
    for i in range(len(frames)):
        if not mapped[i]:
            continue
        chan.stage("touch", index=i, frame=frames[i])
        data = privcmd.read_page(addr + i * XEN_PAGE_SIZE)
        page = {"sha256": hashlib.sha256(data).hexdigest(), "touched": True}
        if want == "bytes":
            page["bytes_b64"] = base64.b64encode(data).decode("ascii")
        chan.page(i, **page)


def map_and_report(call: str, fd: int, req: dict, chan: Channel) -> None:
    frames = req["frames"]
    npages = max(len(frames), 1)  # an empty batch still gets a (one-page) VMA
    chan.stage("mmap", npages=npages)
    addr = privcmd.map_vma(fd, npages, req["prot"])
    try:
        chan.stage("ioctl", ioctl=call)
        fields, mapped = MAPPERS[call](fd, req["domid"], addr, frames)
        fields["pages"] = [
            {"frame": frames[i], "mapped": mapped[i], "sha256": None, "bytes_b64": None,
             "touched": False}
            for i in range(len(frames))
        ]
        chan.update(**fields)
        touch_pages(addr, frames, mapped, req["want"], chan)
    finally:
        chan.stage("munmap")
        privcmd.unmap_vma(addr, npages)


def body_map(req: dict, chan: Channel) -> None:
    chan.stage("open", path=PRIVCMD_PATH)
    fd = privcmd.open_privcmd()
    try:
        map_and_report(req["command"], fd, req, chan)
    finally:
        os.close(fd)


def body_restrict_then_map(req: dict, chan: Channel) -> None:
    chan.stage("open", path=PRIVCMD_PATH)
    fd = privcmd.open_privcmd()
    try:
        results = []
        for domid in req["restrict_domids"]:
            chan.stage("restrict", domid=domid)
            rc, err = privcmd.privcmd_ioctl(fd, IOCTL["RESTRICT"], c_domid_t(domid))
            results.append({"domid": domid, "rc": rc, "errno": err, "errno_name": errno_name(err)})
            chan.update(restrict=results)
        map_and_report(req["map_call"], fd, req, chan)
    finally:
        os.close(fd)


def _pread_all(fd: int, offset: int, length: int) -> tuple[bytes, int]:
    parts = []
    got = 0
    while got < length:
        try:
            chunk = os.pread(fd, min(length - got, 1 << 20), offset + got)
        except OSError as exc:
            return b"".join(parts), exc.errno
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts), 0


def _mmap_read(fd: int, address: int, length: int) -> tuple[bytes, int]:
    start = address - address % mmap.PAGESIZE
    delta = address - start
    size = -(-(delta + length) // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        view = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
    except OSError as exc:
        return b"", exc.errno
    try:
        return view[delta:delta + length], 0
    finally:
        view.close()


def body_devmem(req: dict, chan: Channel) -> None:
    chan.stage("open", path=abi.DEVMEM_PATH)
    try:
        fd = os.open(abi.DEVMEM_PATH, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentProblem(
            "open", f"cannot open {abi.DEVMEM_PATH}: {exc.strerror}", exc.errno
        ) from None
    try:
        chan.stage("read", method=req["method"], address=req["address"], length=req["length"])
        if req["method"] == "pread":
            data, err = _pread_all(fd, req["address"], req["length"])
        else:
            data, err = _mmap_read(fd, req["address"], req["length"])
    finally:
        os.close(fd)
    fields = {
        "rc": -1 if err else len(data),
        "errno": err,
        "errno_name": errno_name(err),
        "bytes_read": len(data),
        "complete": len(data) == req["length"],
        "sha256": hashlib.sha256(data).hexdigest() if data or not err else None,
    }
    if req["want"] == "bytes":
        fields["bytes_b64"] = base64.b64encode(data).decode("ascii")
    chan.update(**fields)


