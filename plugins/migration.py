"""Timed live migration (localhost and between two L1s) and save/restore, with
downtime and memory checks.

For each guest type, memory size and workload in the run config's
``migration:`` section, a guest runs the probe with a ticker; dom0 timestamps
every tick as it arrives (harness/agent/nxwatch.py), so the downtime is the
largest gap in arrival times on dom0's clock, not the guest's. Each operation is
repeated (``repeats``), recorded in artifacts/metrics.json with the booted
versions, and checked: it succeeded, the probe's pages still hash the same,
and the configured budgets hold. Timings are reported, not asserted.

Two-host migration restores a second L1 (``peer_host``) linked to the first by
a private network and migrates the guest there and back. Each dom0 stamps the
ticks it sees with its own clock; both clocks are read against the harness's
just before (NTP-style, best of several round trips), so the arrivals are put on
one clock, and the record says how uncertain that makes the downtime.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from pathlib import Path

import pytest

from harness import dirty_pages
from harness.dom0_files import REMOTE_STREAM_TOOL
from harness.dom0_layout import SAVE_DIR
from harness.fixtures import run_config
from harness.guest_logs import Side, check_dir, failure_evidence
from harness.guests import GuestSpec, owned_guest
from harness.metrics import Record, excise_pause, largest_gap_s, log_span_ns, parse_toolstack, tick_arrivals
from harness.plugins import check
from harness.timeouts import MIGRATION_XL_S, QUICK_COMMAND_S, SMALL_COMMAND_S, XL_PAUSE_S
from harness.verdict import found
from harness.xen import created_domid, follow_domid

from ._migration_stream import (  # noqa: F401 - the transport, as this module always offered it
    LINK_DEV,
    SPLIT,
    TCP_PORT,
    TIMESTAMP,
    Watch,
    _stream_stats,
    apply_stream_stats,
    install_stream_tool,
    merge_logs,
    migrate_counted,
    migrate_tcp,
    migrate_with,
    shift_log,
    timed_xl,
    tx_bytes,
)
from .translation import content_mismatches

DIRTY_MB = 16  # 4096 pages: dom0 reads them all after each operation (about 4 s under TCG)
log = logging.getLogger("nested_xen")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        mig = run_config(metafunc.config).migration
        cases = [(m, w) for m in mig.memory_mb for w in mig.workloads]
        metafunc.parametrize("case", cases, ids=[f"{m}M-{w.replace(':', '')}" for m, w in cases],
                             scope="module")


@pytest.fixture(scope="module")
def _mig_guest(xen_host, guest_type, case, nx_config, agent, artifacts_dir):
    mig = nx_config.migration
    if guest_type not in mig.guest_types + mig.two_host_guest_types:
        pytest.skip(f"{guest_type} is in neither migration.guest_types {list(mig.guest_types)} nor "
                    f"migration.two_host_guest_types {list(mig.two_host_guest_types)} (run config)")
    memory, workload = case
    dirty = int(workload.split(":")[1]) if workload.startswith("dirty:") else 0
    spec = GuestSpec(type=guest_type, name=f"nx-mig-{guest_type}-{memory}", memory_mb=memory,
                     tick_ms=mig.tick_ms, dirty_mb=DIRTY_MB if dirty else 0, dirty_pct=dirty)
    install_stream_tool(xen_host)
    with owned_guest(xen_host, spec, agent, artifacts_dir, nx_config.timeouts.guest_ready) as guest:
        guest.workload = workload
        yield guest


@pytest.fixture
def mig_guest(request, _mig_guest, agent, nx_config):
    """The module's guest, alive: one that died since the last check (a crash in an
    operation, or idle) is recorded and created again, so no check starts on a corpse."""
    _mig_guest.replace_if_dead(agent.p2m, nx_config.timeouts.guest_ready, f"before {request.node.name}",
                               nodeid=request.node.nodeid)
    return _mig_guest


def has_dirty(guest) -> bool:
    """A dirty workload: the operation leaves the guest paused and its dirty buffer is checked."""
    return bool(guest.spec.dirty_mb and guest.spec.dirty_pct)


def check_dirty_then_unpause(guest, agent, holder: dict, node) -> None:
    """The guest arrived paused (``-p``), exactly as the operation delivered it: judge its dirty
    buffer (harness/dirty_pages.py) before it writes again, then unpause it. When dom0 let it
    run (``holder["unpaused_ns"]``, dom0's clock) takes the harness's pause out of the downtime."""
    first_run_ns = None
    try:
        guest.domid = guest.xl.domid(guest.name)
        if guest.type == "pv":
            first_run_ns = dirty_pages.let_pv_guest_publish_its_p2m(guest, agent, holder)
        holder["dirty"] = dirty_pages.scan(guest, agent)
        if not holder["dirty"].ok:  # seen on a live guest: it stands, whatever befalls the guest next
            found(node, holder["dirty"].message(None))
    finally:
        out = guest.xl.remote.run(f"date +%s.%N; xl unpause {shlex.quote(guest.name)}", timeout=XL_PAUSE_S)
        holder["unpaused_ns"] = first_run_ns or int(float(out.stdout.split()[0]) * 1e9)


def apply_dirty(rec: Record, verdict, pv_window_s: float | None = None) -> None:
    """The dirty-buffer check's numbers into the record, its failure (with the iterations) too."""
    if pv_window_s is not None:
        rec.extra["pv_p2m_window_s"] = pv_window_s
    if verdict is None:
        return
    rec.dirty_pages_verified = verdict.verified
    rec.dirty_generation = verdict.generation
    if not verdict.ok:
        rec.extra["dirty_failure"] = verdict.message(rec.iterations)


def record_base(kind: str, guest, facts, image: str, repeat: int) -> Record:
    return Record(kind=kind, guest_type=guest.type, memory_mb=guest.spec.memory_mb,
                  workload=getattr(guest, "workload", "idle"), image=image,
                  xen_version=facts.xen_version, kernel_release=facts.kernel_release,
                  dom0_mode=facts.dom0_mode, accel=facts.accel, repeat=repeat)


def memory_intact(guest, agent) -> list[str]:
    # a dead guest fails here with its console and Xen's word on it; a live one's domid
    # comes with the same `xl list`
    guest.domid = guest.check_alive().domid
    guest.resolve_mfns(agent.p2m)
    return content_mismatches(guest, agent, [p.gfn for p in guest.pages])


def check_budgets(rec: Record, mig) -> list[str]:
    over = []
    if mig.max_total_s is not None and rec.total_s is not None and rec.total_s > mig.max_total_s:
        over.append(f"total {rec.total_s:.1f} s > budget {mig.max_total_s} s")
    if mig.max_downtime_s is not None and rec.downtime_s is not None and rec.downtime_s > mig.max_downtime_s:
        over.append(f"downtime {rec.downtime_s:.2f} s > budget {mig.max_downtime_s} s")
    return over


def finish_record(rec: Record, *, log: str, rc: int, seconds: float, ticks: list, log_path: Path,
                  dmesg, intact, unpaused_ns: int | None = None) -> Record:
    """Fill ``rec`` from one operation: the toolstack's timestamped log (kept at
    ``log_path``), its exit status and duration, and the probe's tick arrivals on the
    clock of the log's timestamps. On failure ``dmesg()`` gives the hypervisor's view (its
    tail is kept in the record; the failure's evidence is :func:`evidence`'s); on success
    ``intact()`` lists the pages whose content changed."""
    rec.ok = rc == 0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(log)
    rec.extra["toolstack_log"] = str(log_path)
    rec.total_s = round(seconds, 2)
    span = log_span_ns(log)  # the operation's window, on the same clock as the ticks
    if span and unpaused_ns:  # left paused for the dirty check: that pause is not the operation's
        ticks = excise_pause(ticks, span[1], unpaused_ns)
        rec.extra["dirty_check_pause_s"] = round((unpaused_ns - span[1]) / 1e9, 2)
    gap = largest_gap_s(ticks, *span) if rec.ok and span else None
    rec.downtime_s = round(gap, 3) if gap is not None else None
    rec.extra["ticks_seen"] = len(ticks)
    parsed = parse_toolstack(log)
    rec.iterations = parsed["iterations"]
    rec.pages_per_iteration = parsed["pages_per_iteration"]
    rec.bytes_sent = parsed["bytes_sent"]
    rec.downtime_toolstack_s = parsed["downtime_toolstack_s"]
    if not rec.ok:
        rec.extra["dmesg"] = "\n".join(dmesg().splitlines()[-25:])
    else:
        bad = intact()
        rec.memory_intact = not bad
        rec.extra["corrupted_pages"] = bad[:10]
    return rec


def measure(kind: str, guest, xen_host, agent, metrics, nx_config, repeat: int, run, node,
            holder: dict | None = None) -> Record:
    """Run one operation under the watcher and turn what it saw into a Record; a failure's
    evidence goes to the check ``node`` (:func:`evidence`). ``holder["unpaused_ns"]``: the
    operation left the guest paused for the dirty check until then."""
    rec = record_base(kind, guest, xen_host.facts(), xen_host.image.name, repeat)
    domid = guest.domid  # the source's: the operation may leave the guest another
    watch = Watch(xen_host.remote, guest.name)
    time.sleep(1.0)  # a few ticks before the operation
    try:
        log, rc, seconds = run()
    finally:
        time.sleep(2.0)  # ticks after resume
        ticks = tick_arrivals(watch.stop())
    dmesg = xen_host.xl.dmesg() if rc != 0 else ""
    finish_record(rec, log=log, rc=rc, seconds=seconds, ticks=ticks,
                  log_path=metrics.path.parent / "migration" / f"{guest.name}-{kind}-{repeat}.log",
                  dmesg=lambda: dmesg, intact=lambda: memory_intact(guest, agent),
                  unpaused_ns=(holder or {}).get("unpaused_ns"))
    if not rec.ok:  # save/restore or localhost: one dom0, the source domain and the one created
        evidence(node, rec, [Side(xen_host.name, xen_host.remote, dmesg, (domid, created_domid(log)))],
                 guest.name, metrics)
    metrics.add(rec)
    return rec


def evidence(node, rec: Record, sides: list[Side], name: str, metrics) -> None:
    """A failed operation's evidence for the check ``node`` (harness/guest_logs.py): the
    guest's own `xl dmesg` lines and dom0 logs; the device model's last lines are kept for
    the failure message. The host-wide `xl dmesg` tail is only shown, never matched."""
    dest = check_dir(metrics.path.parent, node.nodeid)
    rec.extra["device_model"] = failure_evidence(node, sides, [name], dest)


def _assert_good(rec: Record, log_tail: str, mig) -> None:
    assert rec.ok, (f"{rec.kind} failed (full log: {rec.extra['toolstack_log']}):\n{log_tail}"
                    + (f"\n\n{rec.extra['device_model']}" if rec.extra.get("device_model") else ""))
    assert rec.memory_intact, "memory corrupted:\n" + "\n".join(rec.extra["corrupted_pages"])
    assert not rec.extra.get("dirty_failure"), rec.extra.get("dirty_failure")
    assert rec.downtime_s is not None, (
        f"probe ticks did not reach dom0 both before and after the {rec.kind} "
        f"({rec.extra['ticks_seen']} seen): the guest's downtime has no measured end")
    over = check_budgets(rec, mig)
    assert not over, "; ".join(over)


@check()
def test_negative_control_corruption_is_detected(mig_guest, agent):
    """A page whose expected hash is wrong must be reported as corrupted."""
    page = mig_guest.pages[0]
    original = page.sha256
    page.sha256 = "0" * 64
    try:
        bad = memory_intact(mig_guest, agent)
    finally:
        page.sha256 = original
    assert len(bad) == 1 and "page   0" in bad[0], bad


@pytest.fixture
def two_host_wanted(mig_guest, nx_config) -> None:
    """Before the peer L1 is restored (``peer_host``, after this in the check's arguments):
    skip a guest type the run config does not migrate between hosts (it cost a peer each)."""
    _wanted(mig_guest, nx_config.migration.two_host_guest_types, "two_host_guest_types")


def _wanted(guest, types: tuple[str, ...], key: str) -> None:
    if guest.type not in types:
        pytest.skip(f"{guest.type} is not in migration.{key} {list(types)} (run config)")


@check()
def test_save_restore(mig_guest, xen_host, agent, metrics, nx_config, record_property, request):
    mig = nx_config.migration
    _wanted(mig_guest, mig.guest_types, "guest_types")
    path = f"{SAVE_DIR}/{mig_guest.name}.chkpt"
    for repeat in range(mig.repeats):
        holder = {}

        def run(holder=holder):
            remote = xen_host.remote
            remote.run_expect(f"mkdir -p {SAVE_DIR}", timeout=QUICK_COMMAND_S)
            save = timed_xl(remote, f"save {shlex.quote(mig_guest.name)} {path}", MIGRATION_XL_S)
            holder["stream"] = _stream_stats(remote, f"python3 {REMOTE_STREAM_TOOL} file {path}")
            paused = " -p" if has_dirty(mig_guest) else ""
            restore = timed_xl(remote, f"restore{paused} {path}", MIGRATION_XL_S) if save.rc == 0 else save
            # saved, the old domain is gone: the guest is what restore created, if anything
            follow_domid(mig_guest, restore.stdout, ok=save.rc == 0)
            if paused and restore.rc == 0:
                check_dirty_then_unpause(mig_guest, agent, holder, request.node)
            remote.run(f"rm -f {path}", timeout=SMALL_COMMAND_S)
            holder["log"] = save.stdout + restore.stdout
            rc = save.rc or restore.rc
            return save.stdout + restore.stdout, rc, save.seconds + (restore.seconds if save.rc == 0 else 0)

        rec = measure("save_restore", mig_guest, xen_host, agent, metrics, nx_config, repeat, run,
                      request.node, holder)
        apply_stream_stats(rec, holder.get("stream", {}))
        apply_dirty(rec, holder.get("dirty"), holder.get("pv_p2m_window_s"))
        metrics.write()
        record_property(f"repeat{repeat}", {"total_s": rec.total_s, "downtime_s": rec.downtime_s})
        _assert_good(rec, holder["log"][-3000:], mig)


# Live migration tracks dirtied pages in Xen's log-dirty mode; for a PV guest that is
# shadow paging, which a Xen built without CONFIG_SHADOW_PAGING lacks (Debian trixie's
# Xen 4.20 reports no "shadow" in virt_caps; `xl migrate` fails "Failed to enable
# logdirty: 95"). Save/restore suspends first and needs no log-dirty.
LIVE_MIGRATION_CAPS = {"pv": ["shadow"]}


@check(guest_caps=LIVE_MIGRATION_CAPS)
def test_localhost_migration(mig_guest, xen_host, agent, metrics, nx_config, record_property, request):
    mig = nx_config.migration
    _wanted(mig_guest, mig.guest_types, "guest_types")
    for repeat in range(mig.repeats):
        holder = {}

        def run(holder=holder):
            before = tx_bytes(xen_host.remote, "lo")
            result, holder["stream"] = migrate_with(mig.transport, xen_host.remote, xen_host.remote,
                                                    mig_guest.name, "localhost", mig.stream_stats,
                                                    pause=has_dirty(mig_guest))
            after = tx_bytes(xen_host.remote, "lo")
            holder["log"] = result.stdout
            follow_domid(mig_guest, result.stdout, ok=result.rc == 0)
            if has_dirty(mig_guest) and result.rc == 0:
                check_dirty_then_unpause(mig_guest, agent, holder, request.node)
            holder["wire"] = after - before if before is not None and after is not None else None
            return result.stdout, result.rc, result.seconds

        rec = measure("localhost_migrate", mig_guest, xen_host, agent, metrics, nx_config, repeat, run,
                      request.node, holder)
        apply_stream_stats(rec, holder.get("stream", {}))
        apply_dirty(rec, holder.get("dirty"), holder.get("pv_p2m_window_s"))
        rec.extra["wire_bytes"] = holder.get("wire")  # dom0 lo tx bytes: the stream as carried
        rec.extra["transport"] = mig.transport
        metrics.write()
        record_property(f"repeat{repeat}", {"total_s": rec.total_s, "downtime_s": rec.downtime_s,
                                            "downtime_toolstack_s": rec.downtime_toolstack_s})
        _assert_good(rec, holder["log"][-3000:], mig)


@check()
def test_negative_control_stale_dirty_page_is_caught(mig_guest, xen_host, agent):
    """With the guest paused (after the module's migrations: this check runs after them), dom0
    writes an older generation into one dirty page through a writable foreign mapping; the
    dirty-buffer check must name exactly that page. Its own bytes go back before it runs again."""
    from harness.agent.nxagent.dirty import page_bytes

    if not has_dirty(mig_guest):
        pytest.skip(f"workload {mig_guest.workload}: no dirty buffer to stale (workload dirty:P has one)")
    name = shlex.quote(mig_guest.name)
    mig_guest.domid = mig_guest.check_alive().domid
    xen_host.remote.run_expect(f"xl pause {name}", timeout=XL_PAUSE_S)
    try:
        clean = dirty_pages.scan(mig_guest, agent)
        assert clean.ok, ("the dirty buffer must be whole before the control stales a page:\n"
                          + clean.message(None))
        index, _, older = dirty_pages.stale_target(clean)
        frames, gfn = mig_guest.dirty_frames, mig_guest.dirty_frames.gfns[index]
        wrote = agent.write_page(mig_guest.domid, gfn, page_bytes(bytes.fromhex(frames.nonce), older, index))
        assert wrote["written"], f"generation {older} was not written to page {index} (gfn {gfn:#x}): {wrote}"
        try:
            caught = dirty_pages.scan(mig_guest, agent)
        finally:
            back = agent.write_page(mig_guest.domid, gfn, wrote["old"])
        assert back["written"], f"page {index}'s own content was not written back (gfn {gfn:#x}): {back}"
        report = caught.message(None)
        assert [m.index for m in caught.misses] == [index] and not caught.problems, (
            f"staled page {index} (gfn {gfn:#x}, generation {older}), the check said:\n{report}")
        assert f"gfn {gfn:#x}: generation {older}," in report, report
    finally:
        xen_host.remote.run_expect(f"xl unpause {name}", timeout=XL_PAUSE_S)


# ------------------------------------------------------------------ two hosts
def clock_offset_ns(remote, samples: int = 5) -> tuple[int, int]:
    """dom0's clock minus the harness's, and the uncertainty (half the best round trip)."""
    best: tuple[int, int] | None = None
    for _ in range(samples):
        before = time.time_ns()
        stamp = int(remote.check_output("date +%s%N", timeout=QUICK_COMMAND_S).strip())
        after = time.time_ns()
        sample = (stamp - (before + after) // 2, (after - before) // 2)
        if best is None or sample[1] < best[1]:
            best = sample
    assert best is not None
    return best


def move_between(rec: Record, guest, src, dst, agents: dict, node, send, log_path, dst_dmesg) -> tuple:
    """The timed move of ``guest`` from ``src`` to ``dst`` that two-host and cross-version
    migration share: clock offsets, console watches on both sides, ``send(shift_s)`` (the
    toolstack's migration, returning (result, stream stats); ``shift_s`` puts the receiver's
    log lines, stamped by dst's clock, on src's), the dirty buffer checked at arrival, and the
    record finished (``dst_dmesg()`` on failure). (toolstack result, holder of the dirty
    verdict); the source dom0's link NIC tx bytes, the stream as carried on the wire, are in
    ``rec.extra["wire_bytes"]``."""
    src_off, src_err = clock_offset_ns(src.remote)
    dst_off, dst_err = clock_offset_ns(dst.remote)
    rec.extra["clock_uncertainty_s"] = round((src_err + dst_err) / 1e9, 3)
    watches = (Watch(src.remote, guest.name), Watch(dst.remote, guest.name))
    moved = dataclasses.replace(guest, xl=dst.xl)  # the guest as dst's domain
    holder: dict = {}
    time.sleep(1.0)
    try:
        before = tx_bytes(src.remote, LINK_DEV)
        result, stream = send((src_off - dst_off) / 1e9)
        after = tx_bytes(src.remote, LINK_DEV)
        follow_domid(moved, result.stdout, ok=result.rc == 0)
        if has_dirty(guest) and result.rc == 0:
            check_dirty_then_unpause(moved, agents[dst.name], holder, node)
    finally:
        time.sleep(2.0)
        src_ticks = tick_arrivals(watches[0].stop())
        dst_ticks = tick_arrivals(watches[1].stop())
    # Put the destination's arrivals on the source's clock, where the window is.
    shift = src_off - dst_off
    ticks = src_ticks + [(t + shift, seq) for t, seq in dst_ticks]
    finish_record(rec, log=result.stdout, rc=result.rc, seconds=result.seconds, ticks=ticks,
                  log_path=log_path,
                  dmesg=dst_dmesg, intact=lambda: memory_intact(moved, agents[dst.name]),
                  unpaused_ns=holder["unpaused_ns"] + shift if "unpaused_ns" in holder else None)
    rec.extra["log_tail"] = result.stdout[-3000:]
    apply_stream_stats(rec, stream)
    apply_dirty(rec, holder.get("dirty"), holder.get("pv_p2m_window_s"))
    rec.extra["wire_bytes"] = after - before if before is not None and after is not None else None
    return result, holder


def migrate_between(guest, src, dst, dst_address: str, agents: dict, metrics, repeat: int,
                    counted: bool = True, transport: str = "tcp", *, node) -> Record:
    """Migrate ``guest`` from ``src`` to ``dst`` over the private link, timed like the
    localhost case; the memory check runs on ``dst``, where the guest now lives. A failure's
    evidence, from both dom0s, goes to the check ``node``."""
    rec = record_base("two_host_migrate", guest, src.facts(), src.image.name, repeat)
    domid = guest.domid  # on src
    rec.extra["direction"] = f"{src.name} -> {dst.name}"
    dmesg: list = []  # both dom0s' xl dmesg, taken once on failure

    def dst_dmesg() -> str:
        if not dmesg:
            dmesg.extend((src.xl.dmesg(), dst.xl.dmesg()))
        return dmesg[1]

    result, _ = move_between(
        rec, guest, src, dst, agents, node,
        lambda shift_s: migrate_with(transport, src.remote, dst.remote, guest.name, dst_address, counted,
                                     shift_s, pause=has_dirty(guest)),
        metrics.path.parent / "migration" / f"{guest.name}-two-host-{repeat}-{src.name}.log", dst_dmesg)
    if not rec.ok:
        dst_dmesg()
        evidence(node, rec, [Side(src.name, src.remote, dmesg[0], (domid,)),
                             Side(dst.name, dst.remote, dmesg[1], (created_domid(result.stdout),))],
                 guest.name, metrics)
    rec.extra["transport"] = transport
    metrics.add(rec)
    metrics.write()
    return rec


@check(guest_caps=LIVE_MIGRATION_CAPS)
def test_two_host_migration(two_host_wanted, mig_guest, xen_host, peer_host, agent, metrics, nx_config,
                            record_property, request):
    """Migrate the guest to a second L1 over a private link and back, ``repeats`` times."""
    from harness.agent.client import Agent
    from harness.host import LINK_NET

    mig = nx_config.migration
    agents = {xen_host.name: agent, peer_host.name: Agent(peer_host.remote.as_runner())}
    install_stream_tool(peer_host)
    here, there = (xen_host, f"{LINK_NET}.1"), (peer_host, f"{LINK_NET}.2")
    try:
        for repeat in range(mig.repeats):
            for (src, _), (dst, address) in ((here, there), (there, here)):
                rec = migrate_between(mig_guest, src, dst, address, agents, metrics, repeat,
                                      mig.stream_stats, mig.transport, node=request.node)
                record_property(f"repeat{repeat}-{src.name}", {
                    "total_s": rec.total_s, "downtime_s": rec.downtime_s,
                    "downtime_toolstack_s": rec.downtime_toolstack_s,
                    "clock_uncertainty_s": rec.extra["clock_uncertainty_s"]})
                _assert_good(rec, rec.extra.pop("log_tail"), mig)
    except BaseException:
        _not_home(mig_guest, xen_host, peer_host)
        raise
    mig_guest.domid = xen_host.xl.domid(mig_guest.name)  # home again for later checks


def _not_home(guest, home, peer) -> None:
    """A failed two-host check may leave the guest on the peer, alive: it did not die,
    so it is no death to judge. It is destroyed there and created again at home before
    the module's next check (mig_guest), without an incident."""
    try:
        if home.xl.domain(guest.name) is not None:
            return
        there = peer.xl.domain(guest.name)
        if there is not None and not (there.crashed or there.dying):
            peer.xl.destroy(guest.name)
            guest.death_recorded = True
            log.warning("%s was left on %s by the failed check: destroyed there", guest.name, peer.name)
    except Exception as exc:  # noqa: BLE001 - the check's own error is the one to report
        log.warning("looking for %s on %s after the failed check: %s", guest.name, peer.name, exc)
