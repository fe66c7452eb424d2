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
from _pytest.runner import runtestprotocol

from . import incidents
from .incidents import Incident
from .known_issues import HOST_DEATH, KnownIssue, decide, emulator_fault, match

log = logging.getLogger("nested_xen")

GUEST_FIXTURES = ("guest", "own_guest")
PASSED_AFTER_FAULT = "passed after emulator fault"
# A post-check verification this recent stands for the next check's pre-check (both are
# one `xl list`); a death in that gap is then found after that check, during-check.
FRESH_S = 5.0


@dataclass
class CheckState:
    """One check's attempts: its incidents and whether it is to run again."""

    attempt: int = 1
    incidents: list[Incident] = field(default_factory=list)
    fault: str | None = None  # the first attempt's emulator-fault signature
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
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("guest_type") if callspec is not None else None


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
    """Registered by harness/pytest_plugin.py with the run's known issues and rerun cap."""

    def __init__(self, issues: list[KnownIssue], rerun_cap: int,
                 host_lost: Callable[[pytest.Item, pytest.TestReport], Incident | None]) -> None:
        self.issues, self.cap, self.host_lost = issues, rerun_cap, host_lost
        self.reruns: list[str] = []  # node ids run again after an emulator fault
        VERIFY_COST.update(calls=0, seconds=0.0)  # this run's (pytester runs share the module)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        """Run a check; after an emulator fault (see :meth:`_judge_death`) once more, on a
        fresh guest; log only the last attempt's reports."""
        if not set(getattr(item, "fixturenames", ())) & {"xen_host", *GUEST_FIXTURES}:
            return None
        state = state_of(item)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        if state.rerun:
            self.reruns.append(item.nodeid)
            state.attempt, state.rerun = 2, False
            log.warning("%s: emulator fault (%s); running it again on a fresh guest", item.nodeid,
                        state.fault)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
        for report in reports:
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        state_of(item).setup_from = len(incidents.INCIDENTS)
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
        if deaths:
            self._judge_death(item, report, state, deaths[0], facts)
        else:
            self._judge(item, report, state, facts, lost)
        for incident in state.incidents:
            attach(item, report, "incident", incident.as_property())
        return report

    def _judge(self, item: pytest.Item, report: pytest.TestReport, state: CheckState, facts: Any,
               lost: Incident | None = None) -> None:
        """A check whose guests lived: its failure is expected only if a known issue's
        versions and signature match (the evidence: its failure text and, for a host
        lost during it, the serial tail)."""
        check, kind = check_id(item), guest_type_of(item)
        lost_note = _lost_note(lost, "during this check") if lost is not None else ""
        if report.failed:
            evidence = f"{_text(report)}\n{lost.text() if lost is not None else ''}"
            decision = decide(self.issues, check, kind, facts, evidence)
            if lost is not None and decision.matched is None and self._host_fault(report, lost, facts):
                return
            if lost is not None:
                lost.action = "expected-failure" if decision.matched is not None else "failed"
                lost.signature = decision.matched.label() if decision.matched is not None else None
            if decision.matched is not None:
                expected(report, decision.matched)
                return
            add_note(report, "\n".join(n for n in (lost_note, decision.note()) if n))
            return
        if lost is not None:  # failed as the check's own xfail marker expected
            lost.action = "expected-failure"
            report.wasxfail = f"{report.wasxfail}; {lost.name} stopped answering during it"
            return
        if report.passed:
            entry = match(self.issues, check, kind, facts)
            if entry is not None and not entry.flaky:
                fail(report, f"[XPASS(strict)] {entry.describe()} -- the check passed: remove the entry "
                             "from known_issues.yaml")
            elif entry is not None:
                report.wasxfail = entry.describe()  # XPASS, shown, not failing the run
            if state.attempt == 2 and report.passed:
                attach(item, report, "verdict", PASSED_AFTER_FAULT)

    def _judge_setup(self, item: pytest.Item, report: pytest.TestReport, facts: Any) -> None:
        """A check whose setup failed (its own guest being created, say) while dom0 stopped
        answering: the host is lost (an incident with the serial tail), judged as under a
        check: a ``host-death`` signature makes it an expected failure (not run, result
        unknown); without one the setup error stays, naming the incident. A setup error
        on a host that still answers is left as it is."""
        lost = self.host_lost(item, report)
        if lost is None:
            return
        state_of(item).incidents.append(lost)
        if not self._host_fault(report, lost, facts, "while this check was being set up"):
            lost.action = "failed"
            add_note(report, _lost_note(lost, "while this check was being set up"))
        attach(item, report, "incident", lost.as_property())

    def _host_fault(self, report: pytest.TestReport, lost: Incident, facts: Any,
                    during: str = "during this check") -> bool:
        """dom0 died under this check: with a ``host-death`` entry's versions and signature
        in the serial tail, an emulator fault: the check's result is unknown, not wrong."""
        fault = decide(self.issues, HOST_DEATH, None, facts, lost.text()).matched
        if fault is None:
            return False
        lost.action, lost.signature = "expected-failure", fault.label()
        expected(report, fault)
        report.wasxfail = (f"{lost.name} (dom0) died {during} of a known emulator fault "
                           f"[{lost.signature}]: its result is unknown; {fault.describe()}")
        return True

    def _judge_death(self, item: pytest.Item, report: pytest.TestReport, state: CheckState,
                     death: Incident, facts: Any) -> None:
        check, kind = check_id(item), guest_type_of(item)
        evidence = f"{_text(report)}\n{death.text()}"
        fault = emulator_fault(self.issues, death.guest_type or kind, facts, death.text(), check)
        death.signature = fault.label() if fault is not None else None
        what = f"{death.name}{f' ({death.guest_type})' if death.guest_type else ''}"
        told = (f"{what} died during this check ({death.detail}); a result read from a dead "
                f"or replaced domain proves nothing.\n{_evidence_text(death)}")
        if fault is None:
            death.action = "failed"
            fail(report, f"{told}\nNo known emulator-fault signature matches this death "
                         f"(known_issues.yaml): it fails at once.\n\ncheck's own result:\n{_text(report)}")
            return
        if state.attempt == 1 and len(self.reruns) < self.cap:
            death.action, state.fault, state.rerun = "rerun", death.signature, True
            fail(report, f"{told}\nemulator fault [{death.signature}]: run again on a fresh guest")
            return
        why = ("the same emulator fault twice" if state.fault == death.signature and state.attempt == 2
               else f"emulator fault, no rerun left ({len(self.reruns)} of {self.cap} this run"
                    f"{', this check already ran twice' if state.attempt == 2 else ''})")
        decision = decide(self.issues, check, kind, facts, evidence)
        if decision.matched is not None:
            death.action = "expected-failure"
            expected(report, decision.matched)
            report.wasxfail = f"{why} [{death.signature}]: {decision.matched.describe()}"
            return
        death.action = "failed"
        fail(report, f"{told}\n{why} [{death.signature}]; no known issue of this check names it"
                     + (f"\n{decision.note()}" if decision.considered else ""))


def _unexplained_deaths_before(item: pytest.Item, report: pytest.TestReport) -> None:
    """A guest this check's setup found dead (between checks) with no emulator-fault
    signature: it was created again for the checks after, but this one fails its setup
    with the evidence. A death nobody can explain is never a green run (a Xen that kills
    idle guests now and then would otherwise pass on the fresh ones)."""
    found = [i for i in incidents.INCIDENTS[state_of(item).setup_from:]
             if i.subject == "guest" and i.phase == "between-checks" and i.signature is None]
    if not found:
        return
    for incident in found:
        incident.action = "failed"
        attach(item, report, "incident", incident.as_property())
    fail(report, "\n\n".join(
        f"{i.name}{f' ({i.guest_type})' if i.guest_type else ''} d{i.domid} died before this check "
        f"({i.detail}); no known emulator-fault signature matches (known_issues.yaml, "
        f"check: guest-death), so this is not judged an emulator fault. It was created again for "
        f"the checks after this one.\n{_evidence_text(i)}" for i in found))


def _lost_note(lost: Incident, during: str) -> str:
    return f"{lost.name} stopped answering {during} (incident: host lost)\n{_evidence_text(lost)}"


def _evidence_text(incident: Incident) -> str:
    parts = [f"--- {key} ---\n{value}" for key, value in incident.evidence.items() if value]
    return "\n".join(parts) or "(no evidence: no xl dmesg line about that domid, empty console)"


def _timed_list(xl: Any) -> Any:
    started = time.monotonic()
    try:
        return xl.list()
    finally:
        VERIFY_COST["calls"] += 1
        VERIFY_COST["seconds"] += time.monotonic() - started


def verify_after(item: pytest.Item) -> list[Incident]:
    """After the call: each of the check's guests still the domain it was given (one
    `xl list` per host)? A death is an incident (during-check)."""
    found, lists = [], {}
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
