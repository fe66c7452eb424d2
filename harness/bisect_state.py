"""`nested-xen bisect`'s decisions: a step's outcome from results.json, the next commit to
test, the answer, and the state file. No git, no build, no pytest here (harness/bisect.py
does those), so every decision is table-tested over results.json samples and fake steps.

A step is GOOD only when every selected check is a plain ``passed`` (no verdict, no
emulator incident on it); BAD when at least one is a plain ``failed`` (a failure with no
emulator fault on that check: not a rerun's, not "the same emulator fault twice"); anything
else (passed after an emulator fault, an emulator incident, an expected failure, an XPASS,
an error, a build or boot failure, no results.json) is UNTESTABLE this time: the
same commit is run again (``retries``), then skipped as ``git bisect skip`` does. A skipped
check did not run (the run config leaves out its guest type, say) and counts for neither;
a run where no check ran at all is the user's to fix (:class:`SelectionError`).

The commits between good and bad are a graph (``git rev-list --ancestry-path --parents``,
first-parent or full): the candidates are the ancestors of the newest bad not reachable
from a good; the next commit is the untested, unskipped candidate that halves them best
(on a line: the one nearest the midpoint). Once one candidate is left, its parent must pass
and it must fail again ``confirm`` times each on fresh runs (as OSSTest did) before the
answer is "complete"; otherwise it is "inconclusive", with the counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GOOD, BAD, UNTESTABLE = "good", "bad", "untestable"
BISECT, RETEST, CONFIRM_PARENT, CONFIRM_CULPRIT = "bisect", "retest", "confirm-parent", "confirm-culprit"
COMPLETE, INCONCLUSIVE = "complete", "inconclusive"
FORCED = "forced fault"


class BisectError(RuntimeError):
    """The bisect cannot start or go on; the message says what to do."""


class SelectionError(BisectError):
    """The check selection ran no check: the user must fix it, a skip would hide it."""


# ---------------------------------------------------------------------- one step's outcome


@dataclass(frozen=True)
class StepOutcome:
    outcome: str  # GOOD | BAD | UNTESTABLE
    reason: str  # one line
    evidence: str = ""  # the failing checks' text, or the passing checks


def emulator_incidents(check: dict) -> list[dict]:
    """The incidents on a check that an emulator-fault signature matched (or that made it rerun)."""
    return [i for i in check.get("incidents") or [] if i.get("signature") or i.get("action") == "rerun"]


def is_plain(check: dict, outcome: str) -> bool:
    """``outcome`` with no verdict and no emulator incident on the check."""
    return check.get("outcome") == outcome and not check.get("verdict") and not emulator_incidents(check)


def classify(results_json: Path, returncode: int | None = None) -> StepOutcome:
    """The step's outcome, strictly from the run's results.json (pytest's exit status only
    tells "nothing collected", 5, from a run that stopped before any check reported)."""
    if not results_json.is_file():
        if returncode == 5:
            raise SelectionError("the selection ran no check (pytest exit 5: no test collected); fix -k or "
                                 "the node ids (`pytest plugins --collect-only -q -k EXPR` lists them)")
        return StepOutcome(UNTESTABLE, f"no results.json (pytest exit {returncode}): the host did not "
                                       "boot or the run stopped before any check reported")
    data = json.loads(results_json.read_text())
    checks = data.get("results", []) if isinstance(data, dict) else []
    if not checks:
        raise SelectionError(f"{results_json}: no check ran; fix the selection (-k or node ids)")
    ran = [c for c in checks if c.get("outcome") != "skipped"]  # a skip did not run (the run config's)
    if not ran:
        raise SelectionError(f"{results_json}: every selected check skipped ({checks[0].get('reason', '')}); "
                             "no check ran: fix the selection or the run config (--bisect-config)")
    skipped = f", {len(checks) - len(ran)} skipped (not run)" if len(ran) < len(checks) else ""
    failed = [c for c in ran if is_plain(c, "failed")]
    if failed:
        first = failed[0]
        name = first.get("check") or first["nodeid"]
        return StepOutcome(BAD, f"{name} failed: {first.get('reason', '')}"[:240],
                           "\n".join(f"{c['nodeid']}: {c.get('reason', '')}" for c in failed))
    if all(is_plain(c, "passed") for c in ran):
        return StepOutcome(GOOD, f"{len(ran)} passed{skipped}",
                           "\n".join(f"{c['nodeid']}: passed" for c in ran))
    return StepOutcome(UNTESTABLE, _why_untestable(ran))


def _why_untestable(checks: list[dict]) -> str:
    odd = [c for c in checks if not is_plain(c, "passed")]
    counts: dict[str, int] = {}
    for c in odd:
        label = str(c.get("outcome") or "no outcome")
        if emulator_incidents(c) and label in ("passed", "failed"):
            label += " with an emulator incident"
        counts[label] = counts.get(label, 0) + 1
    first = odd[0]
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    return f"{summary} (neither pass nor plain failure); e.g. {first.get('check') or first['nodeid']}: " \
           f"{first.get('reason', '')}"[:300]


# ---------------------------------------------------------------------- inputs, steps, state


@dataclass(frozen=True)
class Inputs:
    """What a bisect is of: a resumed bisect must have the same."""

    src: str
    good: str  # full commit ids
    bad: str
    keyword: str = ""  # pytest -k
    nodeids: tuple[str, ...] = ()
    kconfig: tuple[str, ...] = ()
    first_parent: bool = True
    confirm: int = 2
    retries: int = 1
    force_fault: tuple[str, ...] = ()  # full commit ids
    config: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Inputs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})

    def differences(self, other: Inputs) -> list[str]:
        return [f"{f.name}: {getattr(self, f.name)!r} (state) vs {getattr(other, f.name)!r} (now)"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass
class Step:
    """One finished run of one commit."""

    n: int
    phase: str  # BISECT | RETEST | CONFIRM_PARENT | CONFIRM_CULPRIT
    commit: str
    subject: str
    outcome: str  # GOOD | BAD | UNTESTABLE
    reason: str
    build_s: float = 0.0
    run_s: float = 0.0
    build_cached: bool = False
    forced_fault: bool = False
    results: str = ""  # the run's results.json
    build_log: str = ""
    evidence: str = ""


@dataclass
class State:
    inputs: Inputs
    steps: list[Step] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Written whole or not at all (a temporary file renamed over it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = {"version": 1, "inputs": self.inputs.as_dict(),
                "steps": [dataclasses.asdict(s) for s in self.steps]}
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            data = json.loads(path.read_text())
            return cls(Inputs.from_dict(data["inputs"]), [Step(**s) for s in data["steps"]])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BisectError(f"{path}: not a bisect state file ({exc}); remove it to start afresh") from None


def resume_state(path: Path, inputs: Inputs, resume: bool) -> State:
    """The state to go on from: the file's (``resume``, same inputs) or a new one."""
    if not resume:
        if path.exists():
            raise BisectError(f"{path} holds a bisect already: continue it with --resume, or remove the file "
                              "(or give another --artifacts-dir) to start afresh")
        return State(inputs)
    if not path.is_file():
        raise BisectError(f"--resume: no state file {path} (was --artifacts-dir the same?)")
    state = State.load(path)
    diff = state.inputs.differences(inputs)
    if diff:
        raise BisectError(f"--resume: {path} is a bisect of other inputs ({'; '.join(diff)}); give the same "
                          "inputs, or start afresh without --resume in another --artifacts-dir")
    return state


# ---------------------------------------------------------------------- the commit graph


@dataclass(frozen=True)
class Graph:
    """The commits of good..bad, oldest first, with their parents inside the range and their
    first parent (inside or not: the parent a culprit is confirmed against)."""

    order: tuple[str, ...]
    parents: dict[str, tuple[str, ...]]
    first_parent: dict[str, str]

    def ancestors(self) -> dict[str, frozenset[str]]:
        """Each commit's in-range ancestors, itself included."""
        out: dict[str, frozenset[str]] = {}
        for c in self.order:  # oldest first: parents are done before their children
            out[c] = frozenset({c}).union(*(out[p] for p in self.parents.get(c, ()) if p in out))
        return out


@dataclass
class Answer:
    status: str  # COMPLETE | INCONCLUSIVE
    message: str
    culprit: str = ""
    parent: str = ""
    candidates: list[str] = field(default_factory=list)  # the inconclusive range
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Action:
    commit: str
    phase: str


def _tally(steps: list[Step], commit: str, phases: tuple[str, ...]) -> dict[str, int]:
    out = {GOOD: 0, BAD: 0, UNTESTABLE: 0}
    for s in steps:
        if s.commit == commit and s.phase in phases:
            out[s.outcome] += 1
    return out


def marks(steps: list[Step], retries: int) -> tuple[dict[str, str], set[str], str | None]:
    """The bisect steps' verdicts: commit -> GOOD/BAD, the skipped commits, and the commit
    to run again (its last run untestable, retries left)."""
    decided: dict[str, str] = {}
    untestable: dict[str, int] = {}
    last = None
    for s in steps:
        if s.phase not in (BISECT, RETEST):
            continue
        last = s
        if s.outcome == UNTESTABLE:
            untestable[s.commit] = untestable.get(s.commit, 0) + 1
        else:
            decided.setdefault(s.commit, s.outcome)
    skipped = {c for c, n in untestable.items() if c not in decided and n > retries}
    again = last.commit if last is not None and last.outcome == UNTESTABLE and last.commit not in skipped \
        and last.commit not in decided else None
    return decided, skipped, again


def candidates(graph: Graph, decided: dict[str, str], bad: str) -> list[str]:
    """The commits that may be the first bad one, oldest first."""
    anc = graph.ancestors()
    possible = set(anc[bad])
    for c, outcome in decided.items():
        if c in anc:
            possible = possible & anc[c] if outcome == BAD else possible - anc[c]
    return [c for c in graph.order if c in possible]


def midpoint(graph: Graph, cands: list[str], testable: list[str]) -> str:
    """The testable candidate whose in-candidate ancestors best halve the candidates."""
    anc, within, n = graph.ancestors(), set(cands), len(cands)

    def score(c: str) -> int:
        w = len(anc[c] & within)
        return min(w, n - w)

    return max(testable, key=lambda c: (score(c), -cands.index(c)))


def next_action(graph: Graph, inputs: Inputs, steps: list[Step]) -> Action | Answer:
    """What to run next, or the answer."""
    decided, skipped, again = marks(steps, inputs.retries)
    if again is not None:
        return Action(again, RETEST)
    cands = candidates(graph, {**decided, inputs.bad: BAD}, inputs.bad)
    testable = [c for c in cands if c not in decided and c not in skipped]
    if testable:
        return Action(midpoint(graph, cands, testable), BISECT)
    bads = [c for c in cands if decided.get(c, BAD if c == inputs.bad else None) == BAD]
    if len(cands) > 1 or not bads:
        listed = ", ".join(c[:12] for c in cands)
        skips = ", ".join(c[:12] for c in cands if c in skipped) or "none"
        return Answer(INCONCLUSIVE, f"inconclusive: the first bad commit is one of {cands[0][:12]}.."
                                    f"{cands[-1][:12]} ({len(cands)} commits: {listed}); skipped as "
                                    f"untestable: {skips}", candidates=cands)
    return confirm(graph, inputs, steps, cands[0])


def confirm(graph: Graph, inputs: Inputs, steps: list[Step], culprit: str) -> Action | Answer:
    """The parent must pass and the culprit fail ``confirm`` times each, on fresh runs made
    for this (the bisect's own steps do not count); ``retries`` untestable runs are allowed
    each; a contradicting run ends it at once."""
    parent = graph.first_parent[culprit]
    p = _tally(steps, parent, (CONFIRM_PARENT,))
    c = _tally(steps, culprit, (CONFIRM_CULPRIT,))
    counts = {"parent": p, "culprit": c}
    n = inputs.confirm
    sides = [(CONFIRM_PARENT, parent, p, GOOD, BAD), (CONFIRM_CULPRIT, culprit, c, BAD, GOOD)]
    if p[BAD] or c[GOOD]:
        why = ("the parent failed in a confirmation run" if p[BAD]
               else "the culprit passed in a confirmation run")
        return _verdict(INCONCLUSIVE, culprit, parent, counts, n, why)
    todo = []
    for side, (phase, commit, tally, want, _) in enumerate(sides):
        runs = sum(tally.values())
        if tally[want] >= n:
            continue
        if n - tally[want] > n + inputs.retries - runs:
            return _verdict(INCONCLUSIVE, culprit, parent, counts, n,
                            f"the {phase.removeprefix('confirm-')} was untestable too often")
        todo.append((runs, side, phase, commit))  # the parent first, then alternating
    if not todo:
        return _verdict(COMPLETE, culprit, parent, counts, n, "")
    _, _, phase, commit = min(todo)
    return Action(commit, phase)


def counts_text(counts: dict[str, dict[str, int]], n: int) -> str:
    """``parent 2/2 pass, culprit 1/2 fail, 1 untestable``."""
    p, c = counts.get("parent", {}), counts.get("culprit", {})
    text = f"parent {p.get(GOOD, 0)}/{n} pass, culprit {c.get(BAD, 0)}/{n} fail"
    wrong = [f"parent {p[BAD]} fail"] if p.get(BAD) else []
    wrong += [f"culprit {c[GOOD]} pass"] if c.get(GOOD) else []
    untestable = p.get(UNTESTABLE, 0) + c.get(UNTESTABLE, 0)
    return text + "".join(f", {w}" for w in wrong) + (f", {untestable} untestable" if untestable else "")


def _verdict(status: str, culprit: str, parent: str, counts: dict, n: int, why: str) -> Answer:
    told = counts_text(counts, n)
    if status == COMPLETE:
        message = f"first bad commit {culprit[:12]} (confirmed: {told})"
    else:
        message = f"inconclusive: {why}; candidate {culprit[:12]} ({told})"
    return Answer(status, message, culprit=culprit, parent=parent, counts=counts)


def estimate(graph: Graph, inputs: Inputs, steps: list[Step]) -> int:
    """About how many bisect steps in all: those done and log2 of the candidates left."""
    decided, _, _ = marks(steps, inputs.retries)
    left = len(candidates(graph, {**decided, inputs.bad: BAD}, inputs.bad))
    done = sum(1 for s in steps if s.phase in (BISECT, RETEST))
    return done + max(0, (left - 1).bit_length())
