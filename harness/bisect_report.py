"""What `nested-xen bisect` says: a stage line per step, the final table (terminal and
``bisect.md``) and ``bisect.json`` (the steps, the answer, its evidence)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

from .bisect_state import (
    BAD,
    CONFIRM_CULPRIT,
    CONFIRM_PARENT,
    FORCED,
    GOOD,
    Answer,
    State,
    Step,
    counts_text,
)
from .report import markdown_table

HEADER = ("#", "phase", "commit", "subject", "build", "run", "outcome", "reason")


def _seconds(step: Step) -> str:
    return "cached" if step.build_cached else f"{step.build_s:.0f} s"


def outcome_label(step: Step) -> str:
    return f"{step.outcome} ({FORCED})" if step.forced_fault else step.outcome


def stage_line(step: Step, total: int, confirm: int) -> str:
    """``[bisect] step 3/~5 1a2b3c4d5e6f subject: build 41 s, run 212 s -> bad (why)``."""
    where = f"step {step.n}/~{total}" if total else f"step {step.n} ({step.phase})"
    return (f"[bisect] {where} {step.commit[:12]} {step.subject[:60]}: build {_seconds(step)}, "
            f"run {step.run_s:.0f} s -> {outcome_label(step)} ({step.reason[:200]})")


def rows(state: State) -> list[list[str]]:
    return [[str(s.n), s.phase, s.commit[:12], s.subject[:50], _seconds(s), f"{s.run_s:.0f} s",
             outcome_label(s), s.reason[:160]] for s in state.steps]


def evidence(state: State, answer: Answer) -> dict[str, dict[str, str]]:
    """The failing check's text at the culprit and the passing run at its parent (the
    confirmation runs first, then the bisect's own)."""
    out = {}
    for role, commit, want, phase in (("culprit", answer.culprit, BAD, CONFIRM_CULPRIT),
                                      ("parent", answer.parent, GOOD, CONFIRM_PARENT)):
        found = sorted((s for s in state.steps if s.commit == commit and s.outcome == want),
                       key=lambda s: s.phase != phase)
        if commit and found:
            out[role] = {"commit": commit, "step": str(found[0].n), "results": found[0].results,
                         "text": found[0].evidence}
    return out


def _subject(src: Path, commit: str) -> str:
    out = subprocess.run(["git", "log", "-1", "--format=%s", commit], cwd=src, capture_output=True, text=True)
    return out.stdout.strip()


def answer_lines(state: State, answer: Answer, src: Path) -> list[str]:
    lines = [f"answer: {answer.status.upper()}: {answer.message}"]
    if answer.culprit:
        lines.append(f"culprit: {answer.culprit} {_subject(src, answer.culprit)}")
        lines.append(f"parent:  {answer.parent} {_subject(src, answer.parent)}")
        lines.append(f"confirmation: {counts_text(answer.counts, state.inputs.confirm)}")
    for c in answer.candidates:
        lines.append(f"  candidate {c[:12]} {_subject(src, c)}")
    for role, ev in evidence(state, answer).items():
        lines.append(f"evidence at the {role} (step {ev['step']}, {ev['results']}):")
        lines += [f"    {ln}" for ln in ev["text"].splitlines()[:12]]
    build = sum(s.build_s for s in state.steps)
    run = sum(s.run_s for s in state.steps)
    lines.append(f"{len(state.steps)} runs: build {build:.0f} s, run {run:.0f} s, total {build + run:.0f} s")
    return lines


def table(state: State, answer: Answer, src: Path) -> str:
    body = rows(state)
    widths = [max(len(r[i]) for r in (list(HEADER), *body)) for i in range(len(HEADER))]
    text = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            for r in (list(HEADER), *body)]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(["", *text, "", *answer_lines(state, answer, src)])


def write_outputs(state: State, answer: Answer, src: Path, artifacts: Path) -> None:
    artifacts.mkdir(parents=True, exist_ok=True)
    told = counts_text(answer.counts, state.inputs.confirm) if answer.culprit else ""
    data = {"version": 1, "inputs": state.inputs.as_dict(),
            "steps": [dataclasses.asdict(s) for s in state.steps],
            "answer": {**dataclasses.asdict(answer),
                       "subject": _subject(src, answer.culprit) if answer.culprit else "",
                       "confirmation": told,
                       "evidence": evidence(state, answer)}}
    (artifacts / "bisect.json").write_text(json.dumps(data, indent=2) + "\n")
    md = ["## nested-xen bisect", "", f"**{answer.message}**", "",
          markdown_table(HEADER, rows(state)), "", "```", *answer_lines(state, answer, src), "```", ""]
    (artifacts / "bisect.md").write_text("\n".join(md))
