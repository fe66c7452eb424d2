"""Settling dom0's memory before an L1 snapshot.

Run in dom0 (python3 is in every host image: the agent needs it). dom0 writes back
and drops its page cache, then takes most of its free memory as anonymous pages,
which the kernel hands out zeroed, and gives them back: that much free memory is now
all zero. QEMU saves a zero page as a flag (with mapped-ram: a hole in the file), so
the snapshot holds only the memory in use and a restore loads that much less. A
reserve stays untouched, so nothing in dom0 is pushed out or OOM-killed.
"""

from __future__ import annotations

import json
import shlex

from .dom0_layout import DROP_CACHES, PROC_MEMINFO
from .remote import Remote
from .timeouts import SETTLE_S

SETTLE_SCRIPT = f"MEMINFO, DROP_CACHES = {PROC_MEMINFO!r}, {DROP_CACHES!r}\n" + r"""
import ctypes, json, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: the kernel faults the pages in (zeroed), no copy
def populate(m, size):
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if libc.madvise(addr, size, MADV_POPULATE_WRITE) != 0:
        m.write(zeros)
def free_mib():
    for line in open(MEMINFO):
        if line.startswith("MemFree:"):
            return int(line.split()[1]) // 1024
os.sync()
before = free_mib()
with open(DROP_CACHES, "w") as f:
    f.write("3\n")
chunk, zeros, maps = 32 << 20, bytes(32 << 20), []
budget = max(0, free_mib() - max(96, free_mib() // 10))
while budget >= 32:
    m = mmap.mmap(-1, chunk)
    populate(m, chunk)
    maps.append(m)
    budget -= 32
zeroed = len(maps) * 32
for m in maps:
    m.close()
print(json.dumps({"memfree_before_mib": before, "zeroed_mib": zeroed, "memfree_after_mib": free_mib()}))
"""


def settle_dom0_memory(remote: Remote, timeout: float = SETTLE_S) -> dict:
    """Run the settle script in dom0; dom0's MemFree before and after and what was
    zeroed, in MiB."""
    out = remote.run_expect(f"python3 -c {shlex.quote(SETTLE_SCRIPT)}", timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])
