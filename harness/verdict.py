"""The verdict of one check: known issues by signature, emulator faults, reruns.

A check's outcome is decided once it has run (``pytest_runtest_makereport``), from
what happened, not from a marker applied before it ran:

- its guests are verified after the call (one `xl list` per host): a guest that died
  or changed domid during the check is an incident, and a PASS read from it is not
  trusted;
- a death whose evidence shows an emulator-fault signature (``check: guest-death``
  entries, or the check's own entry) is run again once on a fresh guest
  (:class:`VerdictPlugin.pytest_runtest_protocol`, within a per-run budget); the same
  fault twice is an expected failure when an entry of the check names it, else a
  failure; a death without a matched signature fails at once with its evidence;
- a failure is an expected failure only if an entry's versions *and* signature
  match; an entry whose versions match but whose signature is absent is named in the
  report of a failure that stays a failure;
- a pass where a strict entry's versions match is an XPASS(strict) failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from . import incidents
from .incidents import Incident
from .judge import (
    EXPECTED,
    FAILED,
    KEEP,
    PASSED_AFTER_FAULT,
    RERUN,
    XPASS,
    Death,
    Evidence,
    Outcome,
    evidence_text,
    judge,
    judge_setup_loss,
)
from .known_issues import EVIDENCE_KINDS, KnownIssue

log = logging.getLogger("nested_xen")

GUEST_FIXTURES = ("guest", "own_guest")
# A post-check verification this recent stands for the next check's pre-check (both are
# one `xl list`); a death in that gap is then found after that check, during-check.
FRESH_S = 5.0


@dataclass
class CheckState:
    """One check's attempts: its incidents and whether it is to run again."""

    attempt: int = 1
    incidents: list[Incident] = field(default_factory=list)
    fault: str | None = None  # the first attempt's emulator-fault signature
    first_text: str = ""  # the first attempt's failure text, kept with the rerun's result
    rerun: bool = False
    setup_from: int = 0  # incidents.INCIDENTS' length when its setup began


STATE_KEY = pytest.StashKey[CheckState]()
FACTS_KEY = pytest.StashKey[Any]()


def state_of(item: pytest.Item) -> CheckState:
    state = item.stash.get(STATE_KEY, None)
    if state is None:
        state = item.stash[STATE_KEY] = CheckState()
    return state


def check_id(item: pytest.Item) -> str:
    """``plugins/FILE.py::test_name`` (no parameters), as known_issues.yaml names checks."""
    module = item.nodeid.split("::", 1)[0]
    return f"{module}::{getattr(item, 'originalname', item.name)}"


def guest_type_of(item: pytest.Item) -> str | None:
    """The check's ``guest_type`` parameter, else the guest type it declared as a property
    (a check parametrized by a case of its own, as plugins/cross_version.py's)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "guest_type" in callspec.params:
        return callspec.params["guest_type"]
    return next((value for key, value in item.user_properties if key == "guest_type"), None)


WATCHED_KEY = pytest.StashKey[list]()


def watch(item: pytest.Item, guests: list[Any]) -> None:
    """Verify ``guests`` after this check too, though it does not take them as fixtures
    (a check whose programs run beside the shared guests): a death among them is judged
    as a death during the check, by its signature."""
    watched = item.stash.setdefault(WATCHED_KEY, [])
    watched += [g for g in guests if all(g is not w for w in watched)]


def guests_of(item: pytest.Item) -> list[Any]:
    """The guests a check used: every Guest among its fixture values (``guest``,
    ``own_guest``, a module's own such as migration's ``mig_guest``) and those it
    :func:`watch`-es; each once."""
    from .guests import Guest

    funcargs = getattr(item, "funcargs", None) or {}
    found: list[Any] = []
    for value in [*funcargs.values(), *item.stash.get(WATCHED_KEY, [])]:
        if isinstance(value, Guest) and all(value is not g for g in found):
            found.append(value)
    return found


# ---------------------------------------------------------------------- evidence

# The kinds of evidence a known issue's signature can be matched against (an entry's
# ``evidence:`` names one or more). Each is the subject's own: the check's failure text
# without what it only shows (:func:`show`), the dead domain's own ``xl dmesg`` lines and
# console, the lost host's serial tail, the device model's (``qemu-dm-<guest>*.log``) and
# the toolstack's (``xl-<guest>.log``) own logs of the check's guests.
EVIDENCE_KEY = pytest.StashKey[dict]()
SHOWN_KEY = pytest.StashKey[list]()


def add_evidence(node: pytest.Item, kind: str, text: str) -> None:
    """Evidence of ``kind`` (an EVIDENCE_KINDS entry) about this check's failure, which a
    known issue naming that kind matches its signature against; also shown in the
    report of a failure."""
    if kind not in EVIDENCE_KINDS:
        raise ValueError(f"evidence kind {kind!r}: choose one of {', '.join(EVIDENCE_KINDS)}")
    if text:
        node.stash.setdefault(EVIDENCE_KEY, {}).setdefault(kind, []).append(text)


FOUND_KEY = pytest.StashKey[list]()


def found(node: pytest.Item, text: str) -> None:
    """A failure this check established while its guest was alive and the domain it was
    given (dirty pages read wrong from a paused guest, say): it stands whatever befalls the
    guest afterwards, so a later death (an emulator fault or not) cannot turn it into a
    rerun or an expected failure."""
    if text:
        node.stash.setdefault(FOUND_KEY, []).append(text)


def show(node: pytest.Item, title: str, text: str) -> None:
    """Context for the reader of a failure (a host-wide ``xl dmesg`` tail, say): shown in
    its report, never matched by any signature."""
    if text:
        node.stash.setdefault(SHOWN_KEY, []).append((title, text))


# ---------------------------------------------------------------------- report edits


def _text(report: pytest.TestReport) -> str:
    return report.longreprtext if report.longrepr is not None else ""


def fail(report: pytest.TestReport, message: str) -> None:
    report.outcome = "failed"
    report.longrepr = message
    if hasattr(report, "wasxfail"):
        del report.wasxfail


NOTE_SECTION = "nested-xen verdict"


def add_note(report: pytest.TestReport, note: str) -> None:
    """Append to a failure's text (kept visible in the terminal and the JUnit XML).

    A traceback keeps its crash line (pytest's short summary, CI's one-line reason)
    and gains a section; only a failure that has no traceback becomes plain text."""
    if not note:
        return
    if hasattr(report.longrepr, "addsection") and getattr(report.longrepr, "reprcrash", None):
        report.longrepr.addsection(NOTE_SECTION, note)
    else:
        report.longrepr = f"{_text(report)}\n\n{note}"


def expected(report: pytest.TestReport, issue: KnownIssue) -> None:
    report.outcome = "skipped"
    report.wasxfail = issue.describe()


def attach(item: pytest.Item, report: pytest.TestReport, key: str, value: str) -> None:
    """A JUnit property (and results.json field) on this report and the item's later ones."""
    for props in (report.user_properties, item.user_properties):
        if (key, value) not in props:
            props.append((key, value))


# ---------------------------------------------------------------------- the plugin


# The cost of verifying guests around checks (the time these checks add to a run):
# `xl list` calls made by verify_after/verify_before and the seconds they took.
VERIFY_COST = {"calls": 0, "seconds": 0.0}


class VerdictPlugin:
    """Registered by harness/pytest_plugin.py with the run's known issues and rerun cap.

    gather -> judge -> apply: :meth:`_gather` reads what the attempt left (I/O: the
    guests' `xl list`, the host's health), :func:`harness.judge.judge` decides (pure),
    :meth:`_apply` edits the report and the incidents."""

    def __init__(self, issues: list[KnownIssue], rerun_cap: int,
                 host_lost: Callable[[pytest.Item, pytest.TestReport], Incident | None],
                 strict: str = "auto") -> None:
        self.issues, self.cap, self.host_lost, self.strict = issues, rerun_cap, host_lost, strict
        self.reruns: list[str] = []  # node ids run again after an emulator fault
        VERIFY_COST.update(calls=0, seconds=0.0)  # this run's (pytester runs share the module)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        """Run a check; after an emulator fault (see :mod:`harness.judge`) once more, on a
        fresh guest and fresh data; log only the last attempt's reports."""
        if not set(getattr(item, "fixturenames", ())) & {"xen_host", *GUEST_FIXTURES}:
            return None
        # pytest's own protocol (setup, call, teardown), reached through its plugin
        # registry: pytest has no public name for it.
        runtestprotocol = item.config.pluginmanager.get_plugin("runner").runtestprotocol
        state = state_of(item)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        if state.rerun:
            self.reruns.append(item.nodeid)
            state.attempt, state.rerun = 2, False
            log.warning("%s: emulator fault (%s); running it again on a fresh guest", item.nodeid,
                        state.fault)
            refresh_derived(item)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
        for report in reports:
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        state_of(item).setup_from = len(incidents.INCIDENTS)
        item.stash[EVIDENCE_KEY], item.stash[SHOWN_KEY], item.stash[FOUND_KEY] = {}, [], []  # this attempt's
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Any:
        report = yield
        facts = item.stash.get(FACTS_KEY, None)
        if report.when == "setup" and report.passed:
            _unexplained_deaths_before(item, report)
        if report.when == "setup" and report.failed and facts is not None:
            self._judge_setup(item, report, facts)
            return report
        if report.when != "call" or facts is None:
            return report
        state = state_of(item)
        deaths = verify_after(item)
        lost = self.host_lost(item, report) if report.failed or hasattr(report, "wasxfail") else None
        state.incidents += deaths + ([lost] if lost is not None else [])
        evidence = self._gather(item, report, state, deaths, lost)
        self._apply(item, report, state, judge(evidence, facts, self.issues), deaths, lost)
        for incident in state.incidents:
            attach(item, report, "incident", incident.as_property())
        return report

    def _gather(self, item: pytest.Item, report: pytest.TestReport, state: CheckState,
                deaths: list[Incident], lost: Incident | None) -> Evidence:
        if report.failed:
            outcome = "failed"
        elif hasattr(report, "wasxfail") and report.skipped:
            outcome = "xfailed"
        else:
            outcome = report.outcome
        extra = {kind: "\n".join(texts) for kind, texts in item.stash.get(EVIDENCE_KEY, {}).items()}
        return Evidence(
            check=check_id(item), guest_type=guest_type_of(item), outcome=outcome,
            failure=_text(report) if report.failed else "", extra=extra,
            found="\n".join(item.stash.get(FOUND_KEY, [])),
            death=_as_death(deaths[0]) if deaths else None,
            lost=_as_death(lost) if lost is not None else None,
            attempt=state.attempt, first_fault=state.fault, reruns_left=len(self.reruns) < self.cap,
            budget=f"{len(self.reruns)} of {self.cap} this run",
            strict=self.strict == "on" or (self.strict == "auto" and getattr(
                item.stash.get(FACTS_KEY, None), "accel", "") == "kvm"))

    def _apply(self, item: pytest.Item, report: pytest.TestReport, state: CheckState, outcome: Outcome,
               deaths: list[Incident], lost: Incident | None) -> None:
        for incident, action in ((deaths[0] if deaths else None, outcome.death_action),
                                 (lost, outcome.lost_action)):
            if incident is not None and action is not None:
                incident.action, incident.signature = action[0], action[1] or incident.signature
        if outcome.kind == RERUN:
            state.rerun, state.fault, state.first_text = True, outcome.fault, _text(report)
            fail(report, outcome.message)
            return
        if state.first_text:
            attach(item, report, "first_attempt", state.first_text[-FIRST_ATTEMPT_CHARS:])
        if outcome.kind == FAILED:
            fail(report, outcome.message)
        elif outcome.kind == EXPECTED:
            expected(report, outcome.entry)
            report.wasxfail = outcome.reason
        elif outcome.kind == XPASS:
            report.wasxfail = outcome.reason  # shown, not failing the run
        elif outcome.kind == PASSED_AFTER_FAULT:
            attach(item, report, "verdict", PASSED_AFTER_FAULT)
        elif outcome.kind == KEEP and outcome.reason and hasattr(report, "wasxfail"):
            report.wasxfail = f"{report.wasxfail}; {outcome.reason}"
        if report.failed:
            add_note(report, outcome.note)
            _add_sections(item, report, state)

    def _judge_setup(self, item: pytest.Item, report: pytest.TestReport, facts: Any) -> None:
        """A check whose setup failed (its own guest being created, say) while dom0 stopped
        answering: the host is lost (an incident with the serial tail), judged as under a
        check (:func:`harness.judge.judge_setup_loss`). A setup error on a host that still
        answers is left as it is."""
        lost = self.host_lost(item, report)
        if lost is None:
            return
        state_of(item).incidents.append(lost)
        evidence = Evidence(check=check_id(item), guest_type=guest_type_of(item), outcome="failed",
                            lost=_as_death(lost))
        outcome = judge_setup_loss(evidence, facts, self.issues)
        lost.action, lost.signature = outcome.lost_action[0], outcome.lost_action[1] or lost.signature
        if outcome.kind == EXPECTED:
            expected(report, outcome.entry)
            report.wasxfail = outcome.reason
        else:
            add_note(report, outcome.note)
        attach(item, report, "incident", lost.as_property())


# The first attempt's failure text kept with a rerun check's result (its tail: the
# assertion is at the end of a traceback).
FIRST_ATTEMPT_CHARS = 6000


def _as_death(incident: Incident) -> Death:
    return Death(subject=incident.subject, name=incident.name, evidence=dict(incident.evidence),
                 guest_type=incident.guest_type, detail=incident.detail)


def _add_sections(item: pytest.Item, report: pytest.TestReport, state: CheckState) -> None:
    """A failure's report shows what the check only showed (host-wide tails) and, after a
    rerun, the first attempt's failure; neither was matched by any signature."""
    sections = list(item.stash.get(SHOWN_KEY, []))
    if state.first_text:
        sections.append(("first attempt (before the rerun on a fresh guest)", state.first_text))
    for title, text in sections:
        if hasattr(report.longrepr, "addsection") and getattr(report.longrepr, "reprcrash", None):
            report.longrepr.addsection(title, text)
        else:
            report.longrepr = f"{_text(report)}\n\n--- {title} ---\n{text}"


def refresh_derived(item: pytest.Item) -> None:
    """Before a rerun: finish every cached fixture wider than the check that holds a guest
    or derived data from one (privcmd's ``answers``, no_raw_mfn's ``grant_pairs`` and
    ``m2p``), dependents first, so the rerun gets the guest anew (a shared one replaced in
    place, an own one created again) and computes the data from it instead of judging the
    dead one's. (A module fixture is set up before the check's own autouse ones, so one
    kept would be computed from the dead guest before it was replaced.)"""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    guestish = {name for name, fdefs in defs.items()
                if name in GUEST_FIXTURES or any(_holds_guest(d) for d in fdefs)}

    def depth(name: str, seen: frozenset[str] = frozenset()) -> int:
        """How far ``name`` is from a guest fixture (0: it is one; -1: it does not use one)."""
        if name in guestish:
            return 0
        if name in seen:
            return -1
        below = [depth(arg, seen | {name}) for d in defs.get(name, ()) for arg in d.argnames]
        return max(below, default=-1) + 1 if any(b >= 0 for b in below) else -1

    stale = sorted(((depth(name), name, d) for name, fdefs in defs.items() for d in fdefs
                    if d.scope != "function" and d.cached_result is not None and depth(name) >= 0),
                   key=lambda t: -t[0])
    if stale and not getattr(item, "_request", None):
        item._initrequest()  # noqa: SLF001 - pytest dropped it after the attempt; the rerun needs it
    for _, name, fixturedef in stale:
        log.info("%s: %s computed again for the rerun (it holds or derives from a guest)", item.nodeid, name)
        fixturedef.finish(item._request)  # noqa: SLF001 - the request pytest gives this item


def _holds_guest(fixturedef: Any) -> bool:
    from .guests import Guest

    cached = getattr(fixturedef, "cached_result", None)
    return cached is not None and isinstance(cached[0], Guest)


def _unexplained_deaths_before(item: pytest.Item, report: pytest.TestReport) -> None:
    """A guest this check's setup found dead (between checks) with no emulator-fault
    signature: it was created again for the checks after, but this one fails its setup
    with the evidence. A death nobody can explain is never a green run (a Xen that kills
    idle guests now and then would otherwise pass on the fresh ones)."""
    found = [i for i in incidents.INCIDENTS[state_of(item).setup_from:]
             if i.subject == "guest" and i.phase in ("between-checks", "early-boot", "create")
             and i.signature is None and i.action in ("recreated", "failed")]
    if not found:
        return
    for incident in found:
        incident.action = "failed"
        attach(item, report, "incident", incident.as_property())
    fail(report, "\n\n".join(_unexplained(i) for i in found))


def _unexplained(i: Incident) -> str:
    again = " It was created again for the checks after this one." if i.phase == "between-checks" else ""
    return (f"{i.name}{f' ({i.guest_type})' if i.guest_type else ''} d{i.domid} died before this check "
            f"({i.phase}: {i.detail}); no known emulator-fault signature matches that domain's own "
            f"evidence (known_issues.yaml, check: guest-death), so this is not judged an emulator "
            f"fault.{again}\n{_evidence_text(i)}")


def _evidence_text(incident: Incident) -> str:
    return evidence_text(incident.evidence)


def _timed_list(xl: Any) -> Any:
    started = time.monotonic()
    try:
        return xl.list()
    finally:
        VERIFY_COST["calls"] += 1
        VERIFY_COST["seconds"] += time.monotonic() - started


DEATHS_KEY = pytest.StashKey[list]()


def add_death(item: pytest.Item, incident: Incident) -> None:
    """A death a check saw of a guest it holds itself (not a fixture, so :func:`verify_after`
    cannot look for it), e.g. a migrated guest gone from its source: judged like a death
    :func:`verify_after` finds, by the signature of that domain's own evidence."""
    item.stash.setdefault(DEATHS_KEY, []).append(incident)


def verify_after(item: pytest.Item) -> list[Incident]:
    """After the call: each of the check's guests still the domain it was given (one
    `xl list` per host)? A death is an incident (during-check); deaths the check itself
    reported (:func:`add_death`) come first."""
    found, lists = list(item.stash.get(DEATHS_KEY, [])), {}
    for guest in guests_of(item):
        if guest.released or guest.death_recorded:
            continue
        key = id(guest.xl.remote)
        try:
            if key not in lists:
                lists[key] = _timed_list(guest.xl)
        except Exception:  # noqa: BLE001 - dom0 not answering: the host check says so
            return found
        detail = guest.death(lists[key])
        if detail is None:
            guest.verified_at = time.monotonic()
            continue
        found.append(guest.incident("during-check", detail, "failed", nodeid=item.nodeid))
    return found


def verify_before(item: pytest.Item, request: pytest.FixtureRequest, p2m: Callable,
                  timeout: float) -> None:
    """Before the call: each of the check's guests alive, with the domid the harness
    created; a dead one is an incident (between checks, unless already recorded) and is
    created again in place. Skipped for a guest verified by the previous check's
    :func:`verify_after` less than FRESH_S ago."""
    state = state_of(item)
    for name in GUEST_FIXTURES:
        if name not in request.fixturenames:
            continue
        guest = request.getfixturevalue(name)
        if not guest.death_recorded and time.monotonic() - getattr(guest, "verified_at", -1e9) < FRESH_S:
            continue
        before = len(incidents.INCIDENTS)
        if name == "guest":
            guest.released = False  # a shared guest is never a check's to destroy
        started, listed = time.monotonic(), not guest.released  # a released guest is not listed
        if not guest.replace_if_dead(p2m, timeout, f"before {item.nodeid}", nodeid=item.nodeid) and listed:
            # (a recreation's time is the incident's, not this cost)
            VERIFY_COST["calls"] += 1
            VERIFY_COST["seconds"] += time.monotonic() - started
        state.incidents += incidents.INCIDENTS[before:]
