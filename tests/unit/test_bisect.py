"""harness/bisect*.py: step outcomes from results.json, the walk over a real git history
with a fake builder and runner (the real ones build Xen and boot it), skips, confirmation,
resume, the forced fault's known-issue entry through the real judge."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest

from harness import bisect as bisect_mod
from harness import bisect_fault
from harness.bisect import Build, PytestRunner, Run, commit_graph, forced_known_issues, resolve
from harness.bisect_report import stage_line, table, write_outputs
from harness.bisect_state import (
    BAD,
    COMPLETE,
    CONFIRM_CULPRIT,
    CONFIRM_PARENT,
    GOOD,
    INCONCLUSIVE,
    RETEST,
    UNTESTABLE,
    BisectError,
    Inputs,
    SelectionError,
    State,
    classify,
)
from harness.judge import PASSED_AFTER_FAULT, RERUN, Death, Evidence, judge
from harness.known_issues import KNOWN_ISSUES, load_known_issues

CHECK = "plugins/migration.py::test_save_restore[img=bookworm-own-dist-guest=pv]"


def result(outcome: str, **extra) -> dict:
    return {"nodeid": CHECK, "check": "test_save_restore", "outcome": outcome,
            "reason": extra.pop("reason", ""), "verdict": "", "incidents": [], **extra}


FAULT = {"subject": "guest", "phase": "during-check", "signature": "guest-death [any guest] /x/",
         "action": "rerun"}
SAMPLES = {
    "passed": [result("passed")],
    "failed": [result("failed", reason="AssertionError: page 12 differs")],
    "passed-after-fault": [result("passed-after-fault", verdict=PASSED_AFTER_FAULT, incidents=[FAULT])],
    "failed-after-fault": [result("failed", incidents=[FAULT], reason="same emulator fault twice")],
    "passed-with-emulator-incident": [result("passed", incidents=[FAULT])],
    "xfailed": [result("xfailed", reason="known issue")],
    "xpassed": [result("xpassed")],
    "passed+skipped": [result("passed"), result("skipped", reason="hvm is not in guest_types")],
    "failed+skipped": [result("failed", reason="boom"), result("skipped", reason="hvm")],
    "error+skipped": [result("error", reason="boot"), result("skipped", reason="hvm")],
    "error": [result("error", reason="boot failed")],
    "passed+failed": [result("passed"), result("failed", reason="boom")],
    "failed+passed-after-fault": [
        result("failed", reason="boom"),
        result("passed-after-fault", verdict=PASSED_AFTER_FAULT, incidents=[FAULT])],
    "passed+error": [result("passed"), result("error", reason="setup")],
}
EXPECTED = {"passed": GOOD, "failed": BAD, "passed-after-fault": UNTESTABLE, "failed-after-fault": UNTESTABLE,
            "passed-with-emulator-incident": UNTESTABLE, "xfailed": UNTESTABLE, "xpassed": UNTESTABLE,
            "passed+skipped": GOOD, "failed+skipped": BAD, "error+skipped": UNTESTABLE,
            "error": UNTESTABLE, "passed+failed": BAD,
            "failed+passed-after-fault": BAD, "passed+error": UNTESTABLE}


def write_results(path: Path, checks: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "results": checks, "incidents": []}))
    return path


@pytest.mark.parametrize("name", list(SAMPLES))
def test_step_outcome_is_read_from_results_json(tmp_path, name):
    found = classify(write_results(tmp_path / "results.json", SAMPLES[name]), returncode=0)
    assert found.outcome == EXPECTED[name], found
    if found.outcome == BAD:
        assert "failed" in found.reason and found.evidence


def test_a_pytest_exit_status_alone_decides_nothing(tmp_path):
    # exit 0 without results.json is not a pass; exit 1 with a passing results.json is not a failure
    assert classify(tmp_path / "results.json", returncode=0).outcome == UNTESTABLE
    assert classify(write_results(tmp_path / "r.json", SAMPLES["passed"]), returncode=1).outcome == GOOD


def test_a_selection_that_ran_no_check_is_the_users_to_fix(tmp_path):
    with pytest.raises(SelectionError, match="no check"):
        classify(tmp_path / "results.json", returncode=5)
    with pytest.raises(SelectionError, match="no check ran"):
        classify(write_results(tmp_path / "r.json", []), returncode=0)
    with pytest.raises(SelectionError, match="every selected check skipped .no device model.; no check ran"):
        classify(write_results(tmp_path / "s.json", [result("skipped", reason="no device model")]),
                 returncode=0)


# ---------------------------------------------------------------------- a real git history


def make_repo(path: Path, n: int) -> list[str]:
    """A linear history: a base commit then ``n`` commits; their ids, oldest first."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=path,
                              check=True, capture_output=True, text=True).stdout.strip()

    path.mkdir()
    git("init", "-q")
    ids = []
    for i in range(n + 1):
        git("commit", "-q", "--allow-empty", "-m", f"commit {i}")
        ids.append(git("rev-parse", "HEAD"))
    return ids


class FakeBuilder:
    def __init__(self, broken=()):
        self.broken, self.calls = set(broken), []

    def __call__(self, commit):
        self.calls.append(commit)
        if commit in self.broken:
            return Build(None, 3.0, error="`make dist` failed (exit 2)", log="/cache/x.log")
        return Build(Path(f"/dist/{commit[:8]}"), 5.0)


class FakeRunner:
    """``behaviour(commit, nth run of it) -> SAMPLES key``; writes that results.json."""

    def __init__(self, behaviour, interrupt_at=None):
        self.behaviour, self.calls, self.interrupt_at = behaviour, [], interrupt_at

    def __call__(self, commit, dist, out, forced):
        if self.interrupt_at is not None and len(self.calls) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        nth = sum(1 for c, _ in self.calls if c == commit)
        self.calls.append((commit, forced))
        name = self.behaviour(commit, nth, forced)
        return Run(write_results(out / "results.json", SAMPLES[name]), 0, 10.0,
                   "forced fault: g reset under x" if forced else "")


def regression_at(ids, culprit):
    index = {c: i for i, c in enumerate(ids)}
    return lambda commit, nth, forced: "failed" if index[commit] >= culprit else "passed"


def run(tmp_path, ids, behaviour, builder=None, resume=False, art="art", **inputs):
    src = tmp_path / "src"
    inp = Inputs(src=str(src), good=ids[0], bad=ids[-1], keyword="save_restore", **inputs)
    graph = commit_graph(src, inp.good, inp.bad, inp.first_parent)
    runner = behaviour if isinstance(behaviour, FakeRunner) else FakeRunner(behaviour)
    lines = []
    state, answer = bisect_mod.bisect(src, inp, graph, builder or FakeBuilder(), runner, tmp_path / art,
                                      resume=resume, say=lines.append)
    return state, answer, runner, lines


def test_the_culprit_of_a_linear_history_is_found_and_confirmed(tmp_path):
    ids = make_repo(tmp_path / "src", 30)
    state, answer, runner, lines = run(tmp_path, ids, regression_at(ids, 17))
    assert (answer.status, answer.culprit, answer.parent) == (COMPLETE, ids[17], ids[16])
    bisect_steps = [s for s in state.steps if s.phase == "bisect"]
    assert len(bisect_steps) <= 5  # log2(30)
    assert [s.phase for s in state.steps[-4:]] == [CONFIRM_PARENT, CONFIRM_CULPRIT] * 2
    assert answer.counts == {"parent": {GOOD: 2, BAD: 0, UNTESTABLE: 0},
                             "culprit": {GOOD: 0, BAD: 2, UNTESTABLE: 0}}
    assert "parent 2/2 pass, culprit 2/2 fail" in answer.message
    assert any(ln.startswith("[bisect] step 1/~5 ") and "-> " in ln for ln in lines), lines
    saved = json.loads((tmp_path / "art" / "bisect-state.json").read_text())
    assert len(saved["steps"]) == len(state.steps)


def test_the_first_and_the_last_commit_can_be_the_culprit(tmp_path):
    ids = make_repo(tmp_path / "src", 6)
    _, answer, _, _ = run(tmp_path, ids, regression_at(ids, 1))
    assert (answer.status, answer.culprit, answer.parent) == (COMPLETE, ids[1], ids[0])  # parent: GOOD itself
    _, answer, _, _ = run(tmp_path, ids, regression_at(ids, 6), art="b")
    assert answer.culprit == ids[6]


def test_an_untestable_commit_is_retested_then_skipped_and_stepped_around(tmp_path):
    ids = make_repo(tmp_path / "src", 16)
    mid = ids[8]
    base = regression_at(ids, 12)
    state, answer, runner, _ = run(tmp_path, ids,
                                   lambda c, nth, f: "passed-after-fault" if c == mid else base(c, nth, f))
    assert (answer.status, answer.culprit) == (COMPLETE, ids[12])
    mid_steps = [s for s in state.steps if s.commit == mid]
    assert [s.phase for s in mid_steps] == ["bisect", RETEST]
    assert all(s.outcome == UNTESTABLE for s in mid_steps)
    assert state.steps[2].commit in (ids[7], ids[9])  # the nearest untested commit to the midpoint


def test_a_build_failure_is_a_skip_with_its_log(tmp_path):
    ids = make_repo(tmp_path / "src", 8)
    state, answer, _, _ = run(tmp_path, ids, regression_at(ids, 6), builder=FakeBuilder(broken=[ids[4]]))
    failed = [s for s in state.steps if s.commit == ids[4]]
    assert len(failed) == 2 and "build failed" in failed[0].reason and "/cache/x.log" in failed[0].reason
    assert answer.culprit == ids[6] and answer.status == COMPLETE


@pytest.mark.parametrize("untestable", [11, 12])  # the culprit's parent, or the culprit itself
def test_an_untestable_neighbour_of_the_culprit_is_inconclusive_never_a_wrong_commit(tmp_path, untestable):
    ids = make_repo(tmp_path / "src", 16)
    base = regression_at(ids, 12)
    never = ids[untestable]
    state, answer, _, _ = run(tmp_path, ids, lambda c, n, f: "error" if c == never else base(c, n, f))
    assert answer.status == INCONCLUSIVE and not answer.culprit
    # the parent untestable: 11 or 12; the culprit untestable: 12 or its bad child 13
    assert set(answer.candidates) == ({ids[11], ids[12]} if untestable == 11 else {ids[12], ids[13]})
    assert answer.candidates == sorted(answer.candidates, key=ids.index)
    assert "the first bad commit is one of" in answer.message


def test_a_forced_fault_beside_the_culprit_gives_inconclusive(tmp_path):
    """The runner's forced fault yields what the verdict layer reports (passed after fault)."""
    ids = make_repo(tmp_path / "src", 16)
    base = regression_at(ids, 12)
    forced = lambda c, n, f: "passed-after-fault" if f else base(c, n, f)  # noqa: E731
    state, answer, runner, lines = run(tmp_path, ids, forced, force_fault=(ids[11],))
    assert answer.status == INCONCLUSIVE and set(answer.candidates) == {ids[11], ids[12]}
    assert {c for c, f in runner.calls if f} == {ids[11]}
    assert any("untestable (forced fault)" in ln for ln in lines)
    assert "forced fault" in table(state, answer, tmp_path / "src")


def test_confirmation_that_does_not_reproduce_is_inconclusive_with_counts(tmp_path):
    ids = make_repo(tmp_path / "src", 8)
    base = regression_at(ids, 5)
    # the culprit fails in its bisect step and its first confirmation, then passes
    flaky = lambda c, n, f: "passed" if c == ids[5] and n >= 2 else base(c, n, f)  # noqa: E731
    _, answer, _, _ = run(tmp_path, ids, flaky)
    assert answer.status == INCONCLUSIVE and answer.culprit == ids[5]
    assert "the culprit passed in a confirmation run" in answer.message
    assert "parent 2/2 pass, culprit 1/2 fail, culprit 1 pass" in answer.message


def test_an_untestable_confirmation_run_is_retried_then_counted(tmp_path):
    ids = make_repo(tmp_path / "src", 4)
    base = regression_at(ids, 2)
    # the parent's confirmation runs: untestable, untestable, ... -> too often
    bad_parent = lambda c, n, f: "error" if c == ids[1] and n >= 1 else base(c, n, f)  # noqa: E731
    state, answer, _, _ = run(tmp_path, ids, bad_parent)
    assert answer.status == INCONCLUSIVE and "untestable too often" in answer.message
    assert "untestable" in answer.message and answer.counts["parent"][UNTESTABLE] == 2
    one = lambda c, n, f: "error" if c == ids[1] and n == 1 else base(c, n, f)  # noqa: E731
    _, answer, _, _ = run(tmp_path, ids, one, art="b")
    assert answer.status == COMPLETE and "1 untestable" in answer.message


def test_resume_after_an_interrupt_reruns_no_finished_step(tmp_path):
    ids = make_repo(tmp_path / "src", 30)
    behaviour = regression_at(ids, 17)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, ids, FakeRunner(behaviour, interrupt_at=4))
    kept = State.load(tmp_path / "art" / "bisect-state.json").steps
    assert len(kept) == 3
    state, answer, runner, lines = run(tmp_path, ids, FakeRunner(behaviour), resume=True)
    assert answer.culprit == ids[17] and answer.status == COMPLETE
    assert [s.commit for s in state.steps[:3]] == [s.commit for s in kept]
    assert len(runner.calls) == len(state.steps) - 3  # nothing finished ran again
    assert runner.calls[0][0] not in {s.commit for s in kept}
    assert "3 finished step(s) kept" in lines[0]


def test_resume_refuses_other_inputs_and_a_fresh_start_refuses_an_old_state(tmp_path):
    ids = make_repo(tmp_path / "src", 8)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, ids, FakeRunner(regression_at(ids, 5), interrupt_at=2))
    with pytest.raises(BisectError, match=r"other inputs \(nodeids: \(\) \(state\) vs \('x',\)"):
        run(tmp_path, ids, regression_at(ids, 5), resume=True, confirm=2, nodeids=("x",))
    with pytest.raises(BisectError, match="--resume"):
        run(tmp_path, ids, regression_at(ids, 5))


def test_outputs_hold_the_steps_answer_and_evidence(tmp_path):
    ids = make_repo(tmp_path / "src", 8)
    state, answer, _, _ = run(tmp_path, ids, regression_at(ids, 5))
    write_outputs(state, answer, tmp_path / "src", tmp_path / "art")
    data = json.loads((tmp_path / "art" / "bisect.json").read_text())
    assert data["answer"]["culprit"] == ids[5] and data["answer"]["subject"] == "commit 5"
    assert "page 12 differs" in data["answer"]["evidence"]["culprit"]["text"]
    assert data["answer"]["evidence"]["parent"]["results"].endswith("results.json")
    md = (tmp_path / "art" / "bisect.md").read_text()
    assert "| # | phase | commit |" in md and "culprit: " + ids[5] in md
    first = state.steps[0]
    assert stage_line(first, 3, 2).startswith(f"[bisect] step 1/~3 {first.commit[:12]} commit ")


# ---------------------------------------------------------------------- inputs


def test_inputs_are_validated_with_clear_errors(tmp_path):
    ids = make_repo(tmp_path / "src", 3)
    src = tmp_path / "src"
    (tmp_path / "plain").mkdir()
    with pytest.raises(BisectError, match="not a git tree"):
        bisect_mod.source_tree(tmp_path / "plain")
    with pytest.raises(BisectError, match="no revision 'nope'"):
        resolve(src, "nope")
    with pytest.raises(BisectError, match="not an ancestor"):
        commit_graph(src, ids[3], ids[1], True)
    args = argparse.Namespace(good=ids[0], bad=ids[3], keyword=None, nodeids=[], kconfig=[],
                              all_commits=False, confirm=2, retries=1, force_fault=[],
                              bisect_config="configs/bisect.yaml")
    with pytest.raises(BisectError, match="give the checks"):
        bisect_mod.inputs_from_args(args, src)
    args.keyword, args.kconfig = "save_restore", ["SHADOW=y"]
    with pytest.raises(BisectError, match="CONFIG_NAME=VALUE"):
        bisect_mod.inputs_from_args(args, src)


def test_a_merge_is_one_step_on_the_first_parent_line_and_its_commits_with_all_commits(tmp_path):
    src = tmp_path / "src"
    ids = make_repo(src, 2)

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=src,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("checkout", "-q", "-b", "side", ids[1])
    git("commit", "-q", "--allow-empty", "-m", "side 1")
    side = git("rev-parse", "HEAD")
    git("checkout", "-q", "-")
    git("merge", "-q", "--no-ff", "-m", "merge side", "side")
    merge = git("rev-parse", "HEAD")
    line = commit_graph(src, ids[0], merge, True)
    assert line.order == (ids[1], ids[2], merge)
    full = commit_graph(src, ids[0], merge, False)
    assert set(full.order) == {ids[1], ids[2], side, merge} and set(full.parents[merge]) == {ids[2], side}


# ---------------------------------------------------------------------- the forced fault


def test_the_forced_fault_entry_is_merged_and_the_real_judge_reruns_then_passes_after_fault(tmp_path):
    merged = forced_known_issues(KNOWN_ISSUES, tmp_path / "known.yaml")
    issues = load_known_issues(merged)
    assert len(issues) == len(load_known_issues(KNOWN_ISSUES)) + 1
    facts = argparse.Namespace(xen_version="4.22.0", kernel_release="6.1.0", dom0_mode="pv", accel="tcg",
                               qemu_version="7.2.0", device_model_version="")
    death = Death("guest", "nx-pv", {"console": "[  12.3] sysrq: Resetting\n"}, guest_type="pv",
                  detail="gone")
    first = judge(Evidence(CHECK, "pv", "passed", death=death), facts, issues)
    assert first.kind == RERUN and bisect_fault.SIGNATURE in first.fault
    second = judge(Evidence(CHECK, "pv", "passed", attempt=2, first_fault=first.fault), facts, issues)
    assert second.kind == PASSED_AFTER_FAULT
    # the repository's file alone does not call that reset an emulator fault: control
    assert judge(Evidence(CHECK, "pv", "passed", death=death), facts,
                 load_known_issues(KNOWN_ISSUES)).kind != RERUN


class FakeXl:
    def __init__(self):
        self.commands, self.polls = [], 0
        self.remote = self

    def run_expect(self, cmd, timeout):
        self.commands.append(cmd)

    def domain(self, name):
        self.polls += 1
        return None if self.polls > 1 else argparse.Namespace(crashed=False)


def test_the_fault_plugin_resets_the_guest_once_and_reports_it(tmp_path, monkeypatch):
    import harness.verdict

    xl = FakeXl()
    guest = argparse.Namespace(name="nx-pv", xl=xl, domid=3)
    monkeypatch.setattr(harness.verdict, "guests_of", lambda item: [guest])
    monkeypatch.setattr(bisect_fault.time, "sleep", lambda s: None)
    monkeypatch.setenv(bisect_fault.REPORT_ENV, str(tmp_path / "fault.json"))
    bisect_fault.pytest_configure(None)
    assert json.loads((tmp_path / "fault.json").read_text())["injected"] is False
    item = argparse.Namespace(nodeid=CHECK)
    for _ in range(2):  # the check and its rerun: one reset
        hook = bisect_fault.pytest_runtest_call(item)
        next(hook)
        with pytest.raises(StopIteration):
            hook.send(None)
    assert xl.commands == ["xl sysrq nx-pv b"]
    report = json.loads((tmp_path / "fault.json").read_text())
    assert report["injected"] is True and report["guest"] == "nx-pv"
    assert bisect_mod.fault_note(tmp_path / "fault.json").startswith("forced fault: nx-pv reset under")


def test_only_a_forced_step_loads_the_plugin_and_the_merged_known_issues(tmp_path, monkeypatch):
    seen = []

    class Proc:
        def __init__(self, cmd, **kw):
            seen.append((cmd, kw["env"]))

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(bisect_mod.subprocess, "Popen", Proc)
    runner = PytestRunner(Path("configs/bisect.yaml"), "save_restore", (), KNOWN_ISSUES, [])
    runner("a" * 40, Path("/dist"), tmp_path / "plain", forced=False)
    found = runner("a" * 40, Path("/dist"), tmp_path / "forced", forced=True)
    plain, forced = seen
    assert "harness.bisect_fault" not in plain[0] and str(KNOWN_ISSUES) in plain[0]
    assert plain[1]["XEN_DIST"] == "/dist" and "-k" in plain[0]
    at = forced[0].index("harness.bisect_fault")
    assert forced[0][at - 1] == "-p"
    assert str(tmp_path / "forced" / "known-issues-forced.yaml") in forced[0]
    assert forced[1][bisect_fault.REPORT_ENV] == str(tmp_path / "forced" / "forced-fault.json")
    assert found.note.startswith("forced fault: the run left no report")


def test_the_parser_takes_the_documented_command():
    parser = argparse.ArgumentParser()
    bisect_mod.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bisect", "/src", "RELEASE-4.22.0", "HEAD", "-k", "save_restore and pv",
                              "--force-fault", "HEAD~3", "--confirm", "3", "--resume"])
    assert (args.good, args.keyword, args.force_fault, args.confirm, args.resume) == (
        "RELEASE-4.22.0", "save_restore and pv", ["HEAD~3"], 3, True)


class Interrupted:
    """A pytest process under Ctrl-C: the first wait is interrupted; it ends after ``ends_on``."""

    def __init__(self, ends_on):
        self.ends_on, self.calls = ends_on, []

    def wait(self, timeout=None):
        self.calls.append(("wait", timeout))
        if timeout is None:
            raise KeyboardInterrupt
        if self.calls[-2:-1] and self.calls[-2][0] == self.ends_on or self.ends_on == "teardown":
            return -2
        raise subprocess.TimeoutExpired("pytest", timeout)

    def terminate(self):
        self.calls.append(("terminate", None))

    def kill(self):
        self.calls.append(("kill", None))


@pytest.mark.parametrize("ends_on, stops", [("teardown", []), ("terminate", ["terminate"]),
                                            ("kill", ["terminate", "kill"])])
def test_ctrl_c_lets_the_steps_pytest_tear_down_before_it_is_stopped(ends_on, stops):
    proc = Interrupted(ends_on)
    with pytest.raises(KeyboardInterrupt):
        bisect_mod.wait_for(proc, teardown_s=5)
    assert [c for c, _ in proc.calls if c != "wait"] == stops
    assert proc.calls[1] == ("wait", 5)  # pytest got the Ctrl-C too: its teardown is waited for first
