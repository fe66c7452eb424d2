"""The Xen toolstack over SSH: typed wrappers around `xl` and friends.

Knows nothing of pytest. Each call raises :class:`XlError` with xl's own
error text when xl fails, so that text reaches the test report verbatim.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import timeouts as t
from .dom0_layout import XEN_LOG_DIR
from .remote import CommandResult, Remote


class XlError(RuntimeError):
    def __init__(self, result: CommandResult) -> None:
        self.result = result
        text = (result.stderr.strip() or result.stdout.strip())[-3000:]
        super().__init__(f"`{result.command}` failed (exit {result.rc}):\n{text}")


@dataclass(frozen=True)
class XenInfo:
    """The parts of `xl info` the harness uses, plus the raw mapping."""

    raw: dict[str, str]

    @property
    def xen_version(self) -> str:
        extra = self.raw.get("xen_extra", "")
        base = f"{self.raw.get('xen_major', '0')}.{self.raw.get('xen_minor', '0')}"
        match = re.match(r"\.(\d+)", extra)
        return base + (f".{match.group(1)}" if match else "")

    @property
    def virt_caps(self) -> frozenset[str]:
        return frozenset(self.raw.get("virt_caps", "").split())

    @property
    def paging(self) -> str:
        """How a PVH or HVM guest's memory is translated unless its config says `hap = 0`:
        "hap" where Xen offers it (virt_caps; `hap=0` on Xen's command line takes it away),
        "shadow" where only shadow paging is offered, "" where xl names neither."""
        if "hap" in self.virt_caps and not HAP_OFF.search(self.raw.get("xen_commandline", "")):
            return "hap"
        return "shadow" if "shadow" in self.virt_caps else ""

    @property
    def xen_caps(self) -> frozenset[str]:
        return frozenset(self.raw.get("xen_caps", "").split())

    @property
    def free_memory_mb(self) -> int:
        return int(self.raw.get("free_memory", "0"))

    @property
    def total_memory_mb(self) -> int:
        return int(self.raw.get("total_memory", "0"))

    @property
    def dom0_kernel(self) -> str:
        return self.raw.get("release", "")


# Xen's command line turning HAP off for every guest (its boolean_param "hap").
HAP_OFF = re.compile(r"(?:^|\s)(?:hap=(?:0|no|false|off|disable)|no-hap)(?=\s|$)")


def parse_xl_info(text: str) -> XenInfo:
    raw: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            key = key.strip()
            raw[key] = value.strip()
        elif key and line.strip():  # continuation (long xen_commandline)
            raw[key] += " " + line.strip()
    return XenInfo(raw)


@dataclass(frozen=True)
class Domain:
    name: str
    domid: int
    memory_mb: int
    vcpus: int
    state: str

    @property
    def running(self) -> bool:
        """Alive and unpaused: on a CPU (r), waiting for an event (b), or runnable but
        waiting for a CPU, which `xl list` shows as no flag at all ("------"; seen for a
        restored HVM guest on a busy 2-core TCG host). Not paused, shut down, crashed
        or dying."""
        return not any(flag in self.state for flag in "pscd")

    @property
    def crashed(self) -> bool:
        return "c" in self.state

    @property
    def dying(self) -> bool:
        return "d" in self.state


def domain_paging(text: str) -> str:
    """A domain's paging from `xl list -l` (libxl's stored config, c_info.hap): "hap",
    "shadow", or "" for a PV domain or a config that does not say."""
    try:
        data = json.loads(text)
    except ValueError:
        return ""
    if isinstance(data, list):
        data = data[0] if data else {}
    c_info = ((data or {}).get("config") or {}).get("c_info") or {}
    if str(c_info.get("type", "")).lower() == "pv":
        return ""
    return {"true": "hap", "false": "shadow"}.get(str(c_info.get("hap", "")).lower(), "")


def parse_xl_list(text: str) -> list[Domain]:
    domains = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5 or not fields[1].isdigit():
            continue
        # Names have no spaces in xl; state is the 5th column.
        domains.append(Domain(fields[0], int(fields[1]), int(fields[2]), int(fields[3]), fields[4]))
    return domains


# The domain an `xl -vvv restore` or `xl -vvv migrate-receive` created, as libxl names it
# ("initiate_domain_create: Domain 6:restoring, not running bootloader") or libxc does
# ("xc: detail: fd 12, dom 6, hvm 1, stream_type 0"); Xen 4.17.5's xl, seen here.
CREATED_DOMID = re.compile(r"initiate_domain_create: Domain (\d+):|xc: detail: fd \d+, dom (\d+), hvm")


def created_domid(log: str) -> int | None:
    """The domid the restore side of a toolstack log created (the last one named), or None."""
    found = [int(a or b) for a, b in CREATED_DOMID.findall(log)]
    return found[-1] if found else None


def follow_domid(guest, log: str, ok: bool = True) -> None:
    """After a restore, or a migration that succeeded, the guest is a new domain: take its
    domid from the toolstack's log, so a death right after (a PVH guest's triple fault
    once resumed) is looked up under the domain that died, not the one that was saved.
    A migration that failed (``ok`` false) leaves the guest at the source: there a guest
    that died while suspending, "d10v0 Triple fault", is d10, not the receiver's
    half-built d11 (bookworm, Xen 4.17.5, seen here)."""
    domid = created_domid(log) if ok else None
    if domid is not None:
        guest.domid = domid


PANIC_PATTERNS = re.compile(
    r"(Panic on CPU|FATAL TRAP|Xen BUG at|Xen WARN at|\bBUG\b|Assertion '.*' failed)"
)


class Xl:
    """`xl` on one dom0."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def _xl(self, args: str, timeout: float | None = None) -> CommandResult:
        result = self.remote.run(f"xl {args}", timeout=timeout)
        if result.rc != 0:
            raise XlError(result)
        return result

    def info(self) -> XenInfo:
        return parse_xl_info(self._xl("info").stdout)

    def list(self) -> list[Domain]:
        return parse_xl_list(self._xl("list").stdout)

    def domain(self, name: str) -> Domain | None:
        return next((d for d in self.list() if d.name == name), None)

    def domid(self, name: str) -> int:
        return int(self._xl(f"domid {shlex.quote(name)}").stdout.strip())

    def paging(self, domain: int | str) -> str:
        """How this domain's memory is translated (:func:`domain_paging`)."""
        return domain_paging(self._xl(f"list -l {shlex.quote(str(domain))}").stdout)

    def dmesg(self, clear: bool = False) -> str:
        return self._xl("dmesg -c" if clear else "dmesg").stdout

    def create(self, config_path: str, timeout: float = t.XL_CREATE_S, paused: bool = False) -> CommandResult:
        """`xl create`; ``paused`` (`-p`) leaves the domain paused until :meth:`unpause`, so
        its domid is known before it runs a single instruction."""
        return self._xl(f"create {'-p ' if paused else ''}{shlex.quote(config_path)}", timeout=timeout)

    def unpause(self, domain: int | str) -> None:
        self._xl(f"unpause {shlex.quote(str(domain))}")

    def destroy(self, name: str, timeout: float = t.XL_DESTROY_S) -> None:
        self._xl(f"destroy {shlex.quote(name)}", timeout=timeout)

    @contextlib.contextmanager
    def guests_paused(self) -> Iterator[list[str]]:
        """Pause every running guest for the ``with`` block, then unpause them.

        Under TCG two L1s share the host's cores, and a guest whose probe ticks costs
        its L1 about half a core here: a second L1 restored beside it took 31.5 s to
        answer SSH, against 5.7 s beside an idle one. A paused guest costs nothing."""
        names = [d.name for d in self.list() if d.domid != 0 and d.running]
        paused = []
        try:
            for name in names:
                self._xl(f"pause {shlex.quote(name)}")
                paused.append(name)
            yield paused
        finally:
            for name in paused:
                with contextlib.suppress(XlError):  # gone meanwhile: its user will say so
                    self._xl(f"unpause {shlex.quote(name)}")

    def destroy_all_guests(self, timeout: float = t.XL_DESTROY_ALL_S) -> list[str]:
        """Destroy every domain but dom0 (and those already dying), all at once: one
        `xl destroy` each, in parallel, since an HVM guest's device model takes seconds
        to go. Returns their names; raises XlError naming any still alive afterwards."""
        doomed = {d.domid: d.name for d in self.list() if d.domid != 0 and not d.dying}
        if not doomed:
            return []
        result = self.remote.run("".join(f"xl destroy {domid} & " for domid in doomed) + "wait",
                                 timeout=timeout)
        left = [d.name for d in self.list() if d.domid in doomed and not d.dying]
        if left:
            raise XlError(CommandResult(result.command, result.rc or 1, result.stdout,
                                        f"still there after xl destroy: {', '.join(left)}\n{result.stderr}",
                                        result.host, result.seconds))
        return list(doomed.values())

    def save(self, name: str, path: str, timeout: float = t.XL_STREAM_S) -> CommandResult:
        return self._xl(f"-vvv save {shlex.quote(name)} {shlex.quote(path)}", timeout=timeout)

    def restore(self, path: str, timeout: float = t.XL_STREAM_S) -> CommandResult:
        return self._xl(f"-vvv restore {shlex.quote(path)}", timeout=timeout)

    def migrate(self, name: str, host: str, timeout: float = t.XL_STREAM_S, extra: str = "") -> CommandResult:
        return self._xl(f"-vvv migrate {extra} {shlex.quote(name)} {shlex.quote(host)}",
                        timeout=timeout)

    def debug_keys(self, keys: str) -> None:
        self._xl(f"debug-keys {shlex.quote(keys)}")

    def guest_logs(self, *names: str) -> list[GuestLog]:
        """These guests' own logs in this dom0 (:func:`guest_logs`)."""
        return guest_logs(self.remote, names)


def dmesg_problems(text: str) -> list[str]:
    """Lines of `xl dmesg` that show a panic, BUG, WARN or failed assertion."""
    return [line for line in text.splitlines() if PANIC_PATTERNS.search(line)]


# ------------------------------------------------------------------ a guest's own logs

# What each of a guest's logs in XEN_LOG_DIR (dom0_layout) is evidence of: its device model's
# (libxl's qemu-dm-<name>.log: QEMU's own complaints, as "xen-qemu-system-i386:
# -incoming fd:15: ...") and xl's own (xl-<name>.log, when xl waits in the background).
LOG_KINDS = (("qemu-dm-", "device-model"), ("xl-", "toolstack"))
# A domain being received (xl migrate-receive) is "<name>--incoming" until it is complete,
# and its device model logs under that name.
INCOMING = "--incoming"
LOG_MARK = "=====nx-guest-log "
LOG_BYTES = 256 * 1024  # of each log, its end: a device model's log is a few lines


@dataclass(frozen=True)
class GuestLog:
    """One of a guest's logs in dom0: ``kind`` "device-model" or "toolstack"."""

    kind: str
    path: str
    text: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def tail(self, lines: int) -> str:
        return "\n".join(self.text.rstrip("\n").splitlines()[-lines:])


def guest_log_paths(names: Iterable[str]) -> list[str]:
    """Each guest's qemu-dm and xl logs, as itself and as ``<name>--incoming``."""
    return [f"{XEN_LOG_DIR}/{prefix}{name}{suffix}.log" for name in names for suffix in ("", INCOMING)
            for prefix, _ in LOG_KINDS]


def guest_logs(remote: Remote, names: Iterable[str], max_bytes: int = LOG_BYTES) -> list[GuestLog]:
    """The logs dom0 keeps of the guests ``names`` (:func:`guest_log_paths`, those that
    exist; the last ``max_bytes`` of each), read in one command."""
    paths = guest_log_paths(names)
    script = (f"for f in {' '.join(shlex.quote(p) for p in paths)}; do [ -f \"$f\" ] || continue; "
              f"printf '%s%s\\n' {shlex.quote(LOG_MARK)} \"$f\"; tail -c {max_bytes} \"$f\"; echo; done")
    result = remote.run(script, timeout=t.SMALL_COMMAND_S)
    if result.rc != 0:
        raise XlError(result)
    return parse_guest_logs(result.stdout)


def parse_guest_logs(text: str) -> list[GuestLog]:
    """:func:`guest_logs`'s output, one GuestLog per file in it."""
    logs: list[GuestLog] = []
    for chunk in text.split(LOG_MARK)[1:]:
        path, _, body = chunk.partition("\n")
        name = path.rsplit("/", 1)[-1]
        kind = next(k for prefix, k in LOG_KINDS if name.startswith(prefix))
        logs.append(GuestLog(kind, path, body.removesuffix("\n")))
    return logs
