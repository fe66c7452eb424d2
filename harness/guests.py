"""L2 guests: specs -> xl configs, lifecycle, console capture, probe handshake.

Every guest boots the host image's own kernel with a small initramfs whose
probe fills pages with a nonce-derived pattern and reports, on the guest
console, each page's frame number and SHA-256. dom0's xenconsoled logs PV and
PVH consoles to files; an HVM guest's serial port is a file QEMU writes. The
harness reads those files over SSH and parses them (harness/probe_report.py).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import dom0_layout as layout
from . import incidents
from . import timeouts as t
from .config import PAGING_MODES, RunConfig
from .dirty_pages import DirtyFrames
from .probe_report import ProbeReport, parse_probe_log
from .remote import RemoteError
from .xen import Domain, Xl, XlError

log = logging.getLogger(__name__)

CONSOLE_DIR = layout.CONSOLE_DIR


class GuestError(RuntimeError):
    """A guest failed to come up; the message carries xl's text or the console tail."""


class GuestTimeout(GuestError):
    pass


class GuestCrashed(GuestError):
    """The domain is gone or crashed; ``evidence`` holds its own `xl dmesg` lines and
    console tail, ``phase`` when it was seen (create: before it was unpaused)."""

    def __init__(self, message: str, evidence: dict[str, str] | None = None, gone: bool = True,
                 domid: int = -1, phase: str = "early-boot") -> None:
        super().__init__(message)
        self.evidence, self.gone, self.domid, self.phase = evidence or {}, gone, domid, phase


@dataclass(frozen=True)
class GuestSpec:
    """What to create; rendered into an xl config by :meth:`xl_config`."""

    type: str
    name: str
    memory_mb: int = 256
    vcpus: int = 1
    probe_pages: int = 64
    tick_ms: int = 0
    dirty_mb: int = 0
    dirty_pct: int = 0
    extra_args: str = ""
    kernel: str = layout.GUEST_KERNEL
    ramdisk: str = layout.GUEST_INITRAMFS
    paging: str = ""  # PVH/HVM: "shadow" is `hap = 0`; "hap", or "" the host's (owned_guest: the run's)

    def __post_init__(self) -> None:
        if self.type not in ("pv", "pvh", "hvm") or self.paging not in ("", *PAGING_MODES):
            raise ValueError(f"guest type {self.type!r} (choose pv, pvh or hvm), paging {self.paging!r} "
                             f"(choose {' or '.join(PAGING_MODES)}, or '' for the host's)")

    @property
    def console_log(self) -> str:
        """Where dom0 finds this guest's console output."""
        return layout.console_log(self.type, self.name)

    def cmdline(self) -> str:
        # An HVM guest's serial port traps to the device model for every byte,
        # which is slow under TCG: keep its kernel quiet (panics still print).
        console = "console=ttyS0,115200 quiet loglevel=1" if self.type == "hvm" else "console=hvc0 loglevel=4"
        probe = (f"nxprobe.pages={self.probe_pages} nxprobe.tick_ms={self.tick_ms} "
                 f"nxprobe.dirty_mb={self.dirty_mb} nxprobe.dirty_pct={self.dirty_pct}")
        return f"{console} panic=-1 {probe} {self.extra_args}".strip()

    def xl_config(self) -> str:
        lines = [
            f'name = "{self.name}"',
            f'type = "{self.type}"',
            f"memory = {self.memory_mb}",
            f"maxmem = {self.memory_mb}",
            f"vcpus = {self.vcpus}",
            f'kernel = "{self.kernel}"',
            f'ramdisk = "{self.ramdisk}"',
            f'cmdline = "{self.cmdline()}"',
            'on_poweroff = "destroy"',
            'on_reboot = "destroy"',
            'on_crash = "preserve"',
        ]
        if self.type != "pv" and self.paging == "shadow":
            lines.append("hap = 0")  # Xen's shadow page tables instead of (emulated) EPT/NPT
        if self.type == "hvm":
            lines += [
                f'serial = "file:{self.console_log}"',
                'vga = "none"',
                "vnc = 0",
                "sdl = 0",
                'boot = "c"',
            ]
        return "\n".join(lines) + "\n"


@dataclass
class ProbePageInfo:
    """One probe page as the harness knows it: frame numbers and content hash."""

    index: int
    pfn: int
    sha256: str
    mfn: int | None = None

    @property
    def gfn(self) -> int:
        """The frame a mapping call takes: MFN for PV, guest pfn for PVH/HVM."""
        return self.mfn if self.mfn is not None else self.pfn


@dataclass
class Guest:
    """A created L2 guest on one host."""

    spec: GuestSpec
    xl: Xl
    domid: int = -1
    report: ProbeReport | None = None
    pages: list[ProbePageInfo] = field(default_factory=list)
    dirty_frames: DirtyFrames | None = None  # the probe's dirty buffer, if it has one
    timings: dict[str, float] = field(default_factory=dict)
    image: str = ""  # the host image it runs on, for incidents
    released: bool = False  # destroyed by the harness or a check: not a death
    death_recorded: bool = False  # its current death is already an incident
    verified_at: float = -1e9  # when `xl list` last showed it alive with this domid (monotonic)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def remote(self):
        return self.xl.remote

    def create(self) -> None:
        cfg = f"{layout.GUEST_CONFIG_DIR}/{self.name}.cfg"
        self.remote.put_text(self.spec.xl_config(), cfg)
        self.remote.run_expect(f"mkdir -p {CONSOLE_DIR} && rm -f {shlex.quote(self.spec.console_log)}",
                               timeout=t.QUICK_COMMAND_S)
        started = time.monotonic()
        self.released = self.death_recorded = False
        try:  # paused: its domid is known before it runs, so its death has its own evidence
            self.xl.create(cfg, paused=True)
        except XlError as exc:
            raise GuestError(f"xl create of {self.name} ({self.type}) was refused:\n"
                             f"{exc.result.stderr.strip() or exc.result.stdout.strip()}") from None
        self.timings["create"] = round(time.monotonic() - started, 2)
        self._created_at = started
        try:
            self.domid = self.xl.domid(self.name)
            self.xl.unpause(self.domid)
        except XlError:
            raise self._crashed(f"{self.name} ({self.type}) is gone from `xl list` right after "
                                "`xl create -p`", phase="create") from None

    def console(self) -> str:
        path = shlex.quote(self.spec.console_log)
        return self.remote.run(f"cat {path} 2>/dev/null", timeout=t.SMALL_COMMAND_S).stdout

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(self.console().splitlines()[-lines:]) or "(console is empty)"

    def wait_ready(self, timeout: float) -> ProbeReport:
        """Wait for the probe's complete report; fail fast on a crash or vanished domain."""
        started = getattr(self, "_created_at", time.monotonic())
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = parse_probe_log(self.console())
                if state.report is None and state.error is None:
                    self.check_alive()
            except RemoteError as exc:  # dom0 slow (TCG, an HVM guest booting): not yet lost
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: dom0 did not answer (%s); still waiting", self.name, exc)
                time.sleep(1.0)
                continue
            if state.error:
                raise GuestError(f"{self.name}: probe reported an error: {state.error}\n"
                                 f"{self.console_tail()}")
            if state.report is not None:
                self.report = state.report
                self.timings["ready"] = round(time.monotonic() - started, 2)
                self.pages = [ProbePageInfo(p.index, p.pfn, p.sha256) for p in state.report.pages]
                self.dirty_frames = DirtyFrames.from_report(state.report)
                return state.report
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{self.name} ({self.type}): the probe did not report within "
                                   f"{timeout:.0f} s; last console lines:\n{self.console_tail()}")
            time.sleep(1.0)

    def check_alive(self) -> Domain:
        """The domain as `xl list` shows it; GuestCrashed if it is gone or crashed."""
        dom = self.xl.domain(self.name)
        if dom is None:
            raise self._crashed(f"{self.name} ({self.type}) d{self.domid} is gone from `xl list`")
        if dom.crashed:
            raise self._crashed(f"{self.name} ({self.type}) d{dom.domid} crashed (state {dom.state})",
                                gone=False)
        return dom

    def death(self, domains: list[Domain] | None = None) -> str | None:
        """None while the domain the harness created (this domid) runs; else what
        happened to it. ``domains``: an `xl list` already taken (one command per check)."""
        doms = self.xl.list() if domains is None else domains
        dom = next((d for d in doms if d.name == self.name), None)
        if dom is None:
            return f"d{self.domid} is gone from `xl list`"
        if dom.domid != self.domid:
            return f"was d{self.domid}, now d{dom.domid} (another domain of the same name)"
        if dom.crashed or dom.dying:
            return f"d{self.domid} {'crashed' if dom.crashed else 'is dying'} (state {dom.state})"
        return None

    def evidence(self) -> dict[str, str]:
        """Xen's lines about this domid only, and the console tail."""
        try:
            dmesg = "\n".join(incidents.domain_lines(self.xl.dmesg(), self.domid)[-12:])
        except XlError as exc:
            dmesg = f"(xl dmesg failed: {exc})"
        return {"dmesg": dmesg, "console": self.console_tail()}

    def _crashed(self, what: str, gone: bool = True, phase: str = "early-boot") -> GuestCrashed:
        evidence = self.evidence()
        xen = (f"\nxl dmesg about d{self.domid}:\n{evidence['dmesg']}" if evidence["dmesg"]
               else f"\nxl dmesg has no line about d{self.domid}")
        return GuestCrashed(f"{what}; last console lines:\n{evidence['console']}{xen}",
                            evidence, gone=gone, domid=self.domid, phase=phase)

    def incident(self, phase: str, detail: str, action: str, nodeid: str = "",
                 evidence: dict[str, str] | None = None) -> incidents.Incident:
        """Record this guest's death (the incidents layer classifies it)."""
        self.death_recorded = True
        return incidents.record(incidents.Incident(
            "guest", self.name, phase, guest_type=self.type, image=self.image, domid=self.domid,
            nodeid=nodeid, detail=detail, evidence=evidence if evidence is not None else self.evidence(),
            action=action))

    def adopt(self, fresh: Guest) -> None:
        """Become ``fresh`` (a new domain from the same spec), so fixtures holding this
        object see the live guest."""
        self.domid, self.report, self.pages = fresh.domid, fresh.report, fresh.pages
        self.dirty_frames = fresh.dirty_frames
        self.timings, self._created_at = fresh.timings, fresh._created_at
        self.released = self.death_recorded = False
        self.verified_at = time.monotonic()

    def resolve_mfns(self, p2m: Callable[[int, list[int]], dict[int, int]]) -> None:
        """For PV guests, look up each probe page's (and dirty-buffer frame's) MFN in the guest's p2m."""
        if self.type != "pv":
            return
        dirty = self.dirty_frames.all_pfns if self.dirty_frames else []
        table = p2m(self.domid, [p.pfn for p in self.pages] + dirty)
        for page in self.pages:
            page.mfn = table[page.pfn]
        if self.dirty_frames:
            self.dirty_frames.resolve(table)

    def replace_if_dead(self, p2m: Callable[[int, list[int]], dict[int, int]], timeout: float,
                        why: str, nodeid: str = "", domains: list[Domain] | None = None) -> bool:
        """If the domain the harness created died since it was last used (gone, crashed,
        or another domid now has its name), record an incident (between checks; ``why``
        says when it was found, ``nodeid`` the check about to run) unless its death is
        already one, and create it again in place from its spec. A check then starts
        from a live guest, and a death it did not cause is not blamed on it. Returns
        whether the guest was replaced. ``domains``: an `xl list` already taken."""
        if self.released:
            return False
        detail = self.death(domains)
        if detail is None:
            self.verified_at = time.monotonic()
            return False
        if not self.death_recorded:
            self.incident("between-checks", f"{detail}, found {why}", "recreated", nodeid=nodeid)
        log.warning("%s (%s) %s, found %s; creating it again", self.name, self.type, detail, why)
        self.destroy()
        fresh = start_guest(self.xl, self.spec, timeout, image=self.image)
        fresh.resolve_mfns(p2m)
        self.adopt(fresh)
        return True

    def destroy(self) -> None:
        """Destroy the domain if it exists. Idempotent."""
        self.released = True
        try:
            if self.xl.domain(self.name) is not None:
                self.xl.destroy(self.name)
        except XlError as exc:
            log.warning("destroying %s: %s", self.name, exc)


# Every death below is an incident (harness/incidents.py). How many times a shared guest
# (created before the L1 snapshot) is created again after an early-boot death: seen twice in a row here.
SHARED_EARLY_CRASH_RETRIES = 3


def died_in_early_boot(exc: GuestCrashed) -> bool:
    """Gone before its report, silently or by a triple fault of *its own* domid (the
    one this TCG nested-SVM host is known for; ``on_reboot=destroy`` removed it).
    Another domain's fault is not evidence."""
    console = exc.evidence.get("console", "")
    silent = console in ("", "(console is empty)")
    return exc.gone and (silent or "Triple fault" in exc.evidence.get("dmesg", ""))


def _early_death(guest: Guest, exc: GuestCrashed, retry: bool) -> bool:
    """Record the death (an incident, classified by that domain's own evidence); whether
    the guest may be created again: ``retry`` allows it and a known emulator-fault signature
    matched (:func:`incidents.retriable`). A death with no signature is a failure at once."""
    incident = guest.incident(exc.phase, str(exc).split("; last console lines")[0], "failed",
                              evidence=exc.evidence)
    again = retry and incidents.retriable(incident)
    if again:
        incident.action = "recreated"
    log.warning("%s (%s) died in early boot%s: %s", guest.name, guest.type,
                "; creating it again" if again else
                ("" if not retry else " with no known emulator-fault signature: not created again"), exc)
    return again


def start_guest(xl: Xl, spec: GuestSpec, timeout: float,
                early_crash_retries: int = SHARED_EARLY_CRASH_RETRIES, image: str = "") -> Guest:
    """Create a guest and wait for its probe; destroy it if it never gets ready.

    A guest that disappears before its report, silently or with a triple fault in `xl dmesg`
    (it died in early boot; ``on_reboot=destroy`` removed it), is created again at most
    ``early_crash_retries`` times (a check's own PVH guest died in early boot twice in a row
    on trixie's QEMU 10 TCG); each death is an incident. Other crashes are never retried.
    """
    for attempt in range(early_crash_retries + 1):
        guest = Guest(spec, xl, image=image)
        try:
            guest.create()
            guest.wait_ready(timeout)
        except GuestCrashed as exc:
            guest.destroy()
            if not died_in_early_boot(exc):
                raise
            if not _early_death(guest, exc, retry=attempt < early_crash_retries):
                raise
            continue
        except BaseException:
            guest.destroy()
            raise
        break
    log.info("%s (%s) ready in %.1f s after xl create", guest.name, guest.type, guest.timings["ready"])
    return guest


class GuestPool:
    """One shared, probe-ready guest per type on one host, for checks that only read.

    A guest that is gone or crashed is replaced on the next request. Checks that
    change a guest (save/restore, migration, destroy) use ``own_guest`` instead.
    """

    def __init__(self, xl: Xl, p2m: Callable[[int, list[int]], dict[int, int]], timeout: float,
                 image: str = "", paging: str = "") -> None:
        self.xl, self.p2m, self.timeout, self.image, self.paging = xl, p2m, timeout, image, paging
        self.guests: dict[str, Guest] = {}

    def get(self, guest_type: str, nodeid: str = "", domains: list[Domain] | None = None) -> Guest:
        """The shared guest of this type, alive and with the domid the harness created
        (one `xl list`, or ``domains``); a dead one is an incident and is replaced in
        place, so a fixture holding it sees the new domain."""
        guest = self.guests.get(guest_type)
        if guest is not None:
            guest.released = False  # a shared guest is never the check's to destroy
            guest.replace_if_dead(self.p2m, self.timeout, "when a check asked for it", nodeid, domains)
            return guest
        spec = GuestSpec(type=guest_type, name=f"nx-shared-{guest_type}", paging=self.paging)
        guest = start_guest(self.xl, spec, self.timeout, image=self.image)
        guest.resolve_mfns(self.p2m)
        self.guests[guest_type] = guest
        return guest

    def adopt_or_create(self, types: tuple[str, ...], create: bool = True) -> None:
        """Take over shared guests that already run (a restored snapshot has them);
        with ``create``, create the missing ones all at once; then wait for each probe."""
        pending: list[Guest] = []
        died: dict[str, GuestCrashed] = {}
        for guest_type in types:
            spec = GuestSpec(type=guest_type, name=f"nx-shared-{guest_type}", paging=self.paging)
            dom = self.xl.domain(spec.name)
            guest = Guest(spec, self.xl, image=self.image)
            if dom is not None and not dom.crashed:
                guest.domid = dom.domid
                guest._created_at = time.monotonic()
            elif create:
                if dom is not None:
                    guest.destroy()
                try:
                    guest.create()
                except GuestCrashed as exc:  # died at once: handled with the others below
                    died[guest_type] = exc
            else:
                continue
            pending.append(guest)
        for guest in pending:
            try:
                if guest.type in died:
                    raise died[guest.type]
                guest.wait_ready(self.timeout)
            except GuestCrashed as exc:
                # The same early-boot death start_guest retries: an incident.
                if not died_in_early_boot(exc):
                    raise
                if not _early_death(guest, exc, retry=True):
                    guest.destroy()  # the first check's setup fails naming it (harness/verdict.py)
                    continue
                guest.destroy()
                try:
                    guest = start_guest(self.xl, guest.spec, self.timeout,
                                        early_crash_retries=SHARED_EARLY_CRASH_RETRIES - 1, image=self.image)
                except GuestCrashed as again:
                    if not died_in_early_boot(again):
                        raise
                    # Each death is an incident. The host comes up without it: checks that
                    # need none run (trixie: 4 deaths errored all of xen_tools_tests).
                    log.warning("%s (%s) died in early boot %d times in a row; the host comes up "
                                "without it, and a check that needs it creates it again",
                                guest.name, guest.type, SHARED_EARLY_CRASH_RETRIES + 1)
                    continue
            guest.resolve_mfns(self.p2m)
            self.guests[guest.type] = guest
            if "ready" in guest.timings:  # a stage line (harness/stages.py)
                log.info("%s (%s) ready in %.1f s after xl create", guest.name, guest.type,
                         guest.timings["ready"])

    def destroy_all(self) -> None:
        for guest in self.guests.values():
            guest.destroy()
        self.guests.clear()


def attach_pool(host, cfg: RunConfig, create: bool) -> GuestPool:
    """Give ``host`` its shared-guest pool, adopting the shared guests already running
    (restored from a snapshot) and, with ``create``, creating the configured ones."""
    from .agent.client import Agent

    if host.guest_pool is None:
        agent = Agent(host.remote.as_runner())
        image = getattr(getattr(host, "image", None), "name", "")
        if getattr(host, "guest_paging", None) != cfg.guests.paging:  # facts say the guests' paging
            host.guest_paging, host._facts = cfg.guests.paging, None
        host.guest_pool = GuestPool(host.xl, agent.p2m, cfg.timeouts.guest_ready, image=image,
                                    paging=cfg.guests.paging)
        # An HVM guest needs a device model built against this Xen; without one, none.
        types = tuple(t for t in cfg.snapshot_guests if t != "hvm" or host.facts().device_model != "")
        if types:
            started = time.monotonic()
            host.guest_pool.adopt_or_create(types, create=create)
            log.info("%s: shared guests %s ready in %.1f s", host.name,
                     ", ".join(host.guest_pool.guests), time.monotonic() - started)
    return host.guest_pool


def save_console(guest: Guest, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{guest.name}.console.log").write_text(guest.console())


@contextlib.contextmanager
def owned_guest(xen_host, spec: GuestSpec, agent, artifacts_dir: Path, timeout: float) -> Iterator[Guest]:
    """A guest for the ``with`` block (its paging the run's if the spec names none): created,
    MFNs resolved, console kept, destroyed."""
    image = getattr(getattr(xen_host, "image", None), "name", "")
    if not spec.paging:
        spec = replace(spec, paging=getattr(xen_host, "guest_paging", "") or "")
    own = start_guest(xen_host.xl, spec, timeout, image=image)
    try:
        own.resolve_mfns(agent.p2m)
        yield own
    finally:
        try:
            save_console(own, artifacts_dir / "hosts" / xen_host.name / "guests")
        finally:
            own.destroy()
