"""Migration across Xen versions (issue 29): a guest moved between two linked L1s that run
different Xen releases, as an operator does in a rolling upgrade.

For each pair of ``migration.cross_version`` (run config), each of its guest types and
each direction, a guest with the migration plugin's dirty workload is created on the source
host and live-migrated to the other, exactly as plugins/migration.py's two-host check does
(the destination keeps it paused until its dirty buffer is verified, then its probe pages are
hashed). Which host is old and which new is read from the booted Xens, not the config order:

- forward (old -> new) is what Xen promises (harness/xen_compat.py): it must arrive intact;
- backward (new -> old) is not promised: it may be refused cleanly (the toolstack's words,
  the source guest the same running domain with its memory intact, nothing left on the
  destination) or arrive intact; anything else is a failure.

The outcome is the check's ``cross_version_outcome`` property and the record's
``cross_outcome``; the record, the report and the plots say ``cross-version a -> b``.
The negative control feeds the receiver a truncated stream (nxstream connect
--truncate-after) on a forward migration: it must read red, with the toolstack's words.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harness import dirty_pages, verdict
from harness.cross_version import FAILED, MIGRATED, CrossPair, Judgement, Observed, judge
from harness.fixtures import run_config
from harness.fixtures.pair import build_origin, no_device_model
from harness.guest_logs import Side
from harness.guests import GuestSpec, save_console, start_guest
from harness.plugins import check
from harness.timeouts import XL_PAUSE_S
from harness.xen import created_domid
from harness.xen_compat import BACKWARD, FORWARD, Rule, SameXen, direction, rule_for

from ._migration_stream import (
    install_stream_tool,
    migrate_tcp,
    migrate_with,
)
from .migration import (
    DIRTY_MB,
    _assert_good,
    evidence,
    has_dirty,
    memory_intact,
    move_between,
    record_base,
)

NO_PAIRS = "migration.cross_version lists no (source, destination) pairs (run config)"
TRUNCATE_AFTER = 1 << 20  # bytes of the stream the control's receiver gets: mid page data
SETTLE_S = 30.0  # how long a refused migration's destination may take to remove its copy


@dataclass(frozen=True)
class Case:
    pair: CrossPair
    guest_type: str
    direction: str  # FORWARD | BACKWARD: from the older Xen to the newer, or back

    @property
    def id(self) -> str:
        return f"{self.pair.id}-{self.guest_type}-{self.direction}"


def cases(pairs: tuple[CrossPair, ...], control: bool = False) -> list[Case]:
    """Every pair x guest type x direction; the control: forward, one PV/PVH guest type a pair."""
    if control:
        return [Case(p, next((g for g in p.guest_types if g != "hvm"), p.guest_types[0]), FORWARD)
                for p in pairs]
    return [Case(p, g, d) for p in pairs for g in p.guest_types for d in (FORWARD, BACKWARD)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "xv_case" not in metafunc.fixturenames:
        return
    pairs = run_config(metafunc.config).migration.cross_version
    found = cases(pairs, control="negative_control" in metafunc.function.__name__)
    params = [pytest.param(c, id=c.id, marks=[getattr(pytest.mark, c.guest_type), pytest.mark.e2e])
              for c in found] or [pytest.param(None, id="no-pairs", marks=pytest.mark.skip(reason=NO_PAIRS))]
    metafunc.parametrize("xv_case", params)


@dataclass
class XvRun:
    """One check's case on its booted pair: the source and destination hosts as the
    direction puts them, the rule for that direction, and the label."""

    case: Case
    src: object  # XenHost
    dst: object
    address: str  # the destination dom0's link address
    agents: dict
    rule: Rule
    label: str


@pytest.fixture
def xv(request, xv_case: Case, provisioner) -> XvRun:
    """The case's hosts, booted (after the skips that need no boot: HVM without a device
    model on both sides), facing the case's direction by their booted Xen versions."""
    node, case = request.node, xv_case
    node.user_properties += [("image", f"{case.pair.source} -> {case.pair.destination}"),
                             ("guest_type", case.guest_type), ("direction", case.direction)]
    if case.guest_type == "hvm":
        missing = [why for why in (no_device_model(provisioner.recipe(i)) for i in case.pair.images()) if why]
        if missing:
            pytest.skip("HVM needs a device model on both hosts; decided before any host booted: "
                        + "; ".join(missing))
    linked = request.getfixturevalue("cross_pairs").get(case.pair)  # boots the pair, or has it
    old, new = linked.by_age()
    src, dst = (old, new) if case.direction == FORWARD else (new, old)
    sv, dv = src.facts().xen_version, dst.facts().xen_version
    try:
        assert direction(sv, dv) == case.direction
    except SameXen as exc:
        pytest.fail(f"{case.pair.source} and {case.pair.destination}: {exc}", pytrace=False)
    label = f"cross-version {sv} -> {dv}"
    # The verdict layer judges this check on the source's facts: where the guest runs until
    # it arrives, and where a death during the copy strikes it (known_issues.yaml scopes).
    node.stash[verdict.FACTS_KEY] = src.facts()
    node.user_properties += [("xen_version", f"{sv} -> {dv}"), ("cross_version", label),
                             ("origin", f"{src.facts().origin} -> {dst.facts().origin}")]
    if case.guest_type == "pv" and "shadow" not in src.facts().virt_caps:
        pytest.skip(f"a PV guest's live migration needs log-dirty (shadow) on the source: Xen {sv} on "
                    f"{src.name} reports {', '.join(sorted(src.facts().virt_caps))}")
    return XvRun(case, src, dst, linked.addresses[dst.name], linked.agents, rule_for(sv, dv), label)


@contextlib.contextmanager
def cross_guest(run: XvRun, cfg, artifacts_dir) -> Iterator:
    """The case's guest, created on the source with the migration plugin's workload; at
    the end its consoles are kept and it is destroyed wherever it is."""
    mig = cfg.migration
    memory, workload = mig.memory_mb[0], mig.workloads[0]
    dirty = int(workload.split(":")[1]) if workload.startswith("dirty:") else 0
    spec = GuestSpec(type=run.case.guest_type, name=f"nx-xv-{run.case.guest_type}", memory_mb=memory,
                     tick_ms=mig.tick_ms, dirty_mb=DIRTY_MB if dirty else 0, dirty_pct=dirty)
    for host in (run.src, run.dst):
        install_stream_tool(host)
        _destroy(host, spec.name)  # an earlier check's, should one be left
    guest = start_guest(run.src.xl, spec, cfg.timeouts.guest_ready, image=run.src.image.name)
    guest.workload = workload
    try:
        guest.resolve_mfns(run.agents[run.src.name].p2m)
        yield guest
    finally:
        for host in (run.src, run.dst):
            with contextlib.suppress(Exception):
                save_console(dataclasses.replace(guest, xl=host.xl),
                             artifacts_dir / "hosts" / host.name / "guests")
            _destroy(host, spec.name)


def _destroy(host, name: str) -> None:
    dom = host.xl.domain(name)
    if dom is not None:
        host.xl.destroy(name)


def _label(rec, run: XvRun) -> None:
    src, dst = run.src.facts(), run.dst.facts()
    rec.cross_version = run.label
    rec.source_build, rec.destination_build = build_origin(run.src), build_origin(run.dst)
    rec.extra.update(direction=f"{run.src.name} -> {run.dst.name}", cross_direction=run.case.direction,
                     source_xen_version=src.xen_version, destination_xen_version=dst.xen_version,
                     source_origin=src.origin, destination_origin=dst.origin,
                     source_xen_changeset=src.xen_changeset, destination_xen_changeset=dst.xen_changeset)


def _send(run: XvRun, guest, mig, shift_s: float, truncate_after: int | None):
    if truncate_after is not None:  # the relay that truncates is the tcp transport's
        return migrate_tcp(run.src.remote, run.dst.remote, guest.name, run.address, shift_s,
                           pause=has_dirty(guest), truncate_after=truncate_after)
    return migrate_with(mig.transport, run.src.remote, run.dst.remote, guest.name, run.address,
                        mig.stream_stats, shift_s, pause=has_dirty(guest))


def _truncated(truncate_after: int | None) -> str:
    """The negative control's log has a name of its own: it ran the same case."""
    return "" if truncate_after is None else f"-truncated-{truncate_after}"


def migrate_once(run: XvRun, guest, metrics, node, mig, truncate_after: int | None = None):
    """One live migration of ``guest`` from the run's source to its destination, timed and
    checked by plugins/migration.py's move_between, as two-host migration is; (record,
    toolstack result, the holder of the dirty verdict)."""
    src, dst = run.src, run.dst
    rec = record_base("cross_version_migrate", guest, src.facts(), f"{src.image.name} -> {dst.image.name}", 0)
    _label(rec, run)
    log_name = f"{guest.name}-{run.case.id}{_truncated(truncate_after)}.log"
    result, holder = move_between(rec, guest, src, dst, run.agents, node,
                                  lambda shift_s: _send(run, guest, mig, shift_s, truncate_after),
                                  metrics.path.parent / "migration" / log_name, lambda: dst.xl.dmesg())
    rec.extra.update(transport="tcp" if truncate_after is not None else mig.transport,
                     truncated_after=truncate_after)
    return rec, result, holder


def _settled(host, name: str, refused: bool) -> list:
    """`xl list` of ``host``; after a refusal, once no domain of ``name`` is left or after
    SETTLE_S (the receiver destroys its copy as it gives up)."""
    deadline = time.monotonic() + (SETTLE_S if refused else 0)
    while True:
        domains = host.xl.list()
        if not any(d.name == name for d in domains) or time.monotonic() >= deadline:
            return domains
        time.sleep(2.0)


def _dirty_at_rest(guest, agent) -> tuple[bool, str]:
    """The dirty buffer of a guest that stayed where it was, read with it paused."""
    remote, name = guest.xl.remote, guest.name
    remote.run_expect(f"xl pause {name}", timeout=XL_PAUSE_S)
    try:
        verdict = dirty_pages.scan(guest, agent)
    finally:
        remote.run_expect(f"xl unpause {name}", timeout=XL_PAUSE_S)
    return verdict.ok, "" if verdict.ok else verdict.message(None)


def observe(run: XvRun, guest, source_domid: int, rec, result, holder: dict) -> Observed:
    """What the judgement needs, read from both hosts after the operation."""
    refused = result.rc != 0
    dst_after = _settled(run.dst, guest.name, refused)
    src_after = run.src.xl.list()
    base = dict(guest=guest.name, source_domid=source_domid, rc=result.rc, log=result.stdout,
                source_after=src_after, destination_after=dst_after)
    if not refused:
        dirty = holder.get("dirty")
        corrupted = None if rec.memory_intact is None else rec.extra.get("corrupted_pages", [])
        return Observed(**base, corrupted=corrupted, dirty_ok=None if dirty is None else dirty.ok,
                        dirty_message="" if dirty is None or dirty.ok else dirty.message(rec.iterations))
    here = next((d for d in src_after if d.name == guest.name), None)
    if here is None or here.domid != source_domid or not here.running:
        return Observed(**base, unchecked="the source guest is not the running domain it was")
    agent = run.agents[run.src.name]
    corrupted = memory_intact(guest, agent)
    dirty_ok, message = _dirty_at_rest(guest, agent) if has_dirty(guest) else (None, "")
    return Observed(**base, corrupted=corrupted, dirty_ok=dirty_ok, dirty_message=message)


def migrate_and_judge(run: XvRun, guest, metrics, node, mig, truncate_after: int | None = None,
                      keep_evidence: bool = True) -> tuple[object, Judgement]:
    """Migrate once, judge what happened (harness/cross_version.py), record both."""
    source_domid = guest.domid
    rec, result, holder = migrate_once(run, guest, metrics, node, mig, truncate_after)
    judgement = judge(observe(run, guest, source_domid, rec, result, holder), run.rule)
    if judgement.outcome != MIGRATED:
        _source_death(run, guest, node)
    rec.cross_outcome = judgement.outcome
    rec.extra.update(judgement=judgement.message(), toolstack_words=judgement.words, rule=run.rule.cite())
    if not judgement.passed and keep_evidence:
        evidence(node, rec, [Side(run.src.name, run.src.remote, run.src.xl.dmesg(), (source_domid,)),
                             Side(run.dst.name, run.dst.remote, run.dst.xl.dmesg(),
                                  (created_domid(result.stdout),))], guest.name, metrics)
    metrics.add(rec)
    metrics.write()
    return rec, judgement


def _source_death(run: XvRun, guest, node) -> None:
    """A guest that did not arrive and is gone from its source died during the check: the
    verdict layer judges that death by its own evidence (its dmesg lines and console), as a
    death under any other check, so an emulator fault on the source (measured: a PVH guest
    on 4.17.5 triple-faulted while suspending) is told apart from a cross-version failure."""
    with contextlib.suppress(Exception):  # dom0 not answering: the host check says so
        detail = guest.death(run.src.xl.list())
        if detail is not None:
            verdict.add_death(node, guest.incident("during-check", detail, "failed", nodeid=node.nodeid))


def _properties(record_property, run: XvRun, rec, judgement: Judgement) -> None:
    record_property("cross_version", run.label)
    record_property("cross_version_outcome", judgement.outcome)
    record_property("source_build", rec.source_build)
    record_property("destination_build", rec.destination_build)
    record_property("measured", {"total_s": rec.total_s, "downtime_s": rec.downtime_s,
                                 "iterations": rec.iterations})


@check()
def test_cross_version_migration(xv, nx_config, metrics, artifacts_dir, record_property, request):
    """Forward must arrive intact; backward must be refused cleanly or arrive intact."""
    mig = nx_config.migration
    with cross_guest(xv, nx_config, artifacts_dir) as guest:
        rec, judgement = migrate_and_judge(xv, guest, metrics, request.node, mig)
    _properties(record_property, xv, rec, judgement)
    assert judgement.passed, judgement.message()
    if judgement.outcome == MIGRATED:  # downtime measured, budgets kept, as the two-host check asks
        _assert_good(rec, rec.extra.pop("log_tail"), mig)


@check()
def test_negative_control_truncated_stream_is_red(xv, nx_config, metrics, artifacts_dir, record_property,
                                                  request):
    """A forward migration whose receiver is fed only the first TRUNCATE_AFTER bytes of the
    stream must be judged a failure with the toolstack's words, never intact."""
    with cross_guest(xv, nx_config, artifacts_dir) as guest:
        rec, judgement = migrate_and_judge(xv, guest, metrics, request.node, nx_config.migration,
                                           truncate_after=TRUNCATE_AFTER, keep_evidence=False)
    _properties(record_property, xv, rec, judgement)
    said = [line for line in judgement.words.splitlines() if not line.startswith("nxstream")]
    assert not rec.ok, (f"the receiver took a stream cut after {TRUNCATE_AFTER} bytes: exit status 0\n"
                        + rec.extra.get("log_tail", ""))
    assert judgement.outcome == FAILED and not judgement.passed, judgement.message()
    assert rec.memory_intact is not True and judgement.outcome != MIGRATED
    assert "where Xen documents it as supported" in judgement.message(), judgement.message()
    assert said, f"no word from the toolstack (only the relay's):\n{judgement.words}"
