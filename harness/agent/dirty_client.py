"""The agent's dirty-page commands on the host side (dirty_scan, write_page; the agent's
half is harness/agent/nxagent/dirty.py), mixed into :class:`harness.agent.client.Agent`."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import timeouts as t


class ChildAnswer:
    """An agent answer from a command run in a child process (``raw``: its JSON): whether
    that child crashed or timed out. Shared by the client's answers (M2PResult, DirtyScan)."""

    raw: dict[str, Any]

    @property
    def crashed(self) -> dict[str, Any] | None:
        return self.raw.get("crashed")

    @property
    def timed_out(self) -> bool:
        return bool(self.raw.get("timed_out", False))


@dataclass(frozen=True)
class PageStamp:
    """One dirty-buffer frame as dom0 found it: the mapping error (0: mapped) and, if it
    mapped, the header's magic check, nonce, generation and index, and whether the body is
    the stamp of that header."""

    frame: int
    error: int | None
    magic_ok: bool | None = None
    nonce: str | None = None
    generation: int | None = None
    index: int | None = None
    body_ok: bool | None = None


@dataclass
class DirtyScan(ChildAnswer):
    """dirty_scan's answer, runs expanded to one :class:`PageStamp` per requested frame."""

    pages: list[PageStamp]
    cursor: dict[str, Any] | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any], frames: Sequence[int]) -> DirtyScan:
        nonces = d.get("nonces") or []
        slots: list[PageStamp | None] = [None] * len(frames)
        for position, count, error, magic_ok, ref, generation, index, body_ok in d.get("runs") or []:
            for k in range(count):
                at = position + k
                slots[at] = PageStamp(frames[at], error, magic_ok, nonces[ref] if ref is not None else None,
                                      generation, None if index is None else index + k, body_ok)
        # a frame no run covers (the child died before it): unknown, never "fine"
        pages = [s if s is not None else PageStamp(frames[i], None) for i, s in enumerate(slots)]
        return cls(pages, d.get("cursor"), d)


class DirtyCommands:
    """Agent methods for the probe's dirty buffer (``self._checked`` is Agent's)."""

    def dirty_scan(self, domid: int, frames: Sequence[int], cursor_frame: int | None = None,
                   timeout_s: float = t.AGENT_DIRTY_SCAN_S) -> DirtyScan:
        """Map ``frames`` (gfns; MFNs for PV) and the cursor page's frame and parse them."""
        frames = [int(f) for f in frames]
        req = {"domid": domid, "frames": frames, "cursor_frame": cursor_frame, "timeout_s": timeout_s}
        return DirtyScan.from_json(self._checked("dirty_scan", req, timeout_s), frames)  # type: ignore[attr-defined]

    def write_page(self, domid: int, frame: int, data: bytes,
                   timeout_s: float = t.AGENT_WRITE_PAGE_S) -> dict[str, Any]:
        """Write 4096 bytes into a guest frame through a writable foreign mapping. The answer's
        ``written`` says the bytes read back are the ones written; ``old`` is what was there."""
        req = {"domid": domid, "frame": int(frame), "bytes_b64": base64.b64encode(data).decode("ascii"),
               "timeout_s": timeout_s}
        answer = self._checked("write_page", req, timeout_s)  # type: ignore[attr-defined]
        old = answer.get("old_b64")
        answer["old"] = base64.b64decode(old) if old is not None else None
        return answer
