#!/usr/bin/env python3
"""Timestamp, with dom0's clock, every line appended to some files (stdlib only).

Runs in dom0 until killed: ``nxwatch.py OUT GLOB [GLOB ...]``. Each complete
line that appears in a file matching a glob is written to OUT as
``<arrival ns>\t<file name>\t<line>``. Files that appear later are picked up;
a file that shrinks (truncated, e.g. an HVM serial log reopened by a new device
model after migration) is read again from its start. This is how the harness
measures a guest's downtime with dom0's clock rather than the guest's, which
Xen restores across save and migration.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import time

POLL_S = 0.005
RESCAN_S = 0.2


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = open(argv[1], "a", buffering=1)  # noqa: SIM115 - lives until the process ends
    patterns = argv[2:]
    offsets: dict[str, int] = {}
    partial: dict[str, bytes] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    last_scan = 0.0
    while True:
        now = time.monotonic()
        if now - last_scan > RESCAN_S:
            for pattern in patterns:
                for path in glob.glob(pattern):
                    offsets.setdefault(path, 0)
            last_scan = now
        for path in list(offsets):
            _read_new(path, offsets, partial, out)
        time.sleep(POLL_S)


def _read_new(path: str, offsets: dict[str, int], partial: dict[str, bytes], out) -> None:
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size < offsets[path]:
        offsets[path], partial[path] = 0, b""
    if size == offsets[path]:
        return
    with open(path, "rb") as f:
        f.seek(offsets[path])
        data = f.read(size - offsets[path])
    arrived = time.time_ns()
    offsets[path] += len(data)
    lines = (partial.get(path, b"") + data).split(b"\n")
    partial[path] = lines.pop()
    name = os.path.basename(path)
    for line in lines:
        text = line.decode("utf-8", "replace").rstrip("\r")
        out.write(f"{arrived}\t{name}\t{text}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
