"""`nested-xen bisect SRC GOOD BAD -k EXPR`: the Xen commit that broke a check.

Like ``git bisect run``, on this harness: each step builds a commit of SRC (a Xen checkout
or bare repository) into ``<cache>/bisect/builds/<commit>-<key>`` (the key hashes the
commit, the Kconfig options and the configure flags, so a second bisect over the same
range builds nothing again), incrementally in one persistent detached worktree per source
(``git checkout --force`` then ``make dist``: make rebuilds what changed), boots it on the
``bookworm-own-dist`` recipe (``configs/bisect.yaml``, ``XEN_DIST``) in a fresh pytest
process and reads that run's results.json. harness/bisect_state.py maps the results to
good, bad or untestable (retested, then skipped), picks the next commit and confirms the
culprit (its parent passes and it fails ``--confirm`` more times each). Every finished
step is in ``<artifacts>/bisect-state.json`` at once: ``--resume`` goes on after Ctrl-C
or a lost machine; ``bisect.json`` and ``bisect.md`` hold the table and the answer.

``--force-fault REV`` resets a guest under each run of REV (harness/bisect_fault.py) with
an extra known-issue entry naming that reset an emulator fault: the verdict layer, not
the bisector, turns it into "passed after emulator fault", which is untestable here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from . import options
from .bisect_report import stage_line, table, write_outputs
from .bisect_state import (
    BISECT,
    RETEST,
    Action,
    Answer,
    BisectError,
    Graph,
    Inputs,
    State,
    Step,
    StepOutcome,
    classify,
    estimate,
    next_action,
    resume_state,
)
from .config import run_config_from_args as _config
from .known_issues import KNOWN_ISSUES, load_known_issues
from .ownbuild import (
    BuildError,
    build_xen,
    parse_kconfig,
    require,
    run_as_build_error,
    xen_build_missing,
    xen_configure_flags,
)

REPO = Path(__file__).resolve().parent.parent
BISECT_CONFIG = REPO / "configs" / "bisect.yaml"
STATE_FILE = "bisect-state.json"
# What ./configure reads: a change here between two commits configures the worktree again.
CONFIGURE_INPUTS = ("configure", "tools/configure", "config", "m4", "tools/configure.ac", "configure.ac",
                    "config.sub", "config.guess", "tools/config.h.in")


# ---------------------------------------------------------------------- the source tree


def git(src: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=src, capture_output=True, text=True)
    if out.returncode != 0:
        raise BisectError(f"`git {' '.join(args)}` in {src} failed: {out.stderr.strip()}")
    return out.stdout


def resolve(src: Path, rev: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=src,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BisectError(f"{src} has no revision {rev!r}: give a commit, tag or branch it has "
                          f"(`git -C {src} log --oneline` lists them; fetch it first if it is upstream's)")
    return out.stdout.strip()


def source_tree(src: Path) -> Path:
    if not src.exists():
        raise BisectError(f"{src} does not exist: give a Xen git checkout or bare repository")
    out = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=src, capture_output=True, text=True)
    if out.returncode != 0:
        raise BisectError(f"{src} is not a git tree (a Xen checkout or bare repository): `git clone "
                          "https://xenbits.xen.org/git-http/xen.git` makes one")
    return src.resolve()


def commit_graph(src: Path, good: str, bad: str, first_parent: bool) -> Graph:
    """good..bad on the ancestry path, oldest first (``git rev-list``), with parents."""
    if good == bad:
        raise BisectError("good and bad are the same commit: nothing to bisect")
    if subprocess.run(["git", "merge-base", "--is-ancestor", good, bad], cwd=src).returncode != 0:
        raise BisectError(f"good {good[:12]} is not an ancestor of bad {bad[:12]}: bisect walks from a good "
                          "commit forward to a bad one (swap them if the check was fixed, not broken)")
    args = ["rev-list", "--ancestry-path", "--parents", "--reverse", "--topo-order",
            *(["--first-parent"] if first_parent else []), f"{good}..{bad}"]
    lines = [ln.split() for ln in git(src, *args).splitlines() if ln.strip()]
    if not lines or lines[-1][0] != bad:
        raise BisectError(f"no first-parent line from {good[:12]} to {bad[:12]}: give --all-commits to "
                          "bisect over the full commit list")
    order = tuple(ln[0] for ln in lines)
    inside = set(order)
    parents = {ln[0]: tuple(p for p in (ln[1:2] if first_parent else ln[1:]) if p in inside) for ln in lines}
    return Graph(order, parents, {ln[0]: ln[1] for ln in lines if len(ln) > 1})


def subject(src: Path, commit: str) -> str:
    return git(src, "log", "-1", "--format=%s", commit).strip()


# ---------------------------------------------------------------------- builder and runner


@dataclass
class Build:
    dist: Path | None
    seconds: float
    cached: bool = False
    error: str = ""
    log: str = ""


@dataclass
class Run:
    results: Path
    returncode: int | None
    seconds: float
    note: str = ""  # the forced fault: injected or why not


class Builder(Protocol):
    def __call__(self, commit: str) -> Build: ...


class Runner(Protocol):
    def __call__(self, commit: str, dist: Path, out: Path, forced: bool) -> Run: ...


class XenBuilder:
    """Builds commits of one source in one persistent worktree; caches each dist tree."""

    def __init__(self, src: Path, cache: Path, jobs: int, kconfig: tuple[str, ...]) -> None:
        self.src, self.jobs, self.kconfig = src, jobs, kconfig
        self.root = cache / "bisect"
        self.tree = self.root / "work" / f"{src.name}-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}"

    def key(self, commit: str) -> str:
        text = "\0".join([commit, *self.kconfig, *xen_configure_flags()])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def home(self, commit: str) -> Path:
        return self.root / "builds" / f"{commit[:12]}-{self.key(commit)}"

    def cached(self, commit: str) -> Path | None:
        marker = self.home(commit) / "dist.path"
        if marker.is_file() and (self.home(commit) / marker.read_text().strip()).is_dir():
            return self.home(commit) / marker.read_text().strip()
        return None

    def __call__(self, commit: str) -> Build:
        started = time.monotonic()
        dist = self.cached(commit)
        if dist is not None:
            return Build(dist, 0.0, cached=True)
        try:
            configure = self._checkout(commit)
            home = self.home(commit)
            dist = build_xen(self.tree, home, self.jobs, configure=configure,
                             kconfig=parse_kconfig(list(self.kconfig)))
            (self.tree / ".nx-bisect-configured").write_text(commit + "\n")
            (home / "dist.path").write_text(f"{dist.relative_to(home)}\n")
        except (BuildError, BisectError) as exc:
            found = re.search(r"whole log: (\S+)", str(exc))
            return Build(None, round(time.monotonic() - started, 1), error=str(exc).splitlines()[0][:300],
                         log=found.group(1) if found else "")
        return Build(dist, round(time.monotonic() - started, 1))

    def _checkout(self, commit: str) -> bool:
        """The worktree at ``commit`` (made once); whether ./configure must run again."""
        if not (self.tree / ".git").exists():
            subprocess.run(["rm", "-rf", str(self.tree)], check=False)  # a half-made one
            self.tree.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "worktree", "prune"], cwd=self.src, capture_output=True)
            git(self.src, "worktree", "add", "--detach", "--force", str(self.tree), commit)
        git(self.tree, "checkout", "--force", "--detach", commit)
        subprocess.run(["rm", "-rf", str(self.tree / "dist")], check=False)  # no stale install from before
        marker = self.tree / ".nx-bisect-configured"
        if not marker.is_file() or not (self.tree / "config.status").is_file():
            return True
        last = marker.read_text().strip()
        return subprocess.run(["git", "diff", "--quiet", last, commit, "--", *CONFIGURE_INPUTS],
                              cwd=self.tree).returncode != 0


class PytestRunner:
    """One fresh pytest process per step (its own L1 boot), on the selection."""

    def __init__(self, config: Path, keyword: str, nodeids: tuple[str, ...], known_issues: Path,
                 extra: list[str]) -> None:
        self.config, self.keyword, self.nodeids = config, keyword, nodeids
        self.known_issues, self.extra = known_issues, extra

    def command(self, out: Path, known: Path, forced: bool) -> list[str]:
        return [sys.executable, "-m", "pytest", *(self.nodeids or ("plugins",)), "-v", "-rA",
                "-p", "no:cacheprovider", *(["-k", self.keyword] if self.keyword else []),
                *(["-p", "harness.bisect_fault"] if forced else []), "--nx-config", str(self.config),
                "--known-issues", str(known), "--artifacts-dir", str(out), *self.extra]

    def collect(self, out: Path) -> list[str]:
        """The node ids the selection collects (no host is booted); BisectError if none."""
        cmd = [a for a in self.command(out, self.known_issues, False) if a != "-v"] + ["--collect-only", "-q"]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "XEN_DIST": os.environ.get("XEN_DIST", "/nonexistent")})
        ids = [ln for ln in out.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
        if out.returncode == 5 or (out.returncode == 0 and not ids):
            raise BisectError(f"the selection collects no check ({' '.join(cmd[3:])}): "
                              "fix -k or the node ids")
        if out.returncode != 0:
            tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
            raise BisectError(f"collecting the selection failed (exit {out.returncode}):\n{tail}")
        return ids

    def __call__(self, commit: str, dist: Path, out: Path, forced: bool) -> Run:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").unlink(missing_ok=True)
        env = {**os.environ, "XEN_DIST": str(dist)}
        known = self.known_issues
        if forced:
            known = forced_known_issues(self.known_issues, out / "known-issues-forced.yaml")
            env["NX_BISECT_FAULT_REPORT"] = str(out / "forced-fault.json")
        started = time.monotonic()
        with open(out / "pytest.log", "w") as log:
            rc = wait_for(subprocess.Popen(self.command(out, known, forced), cwd=REPO, env=env, stdout=log,
                                           stderr=subprocess.STDOUT))
        return Run(out / "results.json", rc, round(time.monotonic() - started, 1),
                   fault_note(out / "forced-fault.json") if forced else "")


def wait_for(proc: subprocess.Popen, teardown_s: float = 300.0) -> int:
    """The step's pytest exit status. On Ctrl-C (which pytest got too) it is let tear its
    hosts down; a pytest still running after ``teardown_s`` is sent SIGTERM (its own
    KeyboardInterrupt), then killed: no QEMU is left behind."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        for stop, wait in ((None, teardown_s), (proc.terminate, 120.0), (proc.kill, 30.0)):
            if stop is not None:
                stop()
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise


def forced_known_issues(base: Path, dest: Path) -> Path:
    """``base``'s entries and the forced fault's (harness/bisect_fault.ENTRY), checked by the loader."""
    from .bisect_fault import ENTRY

    entries = (yaml.safe_load(base.read_text()) or []) if base.is_file() else []
    dest.write_text(f"# {base} + the entry of `nested-xen bisect --force-fault`\n"
                    + yaml.safe_dump([*entries, ENTRY], sort_keys=False))
    load_known_issues(dest)
    return dest


def fault_note(report: Path) -> str:
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return "forced fault: the run left no report of it"
    if data.get("injected"):
        return f"forced fault: {data.get('guest')} reset under {data.get('nodeid')}"
    return f"forced fault NOT injected: {data.get('why', '?')}"


# ---------------------------------------------------------------------- the loop


def run_step(action: Action, n: int, src: Path, inputs: Inputs, builder: Builder, runner: Runner,
             artifacts: Path) -> Step:
    forced = action.commit in inputs.force_fault
    step = Step(n, action.phase, action.commit, subject(src, action.commit), "untestable", "",
                forced_fault=forced)
    build = builder(action.commit)
    step.build_s, step.build_cached, step.build_log = build.seconds, build.cached, build.log
    if build.dist is None:
        step.reason = f"build failed: {build.error}" + (f" (log: {build.log})" if build.log else "")
        return step
    out = artifacts / "bisect" / f"step-{n:02d}-{action.commit[:12]}"
    run = runner(action.commit, build.dist, out, forced)
    step.run_s, step.results = run.seconds, str(run.results)
    found: StepOutcome = classify(run.results, run.returncode)
    step.outcome, step.evidence = found.outcome, found.evidence
    step.reason = f"{run.note}; {found.reason}" if run.note else found.reason
    return step


def bisect(src: Path, inputs: Inputs, graph: Graph, builder: Builder, runner: Runner, artifacts: Path,
           resume: bool = False, say=None) -> tuple[State, Answer]:
    """Step until the answer; every finished step saved at once (a KeyboardInterrupt loses
    only the step under way)."""
    say = say or _say
    path = artifacts / STATE_FILE
    state = resume_state(path, inputs, resume)
    if resume:
        say(f"[bisect] resuming {path}: {len(state.steps)} finished step(s) kept")
    else:
        state.save(path)
    say(f"[bisect] {len(graph.order)} commit(s) from {inputs.good[:12]} (good) to {inputs.bad[:12]} (bad)")
    while True:
        action = next_action(graph, inputs, state.steps)
        if isinstance(action, Answer):
            return state, action
        total = estimate(graph, inputs, state.steps) if action.phase in (BISECT, RETEST) else 0
        say(f"[bisect] step {len(state.steps) + 1} ({action.phase}) {action.commit[:12]}: "
            "building and running")
        step = run_step(action, len(state.steps) + 1, src, inputs, builder, runner, artifacts)
        state.steps.append(step)
        state.save(path)
        say(stage_line(step, total, inputs.confirm))


def _say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------- the command


def inputs_from_args(args: argparse.Namespace, src: Path) -> Inputs:
    nodeids = tuple(args.nodeids)
    if not args.keyword and not nodeids:
        raise BisectError("give the checks to bisect on: -k EXPR (pytest's keyword expression) and/or "
                          "node ids (plugins/FILE.py::test_name)")
    if args.confirm < 1 or args.retries < 0:
        raise BisectError("--confirm must be >= 1 and --retries >= 0")
    try:
        parse_kconfig(args.kconfig)
    except BuildError as exc:
        raise BisectError(str(exc)) from None
    return Inputs(src=str(src), good=resolve(src, args.good), bad=resolve(src, args.bad),
                  keyword=args.keyword or "",
                  nodeids=nodeids, kconfig=tuple(args.kconfig), first_parent=not args.all_commits,
                  confirm=args.confirm, retries=args.retries,
                  force_fault=tuple(resolve(src, r) for r in args.force_fault),
                  config=str(Path(args.bisect_config).resolve()))


def cmd_bisect(args: argparse.Namespace) -> int:
    return run_as_build_error(_cmd_bisect, args, BisectError)


def _cmd_bisect(args: argparse.Namespace) -> int:
    src = source_tree(Path(args.src))
    inputs = inputs_from_args(args, src)
    graph = commit_graph(src, inputs.good, inputs.bad, inputs.first_parent)
    known = {*graph.order, *graph.first_parent.values()}
    stray = [r[:12] for r in inputs.force_fault if r not in known]
    if stray:
        raise BisectError(f"--force-fault {', '.join(stray)}: not a commit of "
                          f"{inputs.good[:12]}..{inputs.bad[:12]} (nor a parent of one)")
    cfg = _config(args)
    artifacts, cache = cfg.artifacts_dir.resolve(), cfg.resolved_cache_dir()
    require("a Xen build", xen_build_missing())
    cache_arg = options.pytest_args(lambda name: getattr(args, name, None), ("cache_dir",))
    runner = PytestRunner(Path(inputs.config), inputs.keyword, inputs.nodeids, Path(args.known_issues),
                          [*cache_arg, *args.pytest_args])
    print(f"[bisect] the selection: {len(runner.collect(artifacts / 'bisect' / 'collect'))} check(s)",
          flush=True)
    builder = XenBuilder(src, cache, args.jobs, inputs.kconfig)
    try:
        state, answer = bisect(src, inputs, graph, builder, runner, artifacts, resume=args.resume)
    except KeyboardInterrupt:
        print(f"\n[bisect] interrupted: the finished steps are in {artifacts / STATE_FILE}; "
              "continue with the same command and --resume", file=sys.stderr)
        return 130
    print(table(state, answer, src))
    write_outputs(state, answer, src, artifacts)
    print(f"[bisect] {answer.message}\n[bisect] {artifacts / 'bisect.md'}, {artifacts / 'bisect.json'}")
    return 0 if answer.status == "complete" else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bisect", help="find the Xen commit that broke a check: build, boot and run each "
                       "step; confirm the culprit")
    p.add_argument("src", metavar="SRC", help="a Xen git checkout or bare repository")
    p.add_argument("good", metavar="GOOD", help="a revision where the checks pass")
    p.add_argument("bad", metavar="BAD", help="a later revision where they fail")
    p.add_argument("nodeids", nargs="*", metavar="NODEID", help="checks to run (plugins/FILE.py::test_name)")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression selecting the checks")
    p.add_argument("--confirm", type=int, default=2, metavar="N",
                   help="fresh runs in which the parent must pass and the culprit fail (default 2)")
    p.add_argument("--retries", type=int, default=1, metavar="N",
                   help="runs again of an untestable commit before it is skipped (default 1)")
    p.add_argument("--all-commits", action="store_true",
                   help="bisect over every commit of the ancestry path, not the first-parent line")
    p.add_argument("--kconfig", action="append", default=[], metavar="CONFIG_X=y",
                   help="hypervisor Kconfig option for every build (repeatable), e.g. CONFIG_SHADOW_PAGING=y")
    p.add_argument("--force-fault", action="append", default=[], metavar="REV",
                   help="reset a guest under every run of REV, a known emulator fault (repeatable): a demo "
                        "that a fault never yields a wrong commit")
    p.add_argument("--resume", action="store_true", help="continue the bisect in <artifacts>/" + STATE_FILE)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--bisect-config", default=str(BISECT_CONFIG), metavar="YAML",
                   help="the run config of each step (default configs/bisect.yaml)")
    p.add_argument("--known-issues", default=str(KNOWN_ISSUES), metavar="YAML")
    p.add_argument("--pytest-arg", dest="pytest_args", action="append", default=[], metavar="ARG",
                   help="passed on to pytest (repeatable), e.g. --pytest-arg=--accel=tcg")
    options.add_arguments(p, ("artifacts_dir", "cache_dir"))
    p.set_defaults(func=cmd_bisect)
