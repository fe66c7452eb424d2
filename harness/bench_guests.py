"""`nested-xen bench guests`: boot N guests of each type per cell on one L1 and measure the
time to probe-ready and the early-death (emulator-fault) rate (issue 30).

One L1 per TCG thread mode (``-accel tcg,thread=multi|single``; restored from a dom0-only
snapshot when one fits); on it, the cells' batches in turn: each batch creates its guests
(one, or three at once as the cold start does) with the cell's paging, waits for each
probe as the harness does (harness/guests.py: ``Guest.create``, ``wait_ready``), judges a
death as the harness does (``died_in_early_boot``; the known_issues.yaml guest-death entry
its evidence shows), then destroys them. Each finished boot is written to the results file
at once (harness/bench_stats.py), and a run started again boots only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .accel import AccelChoice
from .bench_stats import (
    AT_ONCE,
    GUEST_TYPES,
    NO_THREADS,
    THREADS,
    BenchError,
    BenchFile,
    Boot,
    Cell,
    batches,
    cells,
    interleave,
    markdown,
    parse_axis,
)
from .config import PAGING_MODES, ConfigError, RunConfig, run_config_from_args
from .guests import Guest, GuestCrashed, GuestError, GuestSpec, GuestTimeout, died_in_early_boot
from .host import qemu_for
from .known_issues import KNOWN_ISSUES, KnownIssue, emulator_fault, load_known_issues
from .machines.qemu_choice import qemu_version, qemu_version_label
from .remote import RemoteError
from .wiring import provisioner_for
from .xen import XlError

log = logging.getLogger(__name__)

EVIDENCE_CHARS = 2000  # of each evidence kind kept in a boot's record


@dataclass(frozen=True)
class TcgThreads(AccelChoice):
    """An accelerator choice whose TCG runs ``thread``: "multi" (a host thread per vCPU, what
    harness/accel.py asks) or "single" (one host thread runs every vCPU in turn)."""

    thread: str = "multi"

    def qemu_args(self) -> list[str]:
        return [f"tcg,thread={self.thread}" if a.startswith("tcg") else a for a in super().qemu_args()]


def with_threads(accel: AccelChoice, thread: str) -> AccelChoice:
    """``accel`` with TCG's ``thread`` mode; a KVM choice as it is (it has no such mode)."""
    if accel.accel != "tcg":
        return accel
    return TcgThreads(accel.accel, accel.cpu, accel.reason, thread=thread)


@dataclass(frozen=True)
class Settings:
    """What one `nested-xen bench guests` asks for."""

    boots: int = 10  # per guest type and cell
    paging: tuple[str, ...] = PAGING_MODES
    threads: tuple[str, ...] = THREADS
    at_once: tuple[int, ...] = AT_ONCE
    types: tuple[str, ...] = GUEST_TYPES
    json_path: Path = Path("artifacts/bench-guests.json")

    @property
    def markdown_path(self) -> Path:
        return self.json_path.with_suffix(".md")


def settings_from_args(args: argparse.Namespace, cfg: RunConfig) -> Settings:
    if args.boots < 1:
        raise BenchError(f"--boots: {args.boots}; give at least 1 (issue 30's table wants 10 per cell)")
    json_path = Path(args.json) if getattr(args, "json", None) else cfg.artifacts_dir / "bench-guests.json"
    return Settings(boots=args.boots, paging=parse_axis(args.paging, PAGING_MODES, "--paging"),
                    threads=parse_axis(args.tcg_threads, THREADS, "--tcg-threads"),
                    at_once=parse_axis(args.at_once, AT_ONCE, "--at-once"),
                    types=parse_axis(args.types, GUEST_TYPES, "--types"), json_path=json_path)


# ---------------------------------------------------------------------- one batch


def judge(guest: Guest, exc: GuestError | None, issues: list[KnownIssue], facts) -> dict:
    """How a boot ended, as the harness judges a shared guest's boot: ready; an early death
    (gone before its report, silently or by its own triple fault) with the guest-death entry
    its evidence shows; crashed otherwise; timed out; refused or a probe error."""
    if exc is None:
        return {"outcome": "ready", "ready_s": guest.timings.get("ready")}
    detail = str(exc).splitlines()[0][:300]
    if isinstance(exc, GuestCrashed):
        evidence = {k: v[-EVIDENCE_CHARS:] for k, v in exc.evidence.items()}
        if not died_in_early_boot(exc):
            return {"outcome": "crashed", "detail": detail, "evidence": evidence}
        fault = emulator_fault(issues, guest.type, facts, exc.evidence)
        return {"outcome": "early-death", "detail": detail, "evidence": evidence,
                "signature": fault.label() if fault is not None else None}
    kind = "timeout" if isinstance(exc, GuestTimeout) else "error"
    return {"outcome": kind, "detail": detail,
            "evidence": {"console": guest.console_tail()[-EVIDENCE_CHARS:]}}


def _boot(guest: Guest, timeout: float) -> GuestError | None:
    """Create the guest and wait for its probe (in a thread of its own when several boot
    at once: each is polled as the harness polls one, and its time is its own)."""
    try:
        guest.create()
        guest.wait_ready(timeout)
    except GuestError as exc:
        return exc
    return None


def boot_batch(host, cell: Cell, types: list[str], timeout: float, issues: list[KnownIssue],
               base: Boot, batch: int) -> list[Boot]:
    """Boot ``types`` together on ``host`` with ``cell``'s paging; one Boot each."""
    xl = host.xl
    xl.destroy_all_guests()  # what an earlier batch (or an interrupted run) left
    facts = dataclasses.replace(host.facts(), paging=cell.paging)
    guests = [Guest(GuestSpec(type=kind, name=f"nx-bench-{kind}-{i}", paging=cell.paging), xl,
                    image=base.image) for i, kind in enumerate(types)]
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with ThreadPoolExecutor(max_workers=len(guests), thread_name_prefix="bench-guest") as pool:
        ended = list(pool.map(lambda g: _boot(g, timeout), guests))
    out = []
    for guest, exc in zip(guests, ended, strict=True):
        found = judge(guest, exc, issues, facts)
        seen = ""
        if exc is None and guest.type != "pv":
            seen = xl.paging(guest.domid)  # after the timed boot: the xl config took effect
        out.append(dataclasses.replace(base, thread=cell.thread, paging=cell.paging, at_once=cell.at_once,
                                       type=guest.type, create_s=guest.timings.get("create"),
                                       paging_seen=seen, batch=batch, at=at, **found))
    for guest in guests:
        guest.destroy()
    return out


# ---------------------------------------------------------------------- a run


def plan(store: BenchFile, setup: tuple[str, str], todo: list[Cell], settings: Settings
         ) -> list[tuple[Cell, list[str]]]:
    """The batches still to boot for ``todo`` (one thread mode's cells), taken in turn."""
    groups = []
    for cell in todo:
        left = {k: settings.boots - store.done(setup, cell, k) for k in settings.types}
        groups.append(batches({k: n for k, n in left.items() if n > 0}, cell.at_once))
    return [(todo[c], batch) for c, batch in interleave(groups)]


def check_host(facts, todo: list[Cell], store: BenchFile, setup: tuple[str, str]) -> None:
    """Refuse cells this host cannot give and boots that would mix two Xens in one row."""
    if any(c.paging == "hap" for c in todo) and "hap" not in facts.virt_caps:
        raise BenchError(f"this L1's Xen offers no HAP (virt_caps: {' '.join(sorted(facts.virt_caps))}): "
                         "give --paging shadow, or an L1 CPU with nested paging")
    other = store.xen_of(setup) - {facts.xen_version}
    if other:
        raise BenchError(f"{store.path} has boots of {setup[0]} under QEMU {setup[1]} on Xen "
                         f"{', '.join(sorted(other))}; this host runs Xen {facts.xen_version}: "
                         "give another --json FILE")


def run_bench(cfg: RunConfig, settings: Settings, progress: Callable[[str], None] = print,
              issues: list[KnownIssue] | None = None) -> BenchFile:
    """Boot what the results file still lacks, one L1 per thread mode; the file is written
    after every boot and the table when the run ends (or is stopped)."""
    store = BenchFile.load(settings.json_path)
    issues = load_known_issues(KNOWN_ISSUES) if issues is None else issues
    prov = provisioner_for(cfg, progress)  # the guest payload; no shared guests
    name = cfg.host_images[0]
    recipe, _image = prov.image(name)
    base_accel = prov.accel
    threads = settings.threads if base_accel.accel == "tcg" else (NO_THREADS,)
    try:
        for thread in threads:
            accel = with_threads(base_accel, thread)
            binary = qemu_for(recipe, cfg, accel)
            setup = (name, qemu_version_label(binary))
            todo = cells(settings.paging, (thread,), settings.at_once)
            work = plan(store, setup, todo, settings)
            if not work:
                progress(f"bench guests: {name}, QEMU {setup[1]}, thread={thread}: every cell has "
                         f"{settings.boots} boots of each type in {store.path}")
                continue
            prov.accel = accel
            _run_thread(prov, cfg, store, setup, todo, work, issues, progress,
                        Boot(name, setup[1], thread, "", 0, "", "", qemu_line=qemu_version(binary),
                             accel=accel.accel))
    finally:
        prov.accel = base_accel
        settings.markdown_path.parent.mkdir(parents=True, exist_ok=True)
        settings.markdown_path.write_text(markdown(store.boots))
    return store


def _run_thread(prov, cfg: RunConfig, store: BenchFile, setup: tuple[str, str], todo: list[Cell],
                work: list[tuple[Cell, list[str]]], issues: list[KnownIssue],
                progress: Callable[[str], None], base: Boot) -> None:
    label = f"bench-guests-{base.thread}"
    host = prov.host(setup[0], label, cfg.artifacts_dir.resolve() / "bench-guests" / label)
    try:
        facts = host.facts()
        check_host(facts, todo, store, setup)
        base = dataclasses.replace(base, xen=facts.xen_version)
        first = max((b.batch for b in store.boots), default=0) + 1
        started = time.monotonic()
        for i, (cell, types) in enumerate(work):
            for boot in boot_batch(host, cell, types, cfg.timeouts.guest_ready, issues, base, first + i):
                store.add(boot)
                progress(f"[{i + 1}/{len(work)} {cell.label()}] {boot.type}: {boot.outcome}"
                         + (f" in {boot.ready_s:.1f} s" if boot.ready_s is not None else f": {boot.detail}"))
        progress(f"{label}: {len(work)} batch(es) in {time.monotonic() - started:.0f} s")
    finally:
        host.stop()


# ---------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`nested-xen bench guests`'s options, on the bench parser (harness/cli.py)."""
    g = p.add_argument_group("bench guests (time to probe-ready and early deaths per cell; issue 30)")
    g.add_argument("--boots", type=int, default=10, metavar="N",
                   help="boots of each guest type per cell (default 10); a run started again adds "
                        "only what its results file lacks")
    g.add_argument("--paging", default=",".join(PAGING_MODES), metavar="LIST",
                   help="PVH/HVM paging modes: hap, shadow (the xl config's hap = 0)")
    g.add_argument("--tcg-threads", default=",".join(THREADS), metavar="LIST",
                   help="L1 QEMU -accel tcg,thread=: multi, single (one L1 boot each)")
    g.add_argument("--at-once", default=",".join(map(str, AT_ONCE)), metavar="LIST",
                   help="guests booted together: 1 (one at a time), 3 (as the cold start)")
    g.add_argument("--types", default=",".join(GUEST_TYPES), metavar="LIST", help="guest types")
    g.add_argument("--table-only", action="store_true",
                   help="boot nothing: print (and write) the table of the results file")


def cmd_bench_guests(args: argparse.Namespace) -> int:
    """`nested-xen bench guests`: the table printed and written next to the JSON."""
    cfg = run_config_from_args(args)
    try:
        settings = settings_from_args(args, cfg)
        if args.table_only:
            store = BenchFile.load(settings.json_path)
            settings.markdown_path.write_text(markdown(store.boots))
        else:
            store = run_bench(cfg, settings, progress=lambda line: print(line, flush=True))
    except BenchError as exc:
        raise ConfigError(str(exc)) from None
    except (RemoteError, XlError) as exc:  # the L1 was lost: what finished is kept
        raise ConfigError(f"dom0 stopped answering ({str(exc).splitlines()[0]}); the boots that finished "
                          f"are in {settings.json_path}: run the same command again to go on") from None
    print(markdown(store.boots))
    print(f"boots: {settings.json_path}  table: {settings.markdown_path}")
    return 0

