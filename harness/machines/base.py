"""The L1 machine interface every backend implements.

Machines know nothing of Xen: they start a VM from a kernel, modules and a
disk, expose its serial log, its forwarded SSH address and its liveness, wait
for readiness stages given to them as data, and save/restore themselves.
"""

from __future__ import annotations

import abc
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import timeouts as t
from ..accel import AccelChoice

log = logging.getLogger(__name__)


class MachineError(RuntimeError):
    """Base class of machine failures."""


class MachineStartError(MachineError):
    """The VM could not be started (missing binary, bad option, port in use)."""


class StageTimeout(MachineError):
    """A readiness stage did not arrive before its deadline."""

    def __init__(self, stage: str, seconds: float, hint: str, tail: str, log_path: Path) -> None:
        self.stage, self.tail, self.log_path = stage, tail, log_path
        super().__init__(
            f"{hint} (stage {stage!r} not reached within {seconds:g} s).\n"
            f"Full serial log: {log_path}\nLast serial lines:\n{tail}"
        )


class MachineExited(MachineError):
    """The VM's process ended while the harness was waiting on it."""

    def __init__(self, stage: str, status: str, tail: str, log_path: Path) -> None:
        self.stage, self.tail, self.log_path = stage, tail, log_path
        super().__init__(
            f"QEMU exited ({status}) while waiting for stage {stage!r}.\n"
            f"Full serial log: {log_path}\nLast serial lines:\n{tail}"
        )


class MachineCrashed(MachineError):
    """A crash pattern (panic) appeared on the console."""

    def __init__(self, stage: str, line: str, tail: str, log_path: Path) -> None:
        self.stage, self.tail, self.log_path = stage, tail, log_path
        super().__init__(
            f"crash on the console while waiting for stage {stage!r}: {line.strip()}\n"
            f"Full serial log: {log_path}\nLast serial lines:\n{tail}"
        )


@dataclass(frozen=True)
class Module:
    """A multiboot module: a file and its command line."""

    path: Path
    args: str = ""


@dataclass(frozen=True)
class LinkPorts:
    """The two 127.0.0.1 UDP ports of a private L1-to-L1 link, seen from one end."""

    local: int
    peer: int

    def reversed(self) -> LinkPorts:
        return LinkPorts(self.peer, self.local)


@dataclass(frozen=True)
class MachineSpec:
    """What to boot, independent of the backend."""

    name: str
    kernel: Path
    append: str
    modules: tuple[Module, ...]
    disk: Path
    memory_mb: int
    cpus: int
    accel: AccelChoice
    run_dir: Path
    qemu_binary: str = "qemu-system-x86_64"
    # The private link NIC (PCI slot 0x6) every L1 has: a UDP socket between two
    # ports on 127.0.0.1, (local, peer). None: the machine picks a free pair, so the
    # link leads nowhere until another L1 is started with the pair reversed.
    link: LinkPorts | None = None
    # An IOMMU for the L1, with every virtio device behind it: a PVH dom0 needs one
    # (Xen refuses to build a PVH hardware domain without IOMMU).
    iommu: bool = False


@dataclass(frozen=True)
class Stage:
    """A readiness stage: a console pattern or a probe, with its own deadline."""

    name: str
    timeout: float
    hint: str
    pattern: str | None = None
    probe: Callable[[], bool] | None = None
    interval: float = 0.25


@dataclass(frozen=True)
class SnapshotFiles:
    """A saved machine: its memory stream and the frozen disk it belongs to.

    ``stream`` is how the memory was written: "stream" (a plain migration stream
    through a pipe; any QEMU) or "mapped-ram" (QEMU >= 9.0 writes each RAM page at a
    fixed file offset, with multifd in parallel; restoring needs the same setting)."""

    memory: Path
    disk: Path
    stream: str = "stream"
    # dom0's nxchannel.py answered before the save: a restore can ask it first.
    channel: bool = False


CRASH_PATTERNS = (
    r"Panic on CPU \d+",
    r"Kernel panic - not syncing",
)


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)


class Machine(abc.ABC):
    """One L1 VM."""

    spec: MachineSpec
    link: LinkPorts  # this L1's private link ports (XenHost.link, peer_host)

    @property
    @abc.abstractmethod
    def serial_log(self) -> Path: ...

    @property
    @abc.abstractmethod
    def ssh_address(self) -> tuple[str, int]: ...

    @property
    def channel_path(self) -> Path | None:
        """The host end (a UNIX socket) of the virtio-serial channel to dom0's
        nxchannel.py, or None where this backend has none."""
        return None

    @abc.abstractmethod
    def start(self, incoming: SnapshotFiles | None = None) -> None: ...

    @abc.abstractmethod
    def alive(self) -> str | None:
        """None while running; else how it ended (e.g. 'exit status 1')."""

    def wait_incoming(self, timeout: float = t.RESTORE_S, incoming: SnapshotFiles | None = None) -> float:
        """After ``start(incoming=...)``: wait until the restored VM runs; the seconds it took.
        Both backends override it; a machine that cannot restore raises (not a MachineError,
        so no snapshot is discarded for it)."""
        raise NotImplementedError(f"{type(self).__name__} does not restore snapshots")

    @abc.abstractmethod
    def snapshot(self, dest_dir: Path) -> SnapshotFiles: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def read_serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_tail(self, lines: int = 30) -> str:
        return "\n".join(self.read_serial().splitlines()[-lines:])

    def wait_ready(self, stages: list[Stage]) -> dict[str, float]:
        """Wait for each stage in order; return seconds spent per stage."""
        times: dict[str, float] = {}
        offset = 0
        for stage in stages:
            started = time.monotonic()
            offset = self._wait_stage(stage, offset)
            times[stage.name] = round(time.monotonic() - started, 2)
            log.info("%s: %s stage passed in %.1f s", self._stage_label(), stage.name,
                     times[stage.name])
        return times

    def _stage_label(self) -> str:
        spec = getattr(self, "spec", None)
        return spec.name if spec is not None else type(self).__name__

    def _wait_stage(self, stage: Stage, offset: int) -> int:
        deadline = time.monotonic() + stage.timeout
        pattern = re.compile(stage.pattern) if stage.pattern else None
        crash = re.compile("|".join(CRASH_PATTERNS), re.M)
        while True:
            text = self.read_serial()
            hit = crash.search(text, offset)
            if hit:
                raise MachineCrashed(stage.name, hit.group(0), self.serial_tail(), self.serial_log)
            if pattern:
                match = pattern.search(text, offset)
                if match:
                    return match.end()
            elif stage.probe and stage.probe():
                return len(text)
            status = self.alive()
            if status is not None:
                raise MachineExited(stage.name, status, self.serial_tail(), self.serial_log)
            if time.monotonic() > deadline:
                raise StageTimeout(
                    stage.name, stage.timeout, stage.hint, self.serial_tail(), self.serial_log
                )
            time.sleep(stage.interval)
