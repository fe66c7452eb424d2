#!/usr/bin/env python3
"""nxagent: probe Xen's foreign-memory mapping ioctls from dom0.

Copied alone into dom0 (as /usr/local/lib/nested-xen/nxagent.py) and run as
root::

    python3 nxagent.py COMMAND < request.json

It reads one JSON object on stdin and writes exactly one JSON object on stdout.
Exit status: 0 an answer was produced (even when an ioctl failed, or the machine
lacks /dev/xen/privcmd: read "ok", "error", "rc" and "errno"); 2 the request was
invalid ({"ok": false, "error": ...}); 1 an internal error (a JSON answer is
still printed).

Commands: info, mmapbatch_v2, mmapbatch, mmap, restrict_then_map, devmem, p2m,
m2p, batch.  Every call that maps or reads memory runs in a forked child, so a SIGBUS
or SIGSEGV while touching a page becomes {"crashed": {...}} instead of a lost
agent, and a hung call is killed after "timeout_s" seconds ({"timed_out": true}).

Standard library only, Python 3.9+ (Debian bookworm and trixie dom0s).

Kernel behaviour relied on (Linux drivers/xen/privcmd.c, the same in 6.1 and
6.12): MMAPBATCH_V2 zeroes the caller's err[] once its arguments pass the
checks, then stores 0 or a negative errno per frame.  Once it got that far the
ioctl returns 0 even if every frame failed -- except -1/ENOENT when (PV dom0) a
512-frame block's final remap hypercall failed with -ENOENT.  -1 with another
errno (EINVAL for an empty batch or a bad VMA, EPERM for a restricted fd,
EFAULT) means it failed as a whole and err[] says nothing.  MMAPBATCH (v1) ORs
0xf0000000, or 0x80000000 for -ENOENT, into the frame array itself.  MMAP
stops at the first failing entry and returns its error.  Touching a page of the
VMA that was not mapped raises SIGBUS (privcmd_fault), so only pages whose
per-frame error is 0 after a successful call are read.

m2p searches Xen's machine-to-phys table (one 8-byte entry per MFN holding the
pfn/gfn its owner uses for it) for given gfns.  It asks Xen where the table
lives with IOCTL_PRIVCMD_HYPERCALL (memory_op XENMEM_machphys_mfn_list: one MFN
per 2 MiB chunk, i.e. 512 consecutive frames), maps those frames read-only with
MMAPBATCH_V2 from DOMID_XEN (Xen shares them read-only with privileged domains,
x86_64/mm.c subarch_init_memory) and scans entries below XENMEM_maximum_ram_page
(Xen's max_page, one past the highest MFN).  On a PV dom0 Xen reads and writes
the hypercall's buffers at the process's virtual addresses, so they live in an
anonymous mapping created, written and mlock()ed in the child before the call.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import faulthandler
import fcntl
import glob
import hashlib
import itertools
import json
import mmap
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback

AGENT_VERSION = "1.0"

PRIVCMD_PATH = "/dev/xen/privcmd"
DEVMEM_PATH = "/dev/mem"
SYS_HYPERVISOR = "/sys/hypervisor"

XEN_PAGE_SIZE = 4096
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 3600.0
MAX_FRAMES = 1 << 20
MAX_DEVMEM_LENGTH = 64 << 20
U64_MAX = (1 << 64) - 1
DOMID_MAX = 0xFFFF  # domid_t is 16 bits
REAP_GRACE_S = 5.0

# A positive value the kernel never stores in err[] (it stores 0 or -errno):
# finding it after the call means the kernel never reached clear_user().
ERR_SENTINEL = 0x7FFFFFFF

# ---------------------------------------------------------------------------
# ioctl numbers: _IOC(dir, type, nr, size) from include/uapi/asm-generic/ioctl.h
# (x86 uses the generic layout: nr 8 bits, type 8, size 14, dir 2).
# ---------------------------------------------------------------------------
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_SIZEMASK = (1 << 14) - 1
_IOC_NONE = 0


def ioc(direction: int, type_char: str, nr: int, size: int) -> int:
    """The Linux _IOC() macro."""
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (ord(type_char) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


# ---------------------------------------------------------------------------
# Structures of include/uapi/xen/privcmd.h (x86_64: xen_pfn_t is unsigned long,
# domid_t is uint16_t, pointers are 64-bit).
# ---------------------------------------------------------------------------
c_domid_t = ctypes.c_uint16
c_xen_pfn_t = ctypes.c_uint64


class PrivcmdHypercall(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint64), ("arg", ctypes.c_uint64 * 5)]


class PrivcmdMmapEntry(ctypes.Structure):
    _fields_ = [("va", ctypes.c_uint64), ("mfn", ctypes.c_uint64), ("npages", ctypes.c_uint64)]


class PrivcmdMmap(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("dom", c_domid_t), ("entry", ctypes.c_void_p)]


class PrivcmdMmapBatch(ctypes.Structure):
    _fields_ = [
        ("num", ctypes.c_int),
        ("dom", c_domid_t),
        ("addr", ctypes.c_uint64),
        ("arr", ctypes.c_void_p),  # xen_pfn_t *: error bits are ORed in on return
    ]


class PrivcmdMmapBatchV2(ctypes.Structure):
    _fields_ = [
        ("num", ctypes.c_uint),
        ("dom", c_domid_t),
        ("addr", ctypes.c_uint64),
        ("arr", ctypes.c_void_p),  # const xen_pfn_t *
        ("err", ctypes.c_void_p),  # int *: 0 or -errno per frame
    ]


class PrivcmdDmOp(ctypes.Structure):
    _fields_ = [("dom", c_domid_t), ("num", ctypes.c_uint16), ("ubufs", ctypes.c_void_p)]


class XenMachphysMfnList(ctypes.Structure):
    """struct xen_machphys_mfn_list (memory.h; XEN_GUEST_HANDLE is a pointer on x86_64)."""

    _fields_ = [
        ("max_extents", ctypes.c_uint),
        ("extent_start", ctypes.c_uint64),  # xen_pfn_t *: filled with one MFN per 2 MiB chunk
        ("nr_extents", ctypes.c_uint),
    ]


class PrivcmdMmapResource(ctypes.Structure):
    _fields_ = [
        ("dom", c_domid_t),
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("idx", ctypes.c_uint32),
        ("num", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
    ]


# (name, nr, argument type): every privcmd ioctl uses _IOC_NONE and type 'P'.
IOCTL_TABLE = (
    ("HYPERCALL", 0, PrivcmdHypercall),
    ("MMAP", 2, PrivcmdMmap),
    ("MMAPBATCH", 3, PrivcmdMmapBatch),
    ("MMAPBATCH_V2", 4, PrivcmdMmapBatchV2),
    ("DM_OP", 5, PrivcmdDmOp),
    ("RESTRICT", 6, c_domid_t),
    ("MMAP_RESOURCE", 7, PrivcmdMmapResource),
)
IOCTL = {name: ioc(_IOC_NONE, "P", nr, ctypes.sizeof(argtype)) for name, nr, argtype in IOCTL_TABLE}
# Xen's tools header: an ioctl no kernel implements, used to learn the errno
# the driver answers for unknown ioctls (ENOTTY today, EINVAL on old kernels).
IOCTL["UNIMPLEMENTED"] = ioc(_IOC_NONE, "P", 0xFF, 0)

PRIVCMD_MMAPBATCH_MFN_ERROR = 0xF0000000
PRIVCMD_MMAPBATCH_PAGED_ERROR = 0x80000000

MAP_CALLS = ("mmapbatch_v2", "mmapbatch", "mmap")
WANTS = ("sha256", "bytes", "none")
PROTS = ("r", "rw")
DEVMEM_METHODS = ("pread", "mmap")

# ---------------------------------------------------------------------------
# Xen public interface (xen/include/public, the same in 4.17 and 4.20; x86_64)
# ---------------------------------------------------------------------------
HYPERVISOR_MEMORY_OP = 12  # xen.h: __HYPERVISOR_memory_op
XENMEM_MAXIMUM_RAM_PAGE = 2  # memory.h: arg NULL; returns max_page, never an error
XENMEM_MACHPHYS_MFN_LIST = 5  # memory.h: arg = struct xen_machphys_mfn_list *
DOMID_XEN = 0x7FF2  # xen.h: the page owner of Xen's own (shared) frames
M2P_CHUNK_BYTES = 1 << 21  # one extent of XENMEM_machphys_mfn_list: an L2 superpage
M2P_CHUNK_FRAMES = M2P_CHUNK_BYTES // XEN_PAGE_SIZE  # 512
M2P_ENTRY_BYTES = 8  # unsigned long on x86_64
M2P_ENTRIES_PER_CHUNK = M2P_CHUNK_BYTES // M2P_ENTRY_BYTES  # 262144 MFNs per extent
M2P_ENTRIES_PER_PAGE = XEN_PAGE_SIZE // M2P_ENTRY_BYTES  # 512
INVALID_M2P_ENTRY = U64_MAX  # asm/mm.h: ~0UL
SHARED_M2P_ENTRY = U64_MAX - 1  # asm/mm.h: ~0UL - 1UL
# An entry with bit 63 set is never a valid gfn (asm/mm.h VALID_M2P()).
MAX_GFN = (1 << 63) - 1
M2P_MIN_EXTENTS = 4096  # 8 GiB of table, 1 Gi MFNs (4 TiB of RAM)
M2P_MAX_EXTENTS = 1 << 20
M2P_REPORTED_EXTENTS = 16
DEFAULT_MAX_CANDIDATES = 64
MAX_CANDIDATES_LIMIT = 1 << 16
M2P_DEFAULT_TIMEOUT_S = 120.0
# Distinct (gfn >> 8) groups up to which m2p searches with bytes.find (one pass
# per group); more than that and one pass over all entries against a set wins.
M2P_FIND_GROUPS_MAX = 6


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
class RequestError(Exception):
    """The request is malformed: answer {"ok": false, "error": ...}, exit 2."""


class EnvironmentProblem(Exception):
    """The machine cannot run the call (no device, mmap refused...): ok=false, exit 0."""

    def __init__(self, stage: str, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.err = err

    def to_answer(self) -> dict:
        # Own keys, so the failing syscall's errno is never read as the ioctl's.
        return {
            "ok": False,
            "error": str(self),
            "error_stage": self.stage,
            "error_errno": self.err,
            "error_errno_name": errno_name(self.err),
        }


def errno_name(value: int | None) -> str | None:
    """'ENOENT' for 2 or -2; None for 0, None or an unknown number."""
    if not value:
        return None
    return errno.errorcode.get(abs(value))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


# ---------------------------------------------------------------------------
# libc mmap/munmap (the mmap module cannot give the address of a read-only map)
# ---------------------------------------------------------------------------
_libc = None
MAP_FAILED = ctypes.c_void_p(-1).value


def libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mlock.restype = ctypes.c_int
        lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def mmap_raw(length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
    """mmap(2); returns the address or raises OSError."""
    addr = libc().mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


def munmap_raw(addr: int, length: int) -> None:
    libc().munmap(addr, length)


def mlock_raw(addr: int, length: int) -> int:
    """mlock(2); returns 0 or the errno."""
    if libc().mlock(addr, length) == 0:
        return 0
    return ctypes.get_errno()


def prot_bits(prot: str) -> int:
    return mmap.PROT_READ | (mmap.PROT_WRITE if prot == "rw" else 0)


# ---------------------------------------------------------------------------
# privcmd access: small functions so unit tests can replace them with fakes.
# ---------------------------------------------------------------------------
def open_privcmd() -> int:
    try:
        return os.open(PRIVCMD_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentProblem(
            "open", f"cannot open {PRIVCMD_PATH}: {exc.strerror}", exc.errno
        ) from None


def map_vma(fd: int, npages: int, prot: str) -> int:
    """A MAP_SHARED mapping of the privcmd device: the VMA the ioctls fill."""
    try:
        return mmap_raw(npages * XEN_PAGE_SIZE, prot_bits(prot), mmap.MAP_SHARED, fd)
    except OSError as exc:
        raise EnvironmentProblem(
            "mmap",
            f"mmap of {npages} page(s) on {PRIVCMD_PATH} failed: {exc.strerror}",
            exc.errno,
        ) from None


def unmap_vma(addr: int, npages: int) -> None:
    munmap_raw(addr, npages * XEN_PAGE_SIZE)


def privcmd_ioctl(fd: int, request: int, arg) -> tuple[int, int]:
    """One ioctl with a ctypes argument; returns (rc, errno) as C sees them."""
    try:
        return fcntl.ioctl(fd, request, arg, True), 0
    except OSError as exc:
        return -1, exc.errno


def read_page(addr: int) -> bytes:
    """Copy one page out of the mapping (this is where an unmapped page SIGBUSes)."""
    return ctypes.string_at(addr, XEN_PAGE_SIZE)


# ---------------------------------------------------------------------------
# Child process isolation
# ---------------------------------------------------------------------------
class Channel:
    """Child side of the pipe: newline-delimited JSON events for the parent.

    {"stage": {...}} says what the child is about to do (kept for crash reports),
    {"set": {...}} merges fields into the answer, {"page": {"index": i, ...}}
    fills one page entry, {"fail": {...}} ends the call with ok=false, and
    {"done": true} says the child finished normally.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, **event) -> None:
        data = (json.dumps(event) + "\n").encode()
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def stage(self, name: str, **info) -> None:
        info["name"] = name
        self.send(stage=info)

    def update(self, **fields) -> None:
        self.send(set=fields)

    def page(self, index: int, **fields) -> None:
        fields["index"] = index
        self.send(page=fields)


def _child_main(body, req: dict, read_fd: int, write_fd: int) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        os.close(read_fd)
        if faulthandler.is_enabled():
            faulthandler.disable()
        for sig in (signal.SIGBUS, signal.SIGSEGV):
            signal.signal(sig, signal.SIG_DFL)
        chan = Channel(write_fd)
        try:
            body(req, chan)
        except EnvironmentProblem as exc:
            chan.send(fail=exc.to_answer())
        except Exception as exc:
            chan.send(fail={
                "ok": False,
                "error": f"internal error in child: {exc!r}",
                "traceback": traceback.format_exc(),
            })
            code = 1
        chan.send(done=True)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _collect(read_fd: int, timeout_s: float) -> tuple[bytes, bool]:
    """Read the child's events until EOF or the deadline; (data, timed_out)."""
    deadline = time.monotonic() + timeout_s
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)


def _reap(pid: int, grace_s: float) -> int | None:
    """waitpid() with a deadline: a child stuck in the kernel may not die at once."""
    deadline = time.monotonic() + grace_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _parse_events(data: bytes) -> list[dict]:
    events = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(event, dict):
            events.append(event)
    return events


def run_isolated(body, req: dict, base: dict) -> dict:
    """Run body(req, channel) in a forked child and build the answer from its events.

    `base` holds the answer's default fields. A child killed by a signal gives
    "crashed": {"signal", "name", "stage"}; one still running after
    req["timeout_s"] is SIGKILLed and gives "timed_out": true.
    """
    answer = dict(base)
    answer.setdefault("ok", True)
    answer["crashed"] = None
    answer["timed_out"] = False
    answer["stage"] = None
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child_main(body, req, read_fd, write_fd)
    os.close(write_fd)
    try:
        data, timed_out = _collect(read_fd, req.get("timeout_s", DEFAULT_TIMEOUT_S))
    finally:
        os.close(read_fd)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # EOF means the child is exiting; after SIGKILL a child stuck in the kernel
    # may take a while, so do not wait for it forever.
    status = _reap(pid, REAP_GRACE_S) if timed_out else os.waitpid(pid, 0)[1]
    return _assemble(answer, _parse_events(data), status, timed_out, pid)


def _assemble(answer: dict, events: list, status: int | None, timed_out: bool, pid: int) -> dict:
    stage = None
    done = False
    for event in events:
        if "stage" in event:
            stage = event["stage"]
        if "set" in event:
            answer.update(event["set"])
        if "page" in event:
            page = dict(event["page"])
            index = page.pop("index")
            answer["pages"][index].update(page)
        if "fail" in event:
            answer.update(event["fail"])
        if event.get("done"):
            done = True
    if not done:
        answer["stage"] = stage  # what the child was doing when it died or hung
    if timed_out:
        answer["timed_out"] = True
        if status is None:
            answer["unreaped_child_pid"] = pid
        return answer
    if status is not None and os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        answer["crashed"] = {"signal": signum, "name": signal_name(signum), "stage": stage}
    elif not done:
        answer["ok"] = False
        answer["error"] = (
            f"child exited (status {status!r}) without finishing; last stage {stage!r}"
        )
    return answer


# ---------------------------------------------------------------------------
# Mapping calls (run in the child)
# ---------------------------------------------------------------------------
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
    rc, err = privcmd_ioctl(fd, IOCTL["MMAPBATCH_V2"], arg)
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
    rc, err = privcmd_ioctl(fd, IOCTL["MMAPBATCH"], arg)
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
    rc, err = privcmd_ioctl(fd, IOCTL["MMAP"], arg)
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
        data = read_page(addr + i * XEN_PAGE_SIZE)
        page = {"sha256": hashlib.sha256(data).hexdigest(), "touched": True}
        if want == "bytes":
            page["bytes_b64"] = base64.b64encode(data).decode("ascii")
        chan.page(i, **page)


def map_and_report(call: str, fd: int, req: dict, chan: Channel) -> None:
    frames = req["frames"]
    npages = max(len(frames), 1)  # an empty batch still gets a (one-page) VMA
    chan.stage("mmap", npages=npages)
    addr = map_vma(fd, npages, req["prot"])
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
        unmap_vma(addr, npages)


def body_map(req: dict, chan: Channel) -> None:
    chan.stage("open", path=PRIVCMD_PATH)
    fd = open_privcmd()
    try:
        map_and_report(req["command"], fd, req, chan)
    finally:
        os.close(fd)


def body_restrict_then_map(req: dict, chan: Channel) -> None:
    chan.stage("open", path=PRIVCMD_PATH)
    fd = open_privcmd()
    try:
        results = []
        for domid in req["restrict_domids"]:
            chan.stage("restrict", domid=domid)
            rc, err = privcmd_ioctl(fd, IOCTL["RESTRICT"], c_domid_t(domid))
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
    chan.stage("open", path=DEVMEM_PATH)
    try:
        fd = os.open(DEVMEM_PATH, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EnvironmentProblem(
            "open", f"cannot open {DEVMEM_PATH}: {exc.strerror}", exc.errno
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


# ---------------------------------------------------------------------------
# m2p: search Xen's machine-to-phys table for gfns (run in the child)
# ---------------------------------------------------------------------------
def hypercall(fd: int, op: int, *args: int) -> tuple[int, int]:
    """IOCTL_PRIVCMD_HYPERCALL: (the hypercall's return value, 0) or (-1, errno)."""
    call = PrivcmdHypercall(op=op)
    for i, value in enumerate(args):
        call.arg[i] = value
    return privcmd_ioctl(fd, IOCTL["HYPERCALL"], call)


def _call_fields(rc: int, err: int) -> dict:
    return {"rc": rc, "errno": err or None, "errno_name": errno_name(err)}


def alloc_hypercall_buffer(length: int) -> tuple[int, int, int]:
    """Anonymous memory Xen can read and write at once: (addr, length, mlock errno).

    Every page is written first (present and writable: Xen does not fault pages
    in) and then locked; a failed mlock is reported, not fatal.
    """
    length = -(-length // XEN_PAGE_SIZE) * XEN_PAGE_SIZE
    try:
        addr = mmap_raw(length, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
    except OSError as exc:
        raise EnvironmentProblem(
            "buffer", f"mmap of a {length}-byte hypercall buffer failed: {exc.strerror}", exc.errno
        ) from None
    ctypes.memset(addr, 0, length)
    return addr, length, mlock_raw(addr, length)


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
        munmap_raw(addr, length)
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
    fd = open_privcmd()
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
        addr = map_vma(fd, len(frames), "r")
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
            unmap_vma(addr, len(frames))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------
_MISSING = object()


def _check_keys(req: dict, allowed: tuple, where: str) -> None:
    unknown = sorted(set(req) - set(allowed) - {"command"})
    if unknown:
        raise RequestError(
            "{}: unknown key(s) {}; allowed: {}".format(
                where, ", ".join(unknown), ", ".join(allowed)
            )
        )


def _get_int(req: dict, key: str, where: str, lo: int, hi: int, default=_MISSING) -> int:
    if key not in req:
        if default is _MISSING:
            raise RequestError(f"{where}.{key}: required (an integer in [{lo}, {hi}])")
        return default
    value = req[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(
            f"{where}.{key}: expected an integer, got {type(value).__name__} {value!r}"
        )
    if not lo <= value <= hi:
        raise RequestError(f"{where}.{key}: {value} is outside [{lo}, {hi}]")
    return value


def _get_choice(req: dict, key: str, where: str, choices: tuple, default: str) -> str:
    value = req.get(key, default)
    if value not in choices:
        raise RequestError(
            "{}.{}: {!r} is not one of {}".format(where, key, value, ", ".join(choices))
        )
    return value


def _get_timeout(req: dict, where: str, default: float = DEFAULT_TIMEOUT_S) -> float:
    value = req.get("timeout_s", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}.timeout_s: expected a number of seconds, got {value!r}")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise RequestError(f"{where}.timeout_s: {value!r} is outside (0, {MAX_TIMEOUT_S:g}]")
    return float(value)


def _get_int_list(req: dict, key: str, where: str, hi: int, required: bool = True) -> list | None:
    if key not in req or req[key] is None:
        if required:
            raise RequestError(f"{where}.{key}: required (a list of integers)")
        return None
    values = req[key]
    if not isinstance(values, list):
        raise RequestError(f"{where}.{key}: expected a list, got {type(values).__name__}")
    if len(values) > MAX_FRAMES:
        raise RequestError(f"{where}.{key}: {len(values)} entries, at most {MAX_FRAMES}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
            raise RequestError(
                f"{where}.{key}[{i}]: {value!r} is not an integer in [0, {hi}]"
            )
    return list(values)


def _validate_map_fields(req: dict, where: str) -> dict:
    return {
        "domid": _get_int(req, "domid", where, 0, DOMID_MAX),
        "frames": _get_int_list(req, "frames", where, U64_MAX),
        "want": _get_choice(req, "want", where, WANTS, "sha256"),
        "prot": _get_choice(req, "prot", where, PROTS, "r"),
        "timeout_s": _get_timeout(req, where),
    }


def validate_info(req: dict, where: str) -> dict:
    _check_keys(req, ("timeout_s",), where)
    return {"timeout_s": _get_timeout(req, where)}


def validate_map(req: dict, where: str) -> dict:
    _check_keys(req, ("domid", "frames", "want", "prot", "timeout_s"), where)
    return _validate_map_fields(req, where)


def validate_restrict_then_map(req: dict, where: str) -> dict:
    _check_keys(
        req, ("domid", "frames", "restrict_domid", "call", "want", "prot", "timeout_s"), where
    )
    out = _validate_map_fields(req, where)
    restrict = req.get("restrict_domid", _MISSING)
    if isinstance(restrict, list):
        out["restrict_domids"] = _get_int_list(req, "restrict_domid", where, DOMID_MAX)
    else:
        out["restrict_domids"] = [_get_int(req, "restrict_domid", where, 0, DOMID_MAX)]
    out["map_call"] = _get_choice(req, "call", where, MAP_CALLS, "mmapbatch_v2")
    return out


def validate_devmem(req: dict, where: str) -> dict:
    _check_keys(req, ("address", "length", "want", "method", "timeout_s"), where)
    length = _get_int(req, "length", where, 1, MAX_DEVMEM_LENGTH)
    return {
        "address": _get_int(req, "address", where, 0, (1 << 63) - 1 - length),
        "length": length,
        "want": _get_choice(req, "want", where, ("sha256", "bytes"), "sha256"),
        "method": _get_choice(req, "method", where, DEVMEM_METHODS, "pread"),
        "timeout_s": _get_timeout(req, where),
    }


def validate_p2m(req: dict, where: str) -> dict:
    _check_keys(req, ("domid", "pfns", "tool", "timeout_s"), where)
    tool = req.get("tool")
    if tool is not None and not isinstance(tool, str):
        raise RequestError(f"{where}.tool: expected a path string, got {tool!r}")
    return {
        "domid": _get_int(req, "domid", where, 0, DOMID_MAX),
        "pfns": _get_int_list(req, "pfns", where, U64_MAX, required=False),
        "tool": tool,
        "timeout_s": _get_timeout(req, where),
    }


def validate_m2p(req: dict, where: str) -> dict:
    _check_keys(req, ("gfns", "max_candidates", "timeout_s"), where)
    gfns = _get_int_list(req, "gfns", where, MAX_GFN)
    return {
        "gfns": list(dict.fromkeys(gfns)),  # duplicates dropped, order kept
        "max_candidates": _get_int(
            req, "max_candidates", where, 1, MAX_CANDIDATES_LIMIT, DEFAULT_MAX_CANDIDATES
        ),
        "timeout_s": _get_timeout(req, where, M2P_DEFAULT_TIMEOUT_S),
    }


def validate_batch(req: dict, where: str) -> dict:
    _check_keys(req, ("calls",), where)
    calls = req.get("calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.calls: required (a list of request objects)")
    checked = []
    for i, call in enumerate(calls):
        here = f"{where}.calls[{i}]"
        if not isinstance(call, dict):
            raise RequestError(f"{here}: expected an object, got {type(call).__name__}")
        command = call.get("command")
        if command == "batch":
            raise RequestError(f"{here}.command: batches do not nest")
        if command not in COMMANDS:
            raise RequestError(
                "{}.command: {!r} is not one of {}".format(
                    here, command, ", ".join(_leaf_commands())
                )
            )
        checked.append(validate(command, call, here))
    return {"calls": checked}


def validate(command: str, req: object, where: str = "request") -> dict:
    """Check a request and return it normalised (defaults filled in)."""
    if not isinstance(req, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(req).__name__}")
    if "command" in req and req["command"] != command:
        raise RequestError(
            "{}.command: {!r} does not match the command {!r}".format(
                where, req["command"], command
            )
        )
    out = COMMANDS[command][0](req, where)
    out["command"] = command
    return out


# ---------------------------------------------------------------------------
# Command runners
# ---------------------------------------------------------------------------
def _map_base(req: dict, call: str) -> dict:
    frames = req["frames"]
    return {
        "ok": True,
        "call": call,
        "domid": req["domid"],
        "prot": req["prot"],
        "rc": None,
        "errno": None,
        "errno_name": None,
        "errors": [None] * len(frames),
        "pages": [
            {"frame": f, "mapped": False, "sha256": None, "bytes_b64": None, "touched": False}
            for f in frames
        ],
    }


def run_map(req: dict) -> dict:
    return run_isolated(body_map, req, _map_base(req, req["command"]))


def run_restrict_then_map(req: dict) -> dict:
    base = _map_base(req, "restrict_then_map")
    base.update(map_call=req["map_call"], restrict=[])
    return run_isolated(body_restrict_then_map, req, base)


def run_devmem(req: dict) -> dict:
    base = {
        "ok": True,
        "call": "devmem",
        "address": req["address"],
        "length": req["length"],
        "method": req["method"],
        "rc": None,
        "errno": None,
        "errno_name": None,
        "sha256": None,
        "bytes_b64": None,
    }
    return run_isolated(body_devmem, req, base)


def run_m2p(req: dict) -> dict:
    base = {
        "ok": True,
        "call": "m2p",
        "gfns": req["gfns"],
        "max_candidates": req["max_candidates"],
        "maximum_ram_page": None,
        "max_page": None,
        "max_mfn": None,
        "hypercall": None,
        "buffer": None,
        "max_extents": None,
        "nr_extents": None,
        "extents": [],
        "extent_holes": None,
        "map": None,
        "candidates": {},
        "truncated": [],
        "complete": False,
        "scan": None,
        "seconds": {},
    }
    return run_isolated(body_m2p, req, base)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _hypervisor_info() -> dict:
    def part(name: str) -> str | None:
        return _read_text(os.path.join(SYS_HYPERVISOR, name))

    version = None
    major, minor, extra = part("version/major"), part("version/minor"), part("version/extra")
    if major is not None and minor is not None:
        version = "{}.{}{}".format(major, minor, extra or "")
    features = part("properties/features")
    auto_translated = None
    if features:
        with contextlib.suppress(ValueError):
            # bit 2 is XENFEAT_auto_translated_physmap
            auto_translated = bool(int(features, 16) & (1 << 2))
    return {
        "type": part("type"),
        "guest_type": part("guest_type"),
        "version": version,
        "features": features,
        "auto_translated_physmap": auto_translated,
    }


def _probe_privcmd() -> dict:
    out = {"path": PRIVCMD_PATH, "exists": os.path.exists(PRIVCMD_PATH), "open_errno": None,
           "open_errno_name": None, "unimplemented_ioctl_errno_name": None}
    try:
        fd = os.open(PRIVCMD_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        out.update(open_errno=exc.errno, open_errno_name=errno_name(exc.errno))
        return out
    try:
        rc, err = privcmd_ioctl(fd, IOCTL["UNIMPLEMENTED"], 0)
        out["unimplemented_ioctl_errno_name"] = errno_name(err) if rc < 0 else "succeeded?!"
    finally:
        os.close(fd)
    return out


def run_info(req: dict) -> dict:
    uname = os.uname()
    return {
        "ok": True,
        "call": "info",
        "agent_version": AGENT_VERSION,
        "python": platform.python_version(),
        "kernel_release": uname.release,
        "machine": uname.machine,
        "page_size": mmap.PAGESIZE,
        "euid": os.geteuid(),
        "privcmd_exists": os.path.exists(PRIVCMD_PATH),
        "privcmd": _probe_privcmd(),
        "guest_type": _read_text(os.path.join(SYS_HYPERVISOR, "guest_type")),
        "hypervisor": _hypervisor_info(),
        "devmem_exists": os.path.exists(DEVMEM_PATH),
        "xen_mfndump": find_mfndump(None),
        "ioctls": {name: hex(number) for name, number in IOCTL.items()},
        "struct_sizes": {name: ctypes.sizeof(t) for name, _, t in IOCTL_TABLE},
        "xen_struct_sizes": {"xen_machphys_mfn_list": ctypes.sizeof(XenMachphysMfnList)},
        "commands": sorted(COMMANDS),
    }


# --- p2m through xen-mfndump (tools/misc/xen-mfndump.c, dump-p2m) -----------
P2M_HEADER_RE = re.compile(r"Guest Width: (\d+), PT Levels: (\d+) P2M size: = (\d+)")
P2M_LINE_RE = re.compile(
    r"^\s*pfn=0x([0-9a-fA-F]+) ==> mfn=0x([0-9a-fA-F]+) \(type 0x([0-9a-fA-F]+)\)\s*(.*)$"
)


def _version_key(path: str) -> list:
    return [int(n) for n in re.findall(r"\d+", path)]


def find_mfndump(explicit: str | None) -> str | None:
    """xen-mfndump: Debian installs it in /usr/lib/xen-<ver>/bin, off PATH."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("xen-mfndump")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/xen-*/bin/xen-mfndump"), key=_version_key,
                        reverse=True)
    candidates += ["/usr/lib/xen/bin/xen-mfndump", "/usr/local/lib/xen/bin/xen-mfndump",
                   "/usr/sbin/xen-mfndump", "/usr/local/sbin/xen-mfndump"]
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def parse_mfndump_p2m(text: str) -> dict:
    """Parse `xen-mfndump dump-p2m` stdout: header numbers and pfn -> (mfn, type, note)."""
    header = P2M_HEADER_RE.search(text)
    entries = {}
    for line in text.splitlines():
        match = P2M_LINE_RE.match(line)
        if match:
            entries[int(match.group(1), 16)] = (
                int(match.group(2), 16), int(match.group(3), 16), match.group(4).strip()
            )
    return {
        "guest_width": int(header.group(1)) if header else None,
        "pt_levels": int(header.group(2)) if header else None,
        "p2m_size": int(header.group(3)) if header else None,
        "entries": entries,
    }


def _tail(text: str, limit: int = 2000) -> str:
    return text[-limit:]


def run_p2m(req: dict) -> dict:
    answer = {"ok": False, "call": "p2m", "domid": req["domid"]}
    tool = find_mfndump(req["tool"])
    if tool is None:
        answer["error"] = (
            "xen-mfndump not found (%s; looked on PATH and in /usr/lib/xen-*/bin)"
            % (req["tool"] or "no explicit tool given")
        )
        return answer
    argv = [tool, "dump-p2m", str(req["domid"])]
    answer["tool"] = tool
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=req["timeout_s"], check=False)
    except subprocess.TimeoutExpired:
        answer.update(error="{} timed out after {:g}s".format(" ".join(argv), req["timeout_s"]),
                      timed_out=True)
        return answer
    except OSError as exc:
        answer["error"] = "cannot run {}: {}".format(" ".join(argv), exc.strerror)
        return answer
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    parsed = parse_mfndump_p2m(stdout)
    if proc.returncode != 0 or not parsed["entries"]:
        answer.update(
            error="{} exited {} with {} p2m lines; stderr: {}".format(
                " ".join(argv), proc.returncode, len(parsed["entries"]),
                _tail(stderr, 500).strip() or "(empty)"),
            exit_status=proc.returncode,
            stdout_tail=_tail(stdout),
            stderr_tail=_tail(stderr),
        )
        return answer
    entries = parsed["entries"]
    wanted = sorted(entries) if req["pfns"] is None else req["pfns"]
    answer.update(
        ok=True,
        guest_width=parsed["guest_width"],
        pt_levels=parsed["pt_levels"],
        p2m_size=parsed["p2m_size"],
        p2m={str(p): entries[p][0] for p in wanted if p in entries},
        types={str(p): entries[p][1] for p in wanted if p in entries},
        missing=[p for p in wanted if p not in entries],
    )
    return answer


def run_batch(req: dict) -> dict:
    results = []
    for call in req["calls"]:
        try:
            results.append(COMMANDS[call["command"]][1](call))
        except EnvironmentProblem as exc:
            answer = exc.to_answer()
            answer["call"] = call["command"]
            results.append(answer)
    return {"ok": True, "call": "batch", "results": results}


# name -> (validator, runner)
COMMANDS = {
    "info": (validate_info, run_info),
    "mmapbatch_v2": (validate_map, run_map),
    "mmapbatch": (validate_map, run_map),
    "mmap": (validate_map, run_map),
    "restrict_then_map": (validate_restrict_then_map, run_restrict_then_map),
    "devmem": (validate_devmem, run_devmem),
    "p2m": (validate_p2m, run_p2m),
    "m2p": (validate_m2p, run_m2p),
    "batch": (validate_batch, run_batch),
}


def _leaf_commands() -> list:
    return sorted(c for c in COMMANDS if c != "batch")


def run_command(command: str, request: object) -> dict:
    """Validate and run one command (raises RequestError on a bad request)."""
    if command not in COMMANDS:
        raise RequestError(
            "unknown command {!r}; commands: {}".format(command, ", ".join(sorted(COMMANDS)))
        )
    req = validate(command, request)
    try:
        return COMMANDS[command][1](req)
    except EnvironmentProblem as exc:
        answer = exc.to_answer()
        answer["call"] = command
        return answer


def _read_request(stream) -> object:
    text = stream.read()
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RequestError(f"stdin is not valid JSON: {exc}") from None


def _emit(answer: dict) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def main(argv: list | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise RequestError(
                "usage: nxagent.py COMMAND < request.json; commands: "
                + ", ".join(sorted(COMMANDS))
            )
        answer = run_command(args[0], _read_request(sys.stdin))
    except RequestError as exc:
        _emit({"ok": False, "error": str(exc), "agent_version": AGENT_VERSION})
        return 2
    except Exception as exc:
        _emit({"ok": False, "error": f"internal error: {exc!r}",
               "traceback": traceback.format_exc(), "agent_version": AGENT_VERSION})
        return 1
    answer.setdefault("agent_version", AGENT_VERSION)
    _emit(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
