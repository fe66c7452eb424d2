"""A failed guest operation's evidence (`xl save`, `xl restore`, `xl migrate`): the
guest's own logs in dom0 and its own ``xl dmesg`` lines.

libxl's own failure text says only "device model spawn failed (rc=-3)"; the device
model's log says why ("xen-qemu-system-i386: -incoming fd:15: fd: migration to a file
is not supported. Use file: instead.", Debian testing). So on a failure the guest's
``qemu-dm-<name>*.log`` and ``xl-<name>*.log`` of each dom0 involved (the receiver's
``<name>--incoming`` ones too) are written beside the check's failure artifacts, handed
to the verdict layer as ``device-model`` and ``toolstack`` evidence, and the device
model's last lines go into the failure message. ``xl dmesg`` is split the same way: the
guest's own domains' lines are ``dmesg`` evidence; the host-wide tail is only shown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .incidents import domain_lines
from .verdict import add_evidence, show
from .xen import GuestLog, guest_logs

log = logging.getLogger("nested_xen")

DM_TAIL_LINES = 15  # of each device model log, in the failure message
DMESG_TAIL_LINES = 25  # of the host-wide `xl dmesg`, shown
DMESG_TITLE = "xl dmesg (host-wide tail, not evidence)"


@dataclass
class Side:
    """One dom0 a failed operation ran on: its host's name, its remote, its ``xl dmesg``
    (read after the failure) and the domids the guest had there (the source's, the one a
    restore or receiver created; None: not known)."""

    host: str
    remote: Any
    dmesg: str = ""
    domids: Sequence[int | None] = field(default_factory=tuple)


def check_dir(artifacts: Path, nodeid: str) -> Path:
    """The check's failure artifacts (``artifacts/failures/<nodeid>``, beside its serial log
    and ``xl dmesg``; report.html shows each file there)."""
    from .fixtures.run import _safe

    return artifacts / "failures" / _safe(nodeid)


def own_dmesg_lines(dmesg: str, domids: Iterable[int | None]) -> list[str]:
    """The lines of ``xl dmesg`` about these domains only, each once, in order."""
    wanted = {line for domid in domids if domid is not None for line in domain_lines(dmesg, domid)}
    return [line for line in dmesg.splitlines() if line in wanted]


def dmesg_evidence(node: Any, sides: Sequence[Side]) -> None:
    """Each side's ``xl dmesg``: its tail shown (host-wide: never matched), the guest's own
    domains' lines as ``dmesg`` evidence."""
    for side in sides:
        title = DMESG_TITLE if len(sides) == 1 else DMESG_TITLE.replace("dmesg", f"dmesg on {side.host}", 1)
        show(node, title, "\n".join(side.dmesg.splitlines()[-DMESG_TAIL_LINES:]))
        add_evidence(node, "dmesg", "\n".join(own_dmesg_lines(side.dmesg, side.domids)))


def log_evidence(node: Any, sides: Sequence[Side], names: Iterable[str], dest: Path,
                 lines: int = DM_TAIL_LINES) -> str:
    """Each side's logs of guests ``names`` (and ``<name>--incoming``): written to ``dest``
    as ``<host>-<file>``, added as ``device-model``/``toolstack`` evidence. Returns the
    device models' last ``lines`` lines, for the failure message ("" none); a dom0 that
    does not answer is said there, never raised over the failure being reported."""
    names = list(names)
    parts = []
    for side in sides:
        try:
            found = guest_logs(side.remote, names)
        except Exception as exc:  # noqa: BLE001 - the operation's own failure is the one to report
            log.warning("reading %s's guest logs on %s: %s", ", ".join(names), side.host, exc)
            parts.append(f"(the guest's logs on {side.host} could not be read: {exc})")
            continue
        for one in found:
            path = _keep(one, side.host, dest)
            add_evidence(node, one.kind, one.text)
            if one.kind == "device-model":
                parts.append(f"device model log {one.name} on {side.host} (last {lines} lines; "
                             f"all of it: {path}):\n{one.tail(lines) or '(empty)'}")
    return "\n".join(parts)


def _keep(one: GuestLog, host: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{host}-{one.name}"
    path.write_text(one.text)
    return path


def failure_evidence(node: Any, sides: Sequence[Side], names: Iterable[str], dest: Path) -> str:
    """Both kinds of evidence of a failed operation (:func:`dmesg_evidence`,
    :func:`log_evidence`); returns the text for its failure message."""
    dmesg_evidence(node, sides)
    return log_evidence(node, sides, names, dest)
