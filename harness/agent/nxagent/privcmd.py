"""libc mmap/munmap/mlock and privcmd access.

Small functions unit tests replace with fakes: the other modules call them as
``privcmd.NAME(...)`` so a replacement here is the one they use.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os

from .abi import PRIVCMD_PATH, XEN_PAGE_SIZE
from .errors import EnvironmentProblem

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


