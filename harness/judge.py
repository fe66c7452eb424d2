"""The verdict's judge: evidence and facts in, an outcome out. No pytest, no SSH.

harness/verdict.py gathers what happened to a check (its failure text, the evidence
plugins added by kind, the deaths of its guests and of its host, each with its own
evidence) into an :class:`Evidence`; :func:`judge` decides; verdict.py applies the
:class:`Outcome` to pytest's report and the incidents. Because the judge is pure, it is
table-tested with the evidence shapes real runs produce (tests/unit/test_judge.py).

Rules (each closes a route by which a regression once read as green):
- a signature is matched only on the evidence kinds its entry names, each the
  subject's own: never a host-wide tail;
- a guest's death is an emulator fault only when a ``guest-death`` entry (or the
  check's own) matches that domain's own ``xl dmesg`` lines or console; a fault is run
  again once on a fresh guest, and so is a failure a ``flaky`` entry of the check
  matches: an intermittent fault is known by chance, not by repetition;
- a fault that struck every attempt is an expected failure only if that is consistent
  with the entry's measured rate (:func:`harness.known_issues.chance`), else a
  suspected regression, a failure;
- a check that passed only on its second attempt is its own outcome, "passed after
  emulator fault" (``strict``: a failure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .known_issues import GUEST_DEATH, HOST_DEATH, KnownIssue, chance, decide, match

PASSED = "passed"
PASSED_AFTER_FAULT = "passed after emulator fault"
XPASS = "xpass"  # a flaky entry's versions match and the check passed: shown, not failing
FAILED = "failed"
EXPECTED = "expected-failure"
RERUN = "rerun"
KEEP = "keep"  # leave pytest's own outcome (a skip, the check's own xfail marker)


@dataclass(frozen=True)
class Death:
    """A death during the check: a guest (``dmesg``/``console`` of that domain only) or
    its host (``serial``: the lost host's tail)."""

    subject: str  # guest | host
    name: str
    evidence: dict[str, str]
    guest_type: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Evidence:
    """What a check's attempt left: its pytest outcome and every kind of evidence."""

    check: str  # plugins/FILE.py::test_name
    guest_type: str | None
    outcome: str  # passed | failed | xfailed (its own marker) | skipped
    failure: str = ""  # the check's own failure text (never a host-wide tail)
    extra: dict[str, str] = field(default_factory=dict)  # harness.verdict.add_evidence, by kind
    death: Death | None = None  # the first guest that died during it
    lost: Death | None = None  # its host, when dom0 stopped answering
    attempt: int = 1
    first_fault: str | None = None  # the label of the fault that caused this rerun
    reruns_left: bool = True
    budget: str = ""  # "N of CAP this run": the reruns taken, for the reader
    strict: bool = False  # passed after an emulator fault fails (--strict-emulator)
    found: str = ""  # harness.verdict.found: failures established on a live guest

    def kinds(self, death: Death | None = None) -> dict[str, str]:
        """Every kind of evidence of this attempt, a death's own on top."""
        found = {"failure": self.failure, **self.extra}
        for who in (death, self.lost):
            if who is not None:
                found.update({k: v for k, v in who.evidence.items() if v})
        return found


@dataclass
class Outcome:
    """What to do with the report: ``kind`` (a constant above), the failure's ``message``
    (it replaces the text) or the expected failure's ``reason``, a ``note`` to add to a
    failure's text, and per death (``death``, ``lost``) its action and signature."""

    kind: str
    message: str = ""
    reason: str = ""
    note: str = ""
    entry: KnownIssue | None = None
    fault: str | None = None  # the label of the emulator fault seen (a rerun's cause)
    death_action: tuple[str, str | None] | None = None
    lost_action: tuple[str, str | None] | None = None


def judge(ev: Evidence, facts: Any, issues: list[KnownIssue]) -> Outcome:
    """The outcome of one attempt of one check."""
    if ev.found:
        return _found(ev)
    if ev.death is not None:
        return _death(ev, facts, issues)
    if ev.lost is not None and ev.outcome in ("failed", "xfailed"):
        return _lost(ev, facts, issues)
    if ev.outcome == "failed":
        return _failed(ev, facts, issues)
    if ev.outcome == "passed":
        return _passed(ev, facts, issues)
    return Outcome(KEEP)


def _found(ev: Evidence) -> Outcome:
    """What the check established on a live guest fails it, whatever came after: a death that
    followed is recorded, never the reason (no rerun, no expected failure)."""
    after = ""
    if ev.death is not None:
        after = (f"\n\n{ev.death.name} died afterwards ({ev.death.detail}); that does not undo what was "
                 f"read from it alive.\n{evidence_text(ev.death.evidence)}")
    return Outcome(FAILED, message=f"{ev.found}{after}\n\ncheck's own result:\n{ev.failure}",
                   death_action=(FAILED, None) if ev.death is not None else None)


def judge_setup_loss(ev: Evidence, facts: Any, issues: list[KnownIssue]) -> Outcome:
    """A setup that failed while dom0 stopped answering: a ``host-death`` signature in the
    serial tail makes it an expected failure (its result unknown); else it stays an error
    that names the incident."""
    assert ev.lost is not None
    fault = decide(issues, HOST_DEATH, None, facts, ev.lost.evidence).matched
    if fault is not None:
        return Outcome(EXPECTED, reason=_host_reason(ev.lost, fault, "while this check was being set up"),
                       entry=fault, lost_action=(EXPECTED, fault.label()))
    return Outcome(KEEP, note=lost_note(ev.lost, "while this check was being set up"),
                   lost_action=(FAILED, None))


def _passed(ev: Evidence, facts: Any, issues: list[KnownIssue]) -> Outcome:
    entry = match(issues, ev.check, ev.guest_type, facts)
    if entry is not None and not entry.flaky:
        return Outcome(FAILED, message=f"[XPASS(strict)] {entry.describe()} -- the check passed: remove "
                                       "the entry from known_issues.yaml", entry=entry)
    if ev.attempt == 2:
        if ev.strict:
            return Outcome(FAILED, message=f"{PASSED_AFTER_FAULT} [{ev.first_fault}]: it passed only on a "
                                           "fresh guest, and --strict-emulator is on (under KVM no "
                                           "emulator fault is expected)")
        return Outcome(PASSED_AFTER_FAULT, reason=f"first attempt: [{ev.first_fault}]", entry=entry)
    if entry is not None:
        return Outcome(XPASS, reason=entry.describe(), entry=entry)
    return Outcome(PASSED)


def _failed(ev: Evidence, facts: Any, issues: list[KnownIssue]) -> Outcome:
    decision = decide(issues, ev.check, ev.guest_type, facts, ev.kinds())
    entry = decision.matched
    if entry is None:
        return Outcome(KEEP, note=decision.note())
    if entry.flaky and ev.attempt == 1 and ev.reruns_left:
        return Outcome(RERUN, message=f"known intermittent fault [{entry.label()}]: run again on a fresh "
                                      "guest, as chance and not repetition tells it from a regression",
                       entry=entry, fault=entry.label())
    suspect = chance(entry, 2) if ev.attempt == 2 and ev.first_fault == entry.label() else None
    if suspect is not None:
        return Outcome(FAILED, message=f"{suspect}; known issue considered: {entry.label()}\n\n"
                                       f"check's own result:\n{ev.failure}", entry=entry)
    return Outcome(EXPECTED, reason=_seen(entry, ev.kinds()), entry=entry)


def _lost(ev: Evidence, facts: Any, issues: list[KnownIssue]) -> Outcome:
    assert ev.lost is not None
    if ev.outcome == "xfailed":  # as the check's own xfail marker expected
        return Outcome(KEEP, reason=f"{ev.lost.name} stopped answering during it",
                       lost_action=(EXPECTED, None))
    decision = decide(issues, ev.check, ev.guest_type, facts, ev.kinds())
    if decision.matched is not None:
        return Outcome(EXPECTED, reason=_seen(decision.matched, ev.kinds()), entry=decision.matched,
                       lost_action=(EXPECTED, decision.matched.label()))
    fault = decide(issues, HOST_DEATH, None, facts, ev.lost.evidence).matched
    if fault is not None:
        return Outcome(EXPECTED, reason=_host_reason(ev.lost, fault, "during this check"), entry=fault,
                       lost_action=(EXPECTED, fault.label()))
    return Outcome(KEEP, note="\n".join(n for n in (lost_note(ev.lost, "during this check"), decision.note())
                                        if n), lost_action=(FAILED, None))


def _death(ev: Evidence, facts: Any, issues: list[KnownIssue]) -> Outcome:
    death = ev.death
    assert death is not None
    kind = death.guest_type or ev.guest_type
    emulator = decide(issues, GUEST_DEATH, kind, facts, death.evidence).matched
    own = decide(issues, ev.check, kind, facts, ev.kinds(death)).matched
    what = f"{death.name}{f' ({death.guest_type})' if death.guest_type else ''}"
    told = (f"{what} died during this check ({death.detail}); a result read from a dead or replaced "
            f"domain proves nothing.\n{evidence_text(death.evidence)}")
    if emulator is None and own is not None and not own.flaky:
        # a strict entry of this check: a known, deterministic fault (Debian testing's device
        # model refusing libxl's restore, say), not the emulator's chance: no rerun
        return Outcome(EXPECTED, reason=f"{what} is gone: {_seen(own, ev.kinds(death))}", entry=own,
                       death_action=(EXPECTED, own.label()))
    fault = emulator or (own if own is not None and own.flaky else None)
    label = fault.label() if fault is not None else None
    if fault is None:
        return Outcome(FAILED, message=f"{told}\nNo known emulator-fault signature matches this death's own "
                                       f"evidence (known_issues.yaml): it fails at once.\n\ncheck's own "
                                       f"result:\n{ev.failure}", death_action=(FAILED, None))
    if ev.attempt == 1 and ev.reruns_left:
        return Outcome(RERUN, message=f"{told}\nemulator fault [{label}]: run again on a fresh guest",
                       fault=label, death_action=(RERUN, label))
    twice = ev.attempt == 2 and ev.first_fault == label
    again = ", this check already ran twice" if ev.attempt == 2 else ""
    why = "the same emulator fault twice" if twice else f"emulator fault, no rerun left ({ev.budget}{again})"
    decision = decide(issues, ev.check, ev.guest_type, facts, ev.kinds(death))
    entry = decision.matched
    if entry is None:
        return Outcome(FAILED, message=f"{told}\n{why} [{label}]; no known issue of this check names it"
                                       + (f"\n{decision.note()}" if decision.considered else ""),
                       fault=label, death_action=(FAILED, label))
    suspect = chance(entry if entry.rate is not None else fault, 2) if twice else None
    if suspect is not None:
        return Outcome(FAILED, message=f"{told}\n{why} [{label}]: {suspect}", entry=entry, fault=label,
                       death_action=(FAILED, label))
    return Outcome(EXPECTED, reason=f"{why} [{label}]: {_seen(entry, ev.kinds(death))}", entry=entry,
                   fault=label,
                   death_action=(EXPECTED, label))


def _seen(entry: KnownIssue, evidence: dict[str, str]) -> str:
    """An expected failure's reason: the entry, and where its signature was seen."""
    where = entry.matched_line(evidence)
    return f"{entry.describe()}; seen in {where}" if where else entry.describe()


def _host_reason(lost: Death, fault: KnownIssue, during: str) -> str:
    return (f"{lost.name} (dom0) died {during} of a known emulator fault [{fault.label()}]: its result "
            f"is unknown; {fault.describe()}")


def lost_note(lost: Death, during: str) -> str:
    return f"{lost.name} stopped answering {during} (incident: host lost)\n{evidence_text(lost.evidence)}"


def evidence_text(evidence: dict[str, str]) -> str:
    parts = [f"--- {key} ---\n{value}" for key, value in evidence.items() if value]
    return "\n".join(parts) or "(no evidence: no xl dmesg line about that domid, empty console)"
