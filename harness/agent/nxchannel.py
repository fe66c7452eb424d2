#!/usr/bin/env python3
"""dom0's end of the harness's virtio-serial channel (stdlib only).

Runs in dom0 as a systemd service: ``nxchannel.py DEVICE`` (the port QEMU names
``org.nested-xen.channel``, /dev/virtio-ports/org.nested-xen.channel). It reads
newline-delimited JSON requests and answers each with one JSON line carrying the
request's ``id``:

- ``{"op": "ping"}``: dom0's uptime and wall clock.
- ``{"op": "set_clock", "epoch": SECONDS}``: set CLOCK_REALTIME (a restored L1
  snapshot's clock is as old as the snapshot), then answer like ping.
- ``{"op": "run", "argv": [...], "timeout": SECONDS}``: run a command; its exit
  status and (truncated) output.

Why a channel besides SSH: the process is already running when an L1 snapshot is
restored, so dom0 answers as soon as the VM runs, without sshd forking and doing
a key exchange under TCG; and it still answers when sshd or the network does not.
A request that is not JSON gets ``{"ok": false}``; nothing a request does stops
the loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

OUTPUT_LIMIT = 64 * 1024


def _clock() -> dict:
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {"uptime_s": uptime, "realtime": time.time()}


def handle(request: dict) -> dict:
    """The answer to one request (without its id)."""
    op = request.get("op")
    if op == "ping":
        return {"ok": True, **_clock()}
    if op == "set_clock":
        epoch = request.get("epoch")
        if not isinstance(epoch, (int, float)):
            return {"ok": False, "error": "set_clock needs a numeric epoch"}
        time.clock_settime(time.CLOCK_REALTIME, float(epoch))
        return {"ok": True, **_clock()}
    if op == "run":
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return {"ok": False, "error": "run needs argv, a non-empty list of strings"}
        timeout = float(request.get("timeout", 60))
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return {"ok": False, "error": f"{argv[0]}: not found"}
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:g} s"}
        return {"ok": True, "rc": proc.returncode,
                "stdout": proc.stdout[-OUTPUT_LIMIT:].decode(errors="replace"),
                "stderr": proc.stderr[-OUTPUT_LIMIT:].decode(errors="replace"),
                "seconds": round(time.monotonic() - started, 3)}
    return {"ok": False, "error": f"unknown op {op!r}"}


def answer_line(line: bytes) -> bytes:
    """One request line in, one answer line out (never raises)."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        return json.dumps({"ok": False, "error": f"bad request: {exc}"}).encode() + b"\n"
    try:
        answer = handle(request)
    except Exception as exc:  # noqa: BLE001 - the loop must outlive any request
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    answer["id"] = request.get("id")
    return json.dumps(answer).encode() + b"\n"


def serve(fd: int) -> None:
    """Answer requests forever. A read returns 0 while no host end is connected (the
    harness keeps one open while it holds the machine): wait and read again. A write
    blocks until a host end is there; an answer the host no longer waits for is
    matched by id and dropped on its side."""
    pending = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            time.sleep(0.1)
            continue
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                with contextlib.suppress(OSError):
                    os.write(fd, answer_line(line))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    serve(os.open(argv[1], os.O_RDWR))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
