#!/usr/bin/env python3
"""Pre-copy iterations and pages per iteration, read from Xen's own migration
stream (stdlib only; runs in dom0).

Xen 4.17's ``xl -vvv`` prints no per-iteration figures, but the stream says it
all: libxc's save loop (tools/libs/guest/xg_sr_save.c, send_dirty_pages) walks
the dirty bitmap in pfn order, so within one iteration the PAGE_DATA records'
pfns only grow; a pfn that is not above the previous one starts the next
iteration. The last iteration is the one sent after the guest was suspended.
Format: docs/specs/libxc-migration-stream.pandoc (header big-endian, records
little-endian, bodies padded to 8 octets).

    nxstream.py file PATH                 # a saved image (xl save)
    nxstream.py relay OUT.json -- CMD...  # xl migrate -s "nxstream.py relay OUT --
                                          #   ssh": counts the stream on its way
    nxstream.py serve ADDR PORT LOG -- CMD...
        # the receiving dom0: accept one TCP connection on ADDR:PORT and run CMD
        # (xl migrate-receive) on it; CMD's stderr goes to LOG, each line prefixed
        # with the wall clock ("<epoch s> <line>", like the sender's xl log)
    nxstream.py connect OUT.json ADDR PORT [--truncate-after N]
        # the sending dom0: xl migrate -s '' DOMAIN "nxstream.py connect ...":
        # xl's stream to ADDR:PORT, counted; the receiver's answers back to xl.
        # --truncate-after N: only N bytes reach the receiver (a negative control)

The TCP transport (serve + connect) carries the stream unencrypted between two
dom0s on the harness's private link (or on 127.0.0.1): under TCG, ssh's cipher
emulated instruction by instruction costs more than the migration itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

MARKER = b"\xff" * 8 + b"XENF"
IMAGE_HEADER = 24
DOMAIN_HEADER = 16
REC_END, REC_PAGE_DATA = 0x0, 0x1
NO_DATA_TYPES = {0xD, 0xE, 0xF}  # BROKEN, XALLOC, XTAB: a pfn with no page contents
PFN_MASK = (1 << 52) - 1
CHUNK = 1 << 20


class StreamStats:
    """Incremental parser: feed() the stream in any pieces, then as_dict()."""

    def __init__(self) -> None:
        self.buf = b""
        self.state = "seek"
        self.skip = 0
        self.bytes = 0
        self.iterations: list[int] = []
        self.last_pfn = -1
        self.records = 0
        self.version = None
        self.domain_type = None

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.state == "done":
            return
        if self.skip:
            take = min(self.skip, len(data))
            self.skip -= take
            data = data[take:]
        self.buf += data
        while self._step():
            pass

    def need(self) -> int:
        """How many more bytes feed() wants before it can parse further; 0 when the
        next ``skip`` bytes are contents it never looks at, or the stream is done."""
        if self.state == "done" or self.skip:  # skip > 0 only once buf is used up
            return 0
        if self.state == "seek":
            return 4096
        have = len(self.buf)
        if have < 16:  # a record header, and a PAGE_DATA's count
            return 16 - have
        count = struct.unpack_from("<I", self.buf, 8)[0]
        return max(1, 16 + 8 * count - have)

    def passed(self, n: int) -> None:
        """``n`` bytes went by unseen (what need() said it would not look at)."""
        self.bytes += n
        if self.state != "done":
            self.skip -= n

    def _step(self) -> bool:
        if self.skip:
            take = min(self.skip, len(self.buf))
            self.skip -= take
            self.buf = self.buf[take:]
            if self.skip:
                return False
        if self.state == "seek":
            at = self.buf.find(MARKER)
            if at < 0:
                self.buf = self.buf[-(len(MARKER) - 1):]
                return False
            if len(self.buf) < at + IMAGE_HEADER + DOMAIN_HEADER:
                self.buf = self.buf[at:]
                return False
            self.version = struct.unpack_from(">I", self.buf, at + 12)[0]
            self.domain_type = struct.unpack_from("<I", self.buf, at + IMAGE_HEADER)[0]
            self.buf = self.buf[at + IMAGE_HEADER + DOMAIN_HEADER:]
            self.state = "records"
            return True
        if self.state != "records" or len(self.buf) < 8:
            return False
        rtype, length = struct.unpack_from("<II", self.buf, 0)
        padded = (length + 7) & ~7
        if rtype == REC_PAGE_DATA:
            if len(self.buf) < 16:
                return False
            count = struct.unpack_from("<I", self.buf, 8)[0]
            if len(self.buf) < 16 + 8 * count:
                return False
            self._pages(struct.unpack_from(f"<{count}Q", self.buf, 16))
        self.records += 1
        if rtype == REC_END:
            self.state = "done"
            self.buf = b""
            return False
        self.skip = 8 + padded
        return True

    def _pages(self, pfns: tuple[int, ...]) -> None:
        for raw in pfns:
            pfn, kind = raw & PFN_MASK, raw >> 60
            if pfn <= self.last_pfn or not self.iterations:
                self.iterations.append(0)
            self.last_pfn = pfn
            if kind not in NO_DATA_TYPES:
                self.iterations[-1] += 1

    def as_dict(self) -> dict:
        return {
            "stream_bytes": self.bytes,
            "complete": self.state == "done",
            "format_version": self.version,
            "domain_type": self.domain_type,
            "records": self.records,
            "pages_per_iteration": self.iterations,
            "iterations": len(self.iterations),
        }


def parse_file(path: str) -> dict:
    stats = StreamStats()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            stats.feed(chunk)
    return stats.as_dict()


def pump(src: int, dst: int, stats: StreamStats, limit: int | None = None) -> bool:
    """Copy ``src`` to ``dst`` until EOF, counting the stream. Only record headers
    and pfn arrays are read into this process: page contents (and everything after
    the libxc part) are splice(2)d in the kernel, so under TCG the copy costs a few
    syscalls per batch, not a pass of the guest's memory through Python. With ``limit``
    it stops after that many bytes: False then, True at EOF."""
    can_splice = hasattr(os, "splice")
    while True:
        left = None if limit is None else limit - stats.bytes
        if left is not None and left <= 0:
            return False
        want = stats.need()
        if want == 0 and can_splice:
            size = min(stats.skip, CHUNK) if stats.skip else CHUNK
            try:
                moved = os.splice(src, dst, size if left is None else min(size, left))
            except OSError:  # neither end is a pipe: copy instead
                can_splice = False
                continue
            if not moved:
                return True
            stats.passed(moved)
            continue
        size = want or CHUNK
        chunk = os.read(src, size if left is None else min(size, left))
        if not chunk:
            return True
        stats.feed(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


def relay(out_path: str, cmd: list[str]) -> int:
    """Copy stdin to ``cmd``'s stdin, counting the stream; stdout goes straight through."""
    stats = StreamStats()
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert child.stdin is not None
    try:
        pump(0, child.stdin.fileno(), stats)
    except BrokenPipeError:
        pass
    finally:
        child.stdin.close()
    rc = child.wait()
    with open(out_path, "w") as f:
        json.dump(stats.as_dict(), f)
    return rc


def _copy_back(sock: socket.socket, dst: int, hung_up: threading.Event) -> None:
    """The receiver's answers (a few lines of xl's protocol) back to xl. At the receiver's
    end of the connection the stream is shut too: a sender still writing (the receiver died
    mid-stream) fails at once instead of filling socket buffers nobody reads."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
    except OSError:
        pass
    finally:
        hung_up.set()
        _hang_up(sock)
        os.close(dst)


def _hang_up(sock: socket.socket) -> None:
    """Shut both directions of the connection, whoever else holds its descriptor (a child's
    child, libxl-save-helper, inherits it): the peer reads EOF and its writes fail."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _drain(src: int, stop: threading.Event) -> int:
    """Read and drop ``src`` until EOF or ``stop`` (a truncated stream's rest: the sender
    must not block on a pipe nobody reads)."""
    dropped = 0
    while not stop.is_set():
        ready, _, _ = select.select([src], [], [], 0.2)
        if ready:
            chunk = os.read(src, CHUNK)
            if not chunk:
                break
            dropped += len(chunk)
    return dropped


HANG_UP_GRACE_S = 5.0  # after the receiver hung up, for the sender to close the stream


def _send(sock: socket.socket, stats: StreamStats, truncate_after: int | None, hung_up: threading.Event,
          sent: threading.Event, extra: dict, outcome: dict) -> None:
    """stdin (xl's stream) to the socket; ``sent`` when stdin ends or the receiver is gone."""
    try:
        whole = pump(0, sock.fileno(), stats, truncate_after)
        sock.shutdown(socket.SHUT_WR)
        if not whole:
            print(f"nxstream connect: truncated the stream after {stats.bytes} bytes (--truncate-after)",
                  file=sys.stderr)
            extra.update(truncated_after=stats.bytes, dropped_bytes=_drain(0, hung_up))
    except OSError as exc:  # BrokenPipeError, ConnectionError: the receiver is gone
        print(f"nxstream connect: the receiver hung up after {stats.bytes} bytes of the stream: {exc}",
              file=sys.stderr)
        outcome["rc"] = 1
    finally:
        sent.set()


def connect(out_path: str, address: str, port: int, timeout: float = 60.0,
            truncate_after: int | None = None) -> int:
    """The sender's end: stdin (xl's stream) to the socket, the socket to stdout. With
    ``truncate_after`` (a negative control) only that many bytes of the stream reach the
    receiver, then its end of the stream: its restore is fed a truncated stream."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((address, port), timeout=10)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                print(f"nxstream connect: {address}:{port}: {exc}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    sock.settimeout(None)
    hung_up, sent = threading.Event(), threading.Event()
    back = threading.Thread(target=_copy_back, args=(sock, 1, hung_up), daemon=True)
    back.start()
    stats, extra, outcome = StreamStats(), {}, {}
    sender = threading.Thread(target=_send, args=(sock, stats, truncate_after, hung_up, sent, extra, outcome),
                              daemon=True)
    sender.start()
    # xl keeps the stream's pipe open while it waits for the receiver's answer: a receiver
    # that exits after the whole stream (a refused restore) must end this process too, or
    # the shell between xl and this process holds the answer pipe and xl waits forever.
    while not sent.wait(0.2):
        if hung_up.is_set() and not sent.wait(HANG_UP_GRACE_S):
            print(f"nxstream connect: the receiver hung up after {stats.bytes} bytes of the stream "
                  "while the sender still held it open", file=sys.stderr)
            outcome.setdefault("rc", 1)
            break
    rc = outcome.get("rc", 0)
    back.join()
    sock.close()
    with open(out_path, "w") as f:
        json.dump({**stats.as_dict(), **extra}, f)
    return rc


STDERR_GRACE_S = 2.0  # the receiver's last lines, once it exited, before serve does


def _stamp_lines(stream, log, lock: threading.Lock, closed: list) -> None:
    for line in stream:
        with lock:
            if closed:
                return
            log.write(f"{time.time():.6f} {line.decode(errors='replace')}")


def serve(address: str, port: int, log_path: str, cmd: list[str], timeout: float = 900.0) -> int:
    """The receiver's end: one connection, ``cmd`` run on it; its stderr timestamped. When
    ``cmd`` exits the connection is shut at once, though its children may hold it still
    (xl migrate-receive's libxl-save-helper): the sender gets an error instead of waiting
    out its timeout on a stream nobody reads."""
    server = socket.create_server((address, port))
    server.settimeout(timeout)
    try:
        conn, _ = server.accept()
    except TimeoutError:
        print(f"nxstream serve: no connection within {timeout:g} s", file=sys.stderr)
        return 1
    finally:
        server.close()
    conn.settimeout(None)
    with open(log_path, "w", buffering=1) as log:
        child = subprocess.Popen(cmd, stdin=conn, stdout=conn, stderr=subprocess.PIPE)
        lock, closed = threading.Lock(), []
        # its stderr is read aside: a child of cmd holding the pipe keeps it open past cmd's exit
        reader = threading.Thread(target=_stamp_lines, args=(child.stderr, log, lock, closed), daemon=True)
        reader.start()
        rc = child.wait()
        _hang_up(conn)
        conn.close()
        reader.join(STDERR_GRACE_S)
        with lock:
            closed.append(True)
    return rc


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "file":
        print(json.dumps(parse_file(argv[2])))
        return 0
    if len(argv) >= 5 and argv[1] == "relay" and argv[3] == "--":
        return relay(argv[2], argv[4:])
    if len(argv) == 5 and argv[1] == "connect":
        return connect(argv[2], argv[3], int(argv[4]))
    if len(argv) == 7 and argv[1] == "connect" and argv[5] == "--truncate-after":
        return connect(argv[2], argv[3], int(argv[4]), truncate_after=int(argv[6]))
    if len(argv) >= 7 and argv[1] == "serve" and argv[5] == "--":
        return serve(argv[2], int(argv[3]), argv[4], argv[6:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
