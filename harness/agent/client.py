"""Host-side driver for the dom0 agent (the package ``nxagent/``, shipped as one ``nxagent.py``).

The agent is built into the run's cache and copied into dom0 with the other prepared
files (harness/dom0_files.py, harness/provision.py ``prepare``, which then runs
:meth:`Agent.handshake`), and run as
``python3 /usr/local/lib/nested-xen/nxagent.py COMMAND`` with a JSON request on
stdin, through whatever ``run`` callable the caller provides (an SSH runner in
the harness, a fake in unit tests).

Single calls raise :class:`AgentError` when the agent exits non-zero, prints
something that is not JSON, or answers ``"ok": false`` (no privcmd device, mmap
refused...). A crash (SIGBUS while reading a page) or a timeout is *not* an
error: it is reported in :attr:`MapResult.crashed` / :attr:`MapResult.timed_out`
(and likewise :attr:`M2PResult.crashed` / :attr:`M2PResult.timed_out`).
:meth:`Agent.batch` never raises for one failing call: each result carries its
own ``ok``/``error``.
"""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import timeouts as t

# Where dom0 keeps the agent zipapp (harness/agent/build.py builds it); REMOTE_AGENT_PATH is
# this module's name for it, which callers import.
from ..dom0_layout import AGENT_PATH as REMOTE_AGENT_PATH
from .dirty_client import ChildAnswer, DirtyCommands, DirtyScan, PageStamp  # noqa: F401 - part of the client's API

# The protocol's constants come from the agent itself (stdlib only, importable here),
# not from a copy that could drift from what dom0 runs.
from .nxagent import AGENT_VERSION, DEFAULT_TIMEOUT_S, MAP_CALLS
from .nxagent import M2P_DEFAULT_TIMEOUT_S as M2P_TIMEOUT_S

#: Answers of these calls are parsed into MapResult.
MAP_ANSWERS = (*MAP_CALLS, "restrict_then_map")

Runner = Callable[[str, str, float], tuple[int, str, str]]


class AgentError(RuntimeError):
    """The agent could not give a usable answer; the message says which command and why."""

    def __init__(
        self,
        message: str,
        *,
        command: str = "",
        status: int | None = None,
        stderr: str = "",
        answer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.command = command
        self.status = status
        self.stderr = stderr
        self.answer = answer


@dataclass(frozen=True)
class FrameResult:
    """One requested frame: its per-frame error (0, -errno, or None if unknown) and content."""

    frame: int
    error: int | None
    sha256: str | None
    data: bytes | None

    @property
    def ok(self) -> bool:
        return self.error == 0


@dataclass
class MapResult:
    """The answer of mmapbatch_v2 / mmapbatch / mmap / restrict_then_map."""

    call: str
    rc: int | None
    errno: int | None
    errno_name: str | None
    frames: list[FrameResult]
    crashed: dict[str, Any] | None
    timed_out: bool
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MapResult:
        pages = d.get("pages") or []
        errors = d.get("errors") or [None] * len(pages)
        frames = []
        for i, page in enumerate(pages):
            b64 = page.get("bytes_b64")
            frames.append(
                FrameResult(
                    frame=int(page["frame"]),
                    error=errors[i] if i < len(errors) else None,
                    sha256=page.get("sha256"),
                    data=base64.b64decode(b64) if b64 is not None else None,
                )
            )
        return cls(
            call=str(d.get("call", "")),
            rc=d.get("rc"),
            errno=d.get("errno"),
            errno_name=d.get("errno_name"),
            frames=frames,
            crashed=d.get("crashed"),
            timed_out=bool(d.get("timed_out", False)),
            raw=d,
        )

    @property
    def ok(self) -> bool:
        """False when the call could not run at all (see :attr:`error`)."""
        return self.raw.get("ok") is True

    @property
    def error(self) -> str | None:
        return self.raw.get("error")

    @property
    def errors(self) -> list[int | None]:
        return [f.error for f in self.frames]

    @property
    def restrict(self) -> list[dict[str, Any]] | None:
        """restrict_then_map only: one {domid, rc, errno, errno_name} per RESTRICT ioctl."""
        return self.raw.get("restrict")


def _int_keys(mapping: dict[str, Any] | None) -> dict[int, list[int]]:
    return {int(k): [int(m) for m in v] for k, v in (mapping or {}).items()}


@dataclass
class M2PResult(ChildAnswer):
    """The answer of m2p: which MFNs' machine-to-phys entries hold each requested gfn.

    The M2P does not say which domain owns an MFN, so a gfn has one candidate per
    domain (dom0 included) that uses that pfn/gfn.  An empty list is only
    meaningful when :attr:`complete` is true (the whole table was read).
    """

    candidates: dict[int, list[int]]
    hypercall_rc: int | None
    max_mfn: int | None
    nr_extents: int | None
    map_errors: int | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> M2PResult:
        hcall = d.get("hypercall") or {}
        mapping = d.get("map") or {}
        return cls(
            candidates=_int_keys(d.get("candidates")),
            hypercall_rc=hcall.get("rc"),
            max_mfn=d.get("max_mfn"),
            nr_extents=d.get("nr_extents"),
            map_errors=mapping.get("errors_nonzero"),
            raw=d,
        )

    @property
    def ok(self) -> bool:
        """False when the call could not run at all (see :attr:`error`)."""
        return self.raw.get("ok") is True

    @property
    def error(self) -> str | None:
        return self.raw.get("error")

    @property
    def hypercall_errno_name(self) -> str | None:
        return (self.raw.get("hypercall") or {}).get("errno_name")

    @property
    def map_rc(self) -> int | None:
        """rc of the MMAPBATCH_V2 of the M2P frames from DOMID_XEN (None: not tried)."""
        return (self.raw.get("map") or {}).get("rc")

    @property
    def map_frames(self) -> int | None:
        return (self.raw.get("map") or {}).get("frames")

    @property
    def mapped(self) -> bool:
        """True when every M2P frame mapped: the positive control of the DOMID_XEN path."""
        return self.map_rc == 0 and self.map_errors == 0 and bool(self.map_frames)

    @property
    def extents(self) -> list[int]:
        """The first few extent MFNs (2 MiB chunks of the table) Xen reported."""
        return [int(m) for m in self.raw.get("extents") or []]

    @property
    def truncated(self) -> list[int]:
        """gfns with more than max_candidates matches (their lists are cut short)."""
        return [int(g) for g in self.raw.get("truncated") or []]

    @property
    def complete(self) -> bool:
        return self.raw.get("complete") is True


def map_request(
    domid: int,
    frames: Sequence[int],
    *,
    want: str = "sha256",
    call: str = "mmapbatch_v2",
    prot: str = "r",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """A mapping call as a request object (for :meth:`Agent.batch`)."""
    if call not in MAP_CALLS:
        raise ValueError(f"call must be one of {', '.join(MAP_CALLS)}, not {call!r}")
    return {
        "command": call,
        "domid": domid,
        "frames": [int(f) for f in frames],
        "want": want,
        "prot": prot,
        "timeout_s": timeout_s,
    }


def restrict_request(
    domid: int,
    frames: Sequence[int],
    restrict_domid: int | Sequence[int],
    *,
    want: str = "sha256",
    call: str = "mmapbatch_v2",
    prot: str = "r",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    req = map_request(domid, frames, want=want, call=call, prot=prot, timeout_s=timeout_s)
    req["command"] = "restrict_then_map"
    req["call"] = call
    req["restrict_domid"] = (
        restrict_domid if isinstance(restrict_domid, int) else [int(d) for d in restrict_domid]
    )
    return req


def devmem_request(
    address: int,
    length: int,
    *,
    want: str = "sha256",
    method: str = "pread",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    return {
        "command": "devmem",
        "address": address,
        "length": length,
        "want": want,
        "method": method,
        "timeout_s": timeout_s,
    }


def m2p_request(
    gfns: Sequence[int],
    *,
    max_candidates: int = 64,
    timeout_s: float = M2P_TIMEOUT_S,
) -> dict[str, Any]:
    return {
        "command": "m2p",
        "gfns": [int(g) for g in gfns],
        "max_candidates": max_candidates,
        "timeout_s": timeout_s,
    }


def _tail(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class Agent(DirtyCommands):
    """Runs nxagent commands in dom0 through ``run(cmd, stdin, timeout) -> (rc, out, err)``
    (the dirty-page commands: harness/agent/dirty_client.py)."""

    def __init__(
        self,
        run: Runner,
        *,
        remote_path: str = REMOTE_AGENT_PATH,
        python: str = "python3",
        overhead_s: float = t.AGENT_OVERHEAD_S,
    ) -> None:
        self._run = run
        self.remote_path = remote_path
        self.python = python
        # Interpreter start-up and SSH under TCG are slow: added to every deadline.
        self.overhead_s = overhead_s

    # -- plumbing -----------------------------------------------------------
    def command_line(self, command: str) -> str:
        return f"{shlex.quote(self.python)} {shlex.quote(self.remote_path)} {command}"

    def call(self, command: str, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Run one agent command and return its JSON answer (ok true or false).

        Raises AgentError for a non-zero exit or output that is not one JSON object.
        """
        cmdline = self.command_line(command)
        status, out, err = self._run(cmdline, json.dumps(request), timeout)
        answer: dict[str, Any] | None = None
        try:
            parsed = json.loads(out)
            if isinstance(parsed, dict):
                answer = parsed
        except ValueError:
            pass
        if status != 0:
            reason = answer.get("error") if answer else None
            raise AgentError(
                f"nxagent {command}: exit status {status}"
                + (f": {reason}" if reason else "")
                + (f"; stderr: {_tail(err)}" if err.strip() else "")
                + ("" if answer else f"; stdout: {_tail(out, 500) or '(empty)'}"),
                command=cmdline,
                status=status,
                stderr=_tail(err),
                answer=answer,
            )
        if answer is None:
            raise AgentError(
                f"nxagent {command}: answer is not a JSON object: {_tail(out, 500) or '(empty)'}"
                + (f"; stderr: {_tail(err)}" if err.strip() else ""),
                command=cmdline,
                status=status,
                stderr=_tail(err),
            )
        return answer

    def _checked(self, command: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        answer = self.call(command, request, timeout=timeout_s + self.overhead_s)
        if answer.get("ok") is not True:
            raise AgentError(
                f"nxagent {command}: {answer.get('error', 'ok is not true')}",
                command=self.command_line(command),
                status=0,
                answer=answer,
            )
        return answer

    # -- commands -----------------------------------------------------------
    def handshake(self) -> dict[str, Any]:
        """``info`` from the installed agent, which must report this harness's AGENT_VERSION
        (a stale or half-copied file would answer in another protocol, or not at all). Run
        after every install (harness/provision.py ``prepare``)."""
        info = self.info()
        if info.get("agent_version") != AGENT_VERSION:
            raise AgentError(
                f"installed agent {self.remote_path} reports version {info.get('agent_version')!r}, "
                f"expected {AGENT_VERSION!r}",
                answer=info,
            )
        return info

    def info(self) -> dict[str, Any]:
        return self._checked("info", {}, t.AGENT_INFO_S)

    def map_foreign(
        self,
        domid: int,
        frames: Sequence[int],
        want: str = "sha256",
        call: str = "mmapbatch_v2",
        prot: str = "r",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> MapResult:
        req = map_request(domid, frames, want=want, call=call, prot=prot, timeout_s=timeout_s)
        command = req.pop("command")
        return MapResult.from_json(self._checked(command, req, timeout_s))

    def restrict_then_map(
        self,
        domid: int,
        frames: Sequence[int],
        restrict_domid: int | Sequence[int],
        want: str = "sha256",
        call: str = "mmapbatch_v2",
        prot: str = "r",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> MapResult:
        req = restrict_request(
            domid, frames, restrict_domid, want=want, call=call, prot=prot, timeout_s=timeout_s
        )
        command = req.pop("command")
        return MapResult.from_json(self._checked(command, req, timeout_s))

    def devmem(
        self,
        address: int,
        length: int,
        want: str = "sha256",
        method: str = "pread",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Read physical memory via /dev/mem; the answer's rc/errno say whether it worked."""
        req = devmem_request(address, length, want=want, method=method, timeout_s=timeout_s)
        command = req.pop("command")
        answer = self._checked(command, req, timeout_s)
        b64 = answer.get("bytes_b64")
        answer["data"] = base64.b64decode(b64) if b64 is not None else None
        return answer

    def p2m(
        self, domid: int, pfns: Sequence[int] | None = None, timeout_s: float = t.AGENT_P2M_S
    ) -> dict[int, int]:
        """pfn -> mfn of a PV guest, from `xen-mfndump dump-p2m` run by the agent.

        Every requested pfn is in the result (AgentError names any the p2m lacks);
        an entry Xen considers invalid comes back as 2**64 - 1 (INVALID_MFN).
        """
        req: dict[str, Any] = {"domid": domid, "timeout_s": timeout_s}
        if pfns is not None:
            req["pfns"] = [int(p) for p in pfns]
        answer = self._checked("p2m", req, timeout_s)
        missing = answer.get("missing") or []
        if missing:
            raise AgentError(
                f"nxagent p2m: domain {domid}'s p2m (size {answer.get('p2m_size')}) has no "
                f"entry for pfn(s) {', '.join(hex(p) for p in missing[:20])}",
                command=self.command_line("p2m"),
                status=0,
                answer=answer,
            )
        return {int(pfn): int(mfn) for pfn, mfn in answer["p2m"].items()}

    def m2p(
        self, gfns: Sequence[int], max_candidates: int = 64, timeout_s: float = M2P_TIMEOUT_S
    ) -> M2PResult:
        """Search Xen's machine-to-phys table for gfns (candidate MFNs per gfn).

        Raises AgentError when the agent could not run the call (no privcmd...);
        a failed hypercall or mapping is reported in the result (hypercall_rc,
        map_errors, complete), as are a crash or a timeout.
        """
        req = m2p_request(gfns, max_candidates=max_candidates, timeout_s=timeout_s)
        command = req.pop("command")
        return M2PResult.from_json(self._checked(command, req, timeout_s))

    def batch(self, calls: list[dict[str, Any]]) -> list[MapResult | M2PResult | dict[str, Any]]:
        """Run several request objects (each with a "command") in one agent start.

        Mapping answers become MapResult and m2p answers M2PResult (check
        .ok/.error), the others stay dicts.
        """
        total = sum(float(c.get("timeout_s", DEFAULT_TIMEOUT_S)) for c in calls)
        answer = self._checked("batch", {"calls": calls}, total)
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(calls):
            raise AgentError(
                f"nxagent batch: expected {len(calls)} results, got {results!r:.200}",
                answer=answer,
            )
        return [_parse_result(r) for r in results]


def _parse_result(answer: dict[str, Any]) -> MapResult | M2PResult | dict[str, Any]:
    call = answer.get("call")
    if call in MAP_ANSWERS:
        return MapResult.from_json(answer)
    if call == "m2p":
        return M2PResult.from_json(answer)
    return answer
