"""The probe's dirty pages, read (dirty_scan) and written (write_page) through privcmd.

Layout (images/guests/probe.c, ``dirty_write``/``cursor_store``), little-endian:

* a dirty page: bytes 0..7 ``NXDIRTY1``, 8..23 the probe's nonce, 24..31 the
  generation, 32..39 the page's index in the buffer, 40..63 zero, then the 16-byte
  stamp of (nonce, generation, index) repeated to the end of the page.  The probe
  writes the body first and the header last, so a page caught mid-write holds the
  old header over a (partly) new body: its body does not match its header.
* the cursor page: ``NXCURSR1``, the nonce, then generation, cursor, writes and
  pages (u64 each at 24, 32, 40, 48). ``writes`` (completed page writes since
  the buffer was filled at generation 0) is stored last and is the authority.

dirty_scan maps the frames in batches with MMAPBATCH_V2 (mapping.py's ioctl), reads
every page that mapped, and answers per frame: the mapping error, whether the magic
is right, the nonce (an index into "nonces"), the generation, the index and whether
the body is the stamp of the header's own (nonce, generation, index).  Frames in a
row that differ only by an index one higher are one run, so a whole buffer in order
is a few runs: [position, count, error, magic_ok, nonce_ref, generation, index,
body_ok].  write_page maps one frame writable, returns its old bytes, and writes new
ones (the negative control of the dirty-page check).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import struct

from . import privcmd
from .abi import PRIVCMD_PATH, XEN_PAGE_SIZE
from .isolation import Channel
from .mapping import ioctl_mmapbatch_v2

DIRTY_MAGIC = b"NXDIRTY1"
CURSOR_MAGIC = b"NXCURSR1"
HEADER = struct.Struct("<8s16sQQ")  # magic, nonce, generation, index
CURSOR = struct.Struct("<8s16sQQQQ")  # magic, nonce, generation, cursor, writes, pages
BODY_OFFSET = 40
STAMP_OFFSET = 64
STAMP_TAG = 0x4E58444952545931  # "NXDIRTY1" read as a big-endian number
SCAN_BATCH = 1024  # frames per MMAPBATCH_V2 (a 4 MiB VMA)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stamp(nonce: bytes, generation: int, index: int) -> bytes:
    """probe.c dirty_stamp: 16 bytes from (nonce, generation, index)."""
    n0, n1 = struct.unpack("<QQ", nonce)
    a = _splitmix64(n0 ^ _splitmix64(n1 ^ _splitmix64(
        (generation & _MASK64) ^ _splitmix64((index & _MASK64) ^ STAMP_TAG))))
    return struct.pack("<QQ", a, _splitmix64(a))


def body(nonce: bytes, generation: int, index: int) -> bytes:
    """Bytes 40..4095 of a dirty page."""
    return bytes(STAMP_OFFSET - BODY_OFFSET) + stamp(nonce, generation, index) * (
        (XEN_PAGE_SIZE - STAMP_OFFSET) // 16)


def page_bytes(nonce: bytes, generation: int, index: int) -> bytes:
    """The 4096 bytes probe.c leaves in buffer page ``index`` after writing ``generation``."""
    return HEADER.pack(DIRTY_MAGIC, nonce, generation & _MASK64, index & _MASK64) + body(
        nonce, generation, index)


def parse_page(data: bytes) -> tuple[bool, bytes, int, int, bool]:
    """(magic_ok, nonce, generation, index, body_ok) of one page as found."""
    magic, nonce, generation, index = HEADER.unpack_from(data)
    body_ok = data[BODY_OFFSET:] == body(nonce, generation, index)
    return magic == DIRTY_MAGIC, nonce, generation, index, body_ok


def parse_cursor(data: bytes) -> dict:
    magic, nonce, generation, cursor, writes, pages = CURSOR.unpack_from(data)
    return {"magic_ok": magic == CURSOR_MAGIC, "nonce": nonce.hex(), "generation": generation,
            "cursor": cursor, "writes": writes, "pages": pages}


class RunBuilder:
    """Per-frame results folded into runs (see the module's docstring)."""

    def __init__(self) -> None:
        self.nonces: list = []
        self.runs: list = []

    def add(self, position: int, error, magic_ok=None, nonce=None, generation=None, index=None,
            body_ok=None) -> None:
        ref = None
        if nonce is not None:
            hex_nonce = nonce.hex()
            if hex_nonce not in self.nonces:
                self.nonces.append(hex_nonce)
            ref = self.nonces.index(hex_nonce)
        row = [position, 1, error, magic_ok, ref, generation, index, body_ok]
        last = self.runs[-1] if self.runs else None
        if (last is not None and last[0] + last[1] == position and last[2:6] == row[2:6]
                and last[7] == body_ok
                and (index is None if last[6] is None else index == last[6] + last[1])):
            last[1] += 1
        else:
            self.runs.append(row)


def _scan_batch(fd: int, domid: int, frames: list, first: int, runs: RunBuilder,
                chan: Channel) -> list:
    """Map one batch, parse every page that mapped; returns the pages' raw bytes when
    the caller wants one (the cursor page), else an empty list."""
    addr = privcmd.map_vma(fd, len(frames), "r")
    kept = []
    try:
        chan.stage("ioctl", ioctl="mmapbatch_v2", first=first, frames=len(frames))
        fields, mapped = ioctl_mmapbatch_v2(fd, domid, addr, frames)
        for i, frame in enumerate(frames):
            error = fields["errors"][i]
            if not mapped[i]:
                runs.add(first + i, error)
                continue
            chan.stage("touch", index=first + i, frame=frame)
            data = privcmd.read_page(addr + i * XEN_PAGE_SIZE)
            runs.add(first + i, 0, *parse_page(data))
            kept.append(data)
    finally:
        privcmd.unmap_vma(addr, len(frames))
    return kept


def body_dirty_scan(req: dict, chan: Channel) -> None:
    chan.stage("open", path=PRIVCMD_PATH)
    fd = privcmd.open_privcmd()
    try:
        if req["cursor_frame"] is not None:
            cursor = RunBuilder()
            pages = _scan_batch(fd, req["domid"], [req["cursor_frame"]], 0, cursor, chan)
            answer = parse_cursor(pages[0]) if pages else {}
            answer.update(frame=req["cursor_frame"], error=cursor.runs[0][2])
            chan.update(cursor=answer)
        runs = RunBuilder()
        frames = req["frames"]
        for start in range(0, len(frames), SCAN_BATCH):
            _scan_batch(fd, req["domid"], frames[start:start + SCAN_BATCH], start, runs, chan)
        chan.update(nonces=runs.nonces, runs=runs.runs)
    finally:
        os.close(fd)


def body_write_page(req: dict, chan: Channel) -> None:
    """Map one frame read-write, keep its old bytes, write the new ones, read them back."""
    new = base64.b64decode(req["bytes_b64"])
    chan.stage("open", path=PRIVCMD_PATH)
    fd = privcmd.open_privcmd()
    try:
        addr = privcmd.map_vma(fd, 1, "rw")
        try:
            chan.stage("ioctl", ioctl="mmapbatch_v2", frame=req["frame"])
            fields, mapped = ioctl_mmapbatch_v2(fd, req["domid"], addr, [req["frame"]])
            chan.update(rc=fields["rc"], errno=fields["errno"], errno_name=fields["errno_name"],
                        frame_error=fields["errors"][0], written=False)
            if not mapped[0]:
                return
            chan.stage("touch", frame=req["frame"])
            old = privcmd.read_page(addr)
            ctypes.memmove(addr, new, XEN_PAGE_SIZE)
            back = privcmd.read_page(addr)
            chan.update(old_b64=base64.b64encode(old).decode("ascii"), written=back == new,
                        sha256=hashlib.sha256(back).hexdigest())
        finally:
            privcmd.unmap_vma(addr, 1)
    finally:
        os.close(fd)
