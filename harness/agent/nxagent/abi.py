"""ABI: the agent's constants, Linux ioctl numbers, privcmd's structures and Xen's public interface."""

from __future__ import annotations

import ctypes

AGENT_VERSION = "1.1"  # 1.1: dirty_scan and write_page

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


