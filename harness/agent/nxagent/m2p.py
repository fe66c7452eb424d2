"""m2p: search Xen's machine-to-phys table for gfns (run in the child)."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import time

from . import privcmd
from .abi import (
    DOMID_XEN,
    HYPERVISOR_MEMORY_OP,
    IOCTL,
    M2P_CHUNK_FRAMES,
    M2P_ENTRIES_PER_CHUNK,
    M2P_ENTRIES_PER_PAGE,
    M2P_ENTRY_BYTES,
    M2P_FIND_GROUPS_MAX,
    M2P_MAX_EXTENTS,
    M2P_MIN_EXTENTS,
    M2P_REPORTED_EXTENTS,
    MAX_FRAMES,
    PRIVCMD_PATH,
    XEN_PAGE_SIZE,
    XENMEM_MACHPHYS_MFN_LIST,
    XENMEM_MAXIMUM_RAM_PAGE,
    PrivcmdHypercall,
    XenMachphysMfnList,
    c_xen_pfn_t,
)
from .errors import EnvironmentProblem, errno_name
from .isolation import Channel
from .mapping import ioctl_mmapbatch_v2


def hypercall(fd: int, op: int, *args: int) -> tuple[int, int]:
    """IOCTL_PRIVCMD_HYPERCALL: (the hypercall's return value, 0) or (-1, errno)."""
    call = PrivcmdHypercall(op=op)
    for i, value in enumerate(args):
        call.arg[i] = value
    return privcmd.privcmd_ioctl(fd, IOCTL["HYPERCALL"], call)


def _call_fields(rc: int, err: int) -> dict:
    return {"rc": rc, "errno": err or None, "errno_name": errno_name(err)}


def alloc_hypercall_buffer(length: int) -> tuple[int, int, int]:
    """Anonymous memory Xen can read and write at once: (addr, length, mlock errno).

    Every page is written first (present and writable: Xen does not fault pages
    in) and then locked; a failed mlock is reported, not fatal.
    """
    length = -(-length // XEN_PAGE_SIZE) * XEN_PAGE_SIZE
    try:
        addr = privcmd.mmap_raw(length, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
    except OSError as exc:
        raise EnvironmentProblem(
            "buffer", f"mmap of a {length}-byte hypercall buffer failed: {exc.strerror}", exc.errno
        ) from None
    ctypes.memset(addr, 0, length)
    return addr, length, privcmd.mlock_raw(addr, length)


def m2p_max_extents(max_page: int | None) -> int:
    """max_extents for XENMEM_machphys_mfn_list: generous, and enough for max_page MFNs."""
    needed = -(-(max_page or 0) // M2P_ENTRIES_PER_CHUNK)
    return min(max(M2P_MIN_EXTENTS, needed), M2P_MAX_EXTENTS)


def machphys_mfn_list(fd: int, max_extents: int) -> tuple[dict, list]:
    """memory_op(XENMEM_machphys_mfn_list): answer fields and the extent MFNs."""
    addr, length, mlock_err = alloc_hypercall_buffer(XEN_PAGE_SIZE + max_extents * 8)
    try:
        xmml = XenMachphysMfnList.from_address(addr)
        array_addr = addr + XEN_PAGE_SIZE
        slots = (c_xen_pfn_t * max_extents).from_address(array_addr)
        ctypes.memset(array_addr, 0xFF, max_extents * 8)  # a slot Xen left alone reads ~0
        xmml.max_extents = max_extents
        xmml.extent_start = array_addr
        xmml.nr_extents = 0
        rc, err = hypercall(fd, HYPERVISOR_MEMORY_OP, XENMEM_MACHPHYS_MFN_LIST, addr)
        nr = xmml.nr_extents
        extents = list(slots[:min(nr, max_extents)]) if rc == 0 else []
    finally:
        privcmd.munmap_raw(addr, length)
    fields = {
        "hypercall": dict(_call_fields(rc, err), cmd="XENMEM_machphys_mfn_list"),
        "buffer": {"bytes": length, "mlock_errno": mlock_err or None,
                   "mlock_errno_name": errno_name(mlock_err)},
        "max_extents": max_extents,
        "nr_extents": nr if rc == 0 else None,
        "extents": extents[:M2P_REPORTED_EXTENTS],
    }
    return fields, extents


def plan_m2p_extents(extents: list) -> list:
    """(index, mfn) of the extents worth mapping: the first occurrence of each MFN.

    For a 2 MiB stretch of the table with no memory behind it Xen repeats the
    previous extent's MFN (x86_64/mm.c: mfn = last_mfn); memory.h describes such
    gaps as MFN 0.  Either way the chunk holds other MFNs' entries, so skip it.
    """
    seen = set()
    plan = []
    for index, mfn in enumerate(extents):
        if mfn == 0 or mfn in seen:
            continue
        seen.add(mfn)
        plan.append((index, mfn))
    return plan


def read_memory(addr: int, length: int) -> bytes:
    """Copy mapped memory (an unmapped privcmd page would SIGBUS here)."""
    return ctypes.string_at(addr, length)


def m2p_segments(addr: int, plan: list, mapped: list, limit: int, chan: Channel | None = None):
    """(first MFN, bytes) for every run of mapped table pages, entries below `limit`.

    Extent plan[k] sits at VMA pages k*512 .. k*512+511 and holds the entries of
    MFNs index*262144 onwards.
    """
    for slot, (index, mfn) in enumerate(plan):
        base = index * M2P_ENTRIES_PER_CHUNK
        if base >= limit:
            break
        pages = min(M2P_CHUNK_FRAMES, -(-(limit - base) // M2P_ENTRIES_PER_PAGE))
        if chan is not None:
            chan.stage("scan", extent=index, mfn=mfn)
        first_page = slot * M2P_CHUNK_FRAMES
        page = 0
        while page < pages:
            if not mapped[first_page + page]:
                page += 1
                continue
            end = page
            while end < pages and mapped[first_page + end]:
                end += 1
            start_entry = base + page * M2P_ENTRIES_PER_PAGE
            stop_entry = min(base + end * M2P_ENTRIES_PER_PAGE, limit)
            data = read_memory(addr + (first_page + page) * XEN_PAGE_SIZE,
                               (stop_entry - start_entry) * M2P_ENTRY_BYTES)
            yield start_entry, data
            page = end


def _find_scan(data: bytes, first_mfn: int, groups: dict, hits: dict, cap: int) -> None:
    """One bytes.find pass per gfn >> 8 group: its 7 high bytes at entry offset 1."""
    for high, lows in groups.items():
        needle = (high << 8).to_bytes(8, "little")[1:]
        pos = data.find(needle, 1)
        while pos >= 0:
            if pos % M2P_ENTRY_BYTES == 1:  # aligned: the entry starts at pos - 1
                low = data[pos - 1]
                if low in lows:
                    found = hits[(high << 8) | low]
                    if len(found) < cap:
                        found.append(first_mfn + (pos >> 3))
                pos = data.find(needle, pos + M2P_ENTRY_BYTES)
            else:
                pos = data.find(needle, pos + 1)


def _set_scan(data: bytes, first_mfn: int, wanted: frozenset, hits: dict, cap: int) -> None:
    """One pass over every entry (as native u64: x86_64 is little-endian) against a set."""
    table = memoryview(data).cast("Q")
    for i in itertools.compress(range(len(table)), map(wanted.__contains__, table)):
        found = hits[table[i]]
        if len(found) < cap:
            found.append(first_mfn + i)


def scan_m2p(segments, gfns: list, max_candidates: int, method: str | None = None):
    """Search M2P entries for gfns; segments yields (first MFN, little-endian u64 bytes).

    Returns (candidates, truncated, info): gfn -> ascending MFNs whose entry is
    that gfn (at most max_candidates), the gfns that had more, and
    {"method", "segments", "entries"}.  INVALID/SHARED entries have bit 63 set and
    never equal a valid gfn.
    """
    groups: dict = {}
    for gfn in gfns:
        groups.setdefault(gfn >> 8, set()).add(gfn & 0xFF)
    if method is None:
        method = "find" if len(groups) <= M2P_FIND_GROUPS_MAX else "set"
    wanted = frozenset(gfns)
    hits: dict = {gfn: [] for gfn in gfns}
    cap = max_candidates + 1  # one more than reported tells "truncated"
    nsegments = entries = 0
    for first_mfn, data in segments:
        nsegments += 1
        entries += len(data) // M2P_ENTRY_BYTES
        if not gfns:
            continue
        if method == "find":
            _find_scan(data, first_mfn, groups, hits, cap)
        else:
            _set_scan(data, first_mfn, wanted, hits, cap)
    truncated = [gfn for gfn in gfns if len(hits[gfn]) > max_candidates]
    candidates = {gfn: sorted(found)[:max_candidates] for gfn, found in hits.items()}
    return candidates, truncated, {"method": method, "segments": nsegments, "entries": entries}


def _m2p_map_summary(fields: dict, frames: list, mapped: list) -> dict:
    errors = fields["errors"]
    counts: dict = {}
    first_error = None
    for i, error in enumerate(errors):
        if error != 0:
            name = errno_name(error) or str(error)
            counts[name] = counts.get(name, 0) + 1
            if first_error is None:
                first_error = {"index": i, "frame": frames[i], "error": error}
    valid = fields["per_frame_valid"]
    return {
        "call": "mmapbatch_v2",
        "domid": DOMID_XEN,
        "rc": fields["rc"],
        "errno": fields["errno"] or None,
        "errno_name": fields["errno_name"],
        "per_frame_valid": valid,
        "frames": len(frames),
        "mapped": sum(mapped),
        "errors_nonzero": sum(1 for e in errors if e != 0) if valid else None,
        "error_counts": counts if valid else None,
        "first_error": first_error if valid else None,
    }


def body_m2p(req: dict, chan: Channel) -> None:
    chan.stage("open", path=PRIVCMD_PATH)
    fd = privcmd.open_privcmd()
    try:
        chan.stage("hypercall", cmd="XENMEM_maximum_ram_page")
        rc, err = hypercall(fd, HYPERVISOR_MEMORY_OP, XENMEM_MAXIMUM_RAM_PAGE, 0)
        max_page = rc if rc > 0 else None  # one past the highest MFN
        chan.update(maximum_ram_page=_call_fields(rc, err), max_page=max_page,
                    max_mfn=max_page - 1 if max_page else None)

        max_extents = m2p_max_extents(max_page)
        chan.stage("hypercall", cmd="XENMEM_machphys_mfn_list", max_extents=max_extents)
        started = time.monotonic()
        fields, extents = machphys_mfn_list(fd, max_extents)
        plan = plan_m2p_extents(extents)
        fields["extent_holes"] = len(extents) - len(plan)
        fields["seconds"] = {"hypercall": round(time.monotonic() - started, 3)}
        chan.update(**fields)
        if fields["hypercall"]["rc"] != 0 or not plan:
            return

        limit = len(extents) * M2P_ENTRIES_PER_CHUNK
        if max_page is not None:
            limit = min(limit, max_page)
        plan = [(index, mfn) for index, mfn in plan if index * M2P_ENTRIES_PER_CHUNK < limit]
        expected = sum(min(M2P_ENTRIES_PER_CHUNK, limit - index * M2P_ENTRIES_PER_CHUNK)
                       for index, _ in plan)
        frames = [mfn + k for _, mfn in plan for k in range(M2P_CHUNK_FRAMES)]
        if len(frames) > MAX_FRAMES:
            raise EnvironmentProblem(
                "map", f"the M2P table spans {len(frames)} frames, more than {MAX_FRAMES}"
            )
        chan.stage("mmap", npages=len(frames))
        addr = privcmd.map_vma(fd, len(frames), "r")
        try:
            chan.stage("ioctl", ioctl="mmapbatch_v2", domid=DOMID_XEN, frames=len(frames))
            started = time.monotonic()
            map_fields, mapped = ioctl_mmapbatch_v2(fd, DOMID_XEN, addr, frames)
            fields["seconds"]["map"] = round(time.monotonic() - started, 3)
            chan.update(map=_m2p_map_summary(map_fields, frames, mapped),
                        seconds=fields["seconds"])

            started = time.monotonic()
            segments = m2p_segments(addr, plan, mapped, limit, chan)
            candidates, truncated, info = scan_m2p(segments, req["gfns"], req["max_candidates"])
            fields["seconds"]["scan"] = round(time.monotonic() - started, 3)
            info.update(limit=limit, expected_entries=expected)
            chan.update(
                candidates={str(gfn): mfns for gfn, mfns in candidates.items()},
                truncated=truncated,
                complete=info["entries"] == expected,
                scan=info,
                seconds=fields["seconds"],
            )
        finally:
            chan.stage("munmap")
            privcmd.unmap_vma(addr, len(frames))
    finally:
        os.close(fd)


