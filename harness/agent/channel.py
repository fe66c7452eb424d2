"""Host end of the virtio-serial channel to dom0 (``nxchannel.py`` answers in dom0).

QEMU exposes the channel as a UNIX socket on the host. A request is one JSON line
with an ``id``; dom0 answers with one JSON line carrying the same id. Until dom0
has the port open, QEMU drops what the host writes, so idempotent requests
(``ping``, ``set_clock``) are sent again until one is answered; ``run`` is sent
once. Answers to requests given up on are dropped by id.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from pathlib import Path

from .. import timeouts as t

RESEND_S = 0.25  # an idempotent request is sent again this often until answered
IDEMPOTENT = ("ping", "set_clock")


class ChannelError(RuntimeError):
    """The channel gave no usable answer in time."""


class Channel:
    """One connection to a machine's channel socket; not thread-safe."""

    def __init__(self, path: Path, label: str = "dom0") -> None:
        self.path, self.label = path, label
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)

    def connect(self, timeout: float = t.CHANNEL_REQUEST_S) -> None:
        """Connect to the socket (QEMU creates it as it starts)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ChannelError(f"[{self.label}] channel socket {self.path}: {exc}") from None
                time.sleep(0.02)
                continue
            self._sock, self._buffer = sock, b""
            return

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, op: str, timeout: float = t.CHANNEL_REQUEST_S, **fields: object) -> dict:
        """Send ``op`` and return dom0's answer; ChannelError if none comes in time
        or dom0 answers ``ok: false``. ``fields`` may hold callables, evaluated at
        each send (``set_clock`` sends the wall clock of the moment it is sent)."""
        if self._sock is None:
            self.connect(timeout)
        sock = self._sock
        assert sock is not None
        deadline = time.monotonic() + timeout
        sent: set[int] = set()
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now > deadline:
                raise ChannelError(f"[{self.label}] no answer to {op!r} on the channel within {timeout:g} s")
            if now >= next_send and (not sent or op in IDEMPOTENT):
                ident = next(self._ids)
                body = {k: (v() if callable(v) else v) for k, v in fields.items()}
                try:
                    sock.sendall(json.dumps({"id": ident, "op": op, **body}).encode() + b"\n")
                except OSError as exc:
                    self.close()
                    raise ChannelError(f"[{self.label}] channel write failed: {exc}") from exc
                sent.add(ident)
                next_send = now + RESEND_S
            answer = self._read_line(min(deadline, next_send if op in IDEMPOTENT else deadline))
            if answer is None or answer.get("id") not in sent:
                continue
            if not answer.get("ok"):
                raise ChannelError(f"[{self.label}] {op!r} failed in dom0: {answer.get('error')}")
            return answer

    def _read_line(self, until: float) -> dict | None:
        """The next complete answer line, or None at ``until``."""
        sock = self._sock
        assert sock is not None
        while b"\n" not in self._buffer:
            left = until - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as exc:
                self.close()
                raise ChannelError(f"[{self.label}] channel read failed: {exc}") from exc
            if not data:
                self.close()
                raise ChannelError(f"[{self.label}] the channel socket closed (QEMU gone?)")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None
