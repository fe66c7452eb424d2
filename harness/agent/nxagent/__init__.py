"""nxagent: probe Xen's foreign-memory mapping ioctls from dom0.

A package of modules (abi, errors, privcmd, isolation, mapping, m2p, validate,
commands, cli) shipped into dom0 as ONE file: harness/agent/build.py zips it into a
deterministic zipapp installed as /usr/local/lib/nested-xen/nxagent.py and run as
root::

    python3 nxagent.py COMMAND < request.json

It reads one JSON object on stdin and writes exactly one JSON object on stdout.
Exit status: 0 an answer was produced (even when an ioctl failed, or the machine
lacks /dev/xen/privcmd: read "ok", "error", "rc" and "errno"); 2 the request was
invalid ({"ok": false, "error": ...}); 1 an internal error (a JSON answer is
still printed).

Commands: info, mmapbatch_v2, mmapbatch, mmap, restrict_then_map, devmem, p2m,
m2p, dirty_scan, write_page, batch (dirty_scan/write_page: the probe's dirty pages,
dirty.py).  Every call that maps or reads memory runs in a forked child, so a SIGBUS
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

# Every module, loaded with the package (as the single file loaded everything).
from . import abi, cli, commands, dirty, errors, isolation, m2p, mapping, privcmd, validate

# The protocol's constants, for the host client (harness/agent/client.py).
from .abi import AGENT_VERSION, DEFAULT_TIMEOUT_S, M2P_DEFAULT_TIMEOUT_S, MAP_CALLS

__all__ = [
    "AGENT_VERSION", "DEFAULT_TIMEOUT_S", "M2P_DEFAULT_TIMEOUT_S", "MAP_CALLS",
    "abi", "cli", "commands", "dirty", "errors", "isolation", "m2p", "mapping", "privcmd", "validate",
]
