"""`nested-xen mutant list|run`: broken Xen builds that the checks must turn red.

A mutant is a small patch under ``mutants/`` against a Xen release tag: a plausible
regression in log-dirty tracking, the save/restore stream or the foreign-mapping path.
Its header, ``# Key: value`` lines before the diff (``git apply`` ignores them), says

- ``Mutant:`` its name (the file's stem), ``Base:`` the tag it applies to;
- ``Breaks:`` one sentence on what it breaks;
- ``Checks:`` the pytest ``-k`` expression of the checks that must turn red;
- ``Kconfig:`` hypervisor options for ``build-xen --kconfig`` (space-separated), optional;
- ``Workload:`` the migration workload it needs (``dirty:P``), optional;
- ``Expect:`` what should happen, free text (continued on ``#   `` lines), optional.

``run`` checks the patch out on a worktree of SRC at ``Base``, applies it, builds it with
``build-xen`` into ``<cache>/mutants/<name>-<key>`` (the key hashes the patch, its kconfig
and the base commit, so an unchanged mutant is not built again), runs pytest on its checks
with ``configs/mutants.yaml`` (its workload put in) against that dist tree, and reads the
run's results.json. A mutant is CAUGHT only when one of those checks is a plain ``failed``:
an error, an expected failure, a pass after an emulator fault or a skip is not a catch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import options
from .config import ConfigError, load_run_config
from .config import run_config_from_args as _config
from .ownbuild import BuildError, build_xen, parse_kconfig, run_as_build_error

REPO = Path(__file__).resolve().parent.parent
MUTANTS_DIR = REPO / "mutants"
MUTANT_CONFIG = REPO / "configs" / "mutants.yaml"
REQUIRED = ("mutant", "base", "breaks", "checks")
KEYS = (*REQUIRED, "kconfig", "workload", "expect")
CAUGHT_OUTCOMES = ("failed",)  # nothing else is a catch: not error, xfailed, passed-after-fault, skipped
_HEADER_LINE = re.compile(r"^#\s?([A-Za-z]+):\s*(.*)$")


class MutantError(RuntimeError):
    """A mutant cannot be read, applied, built or run; the message says what to do."""


@dataclass(frozen=True)
class Mutant:
    name: str
    base: str
    breaks: str
    checks: str
    path: Path
    kconfig: tuple[str, ...] = ()
    workload: str | None = None
    expect: str = ""

    def key(self, base_commit: str) -> str:
        """The build's cache key: the patch's bytes, its kconfig and the base commit."""
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update(("\0".join([base_commit, *self.kconfig])).encode())
        return digest.hexdigest()[:16]


def parse_header(text: str, path: Path) -> Mutant:
    """The mutant of a patch's text: its ``# Key: value`` header lines before the diff."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line.startswith(("diff --git", "--- ", "Index: ")):
            break
        match = _HEADER_LINE.match(line)
        if match and match.group(1).lower() in KEYS:
            last = match.group(1).lower()
            if last in fields:
                raise MutantError(f"{path}: `{match.group(1)}:` is given twice")
            fields[last] = match.group(2).strip()
        elif line.startswith("#  ") and last:
            fields[last] += " " + line[1:].strip()  # a continuation line
        elif line.strip() and not line.startswith("#"):
            raise MutantError(f"{path}: header line {line!r} is not a `# Key: value` comment; "
                              f"the header comes before the diff, one `# Key: value` a line")
    if "diff --git" not in text and "\n--- " not in text:
        raise MutantError(f"{path}: no diff after the header (make it with `git diff` on the base tag)")
    missing = [k for k in REQUIRED if not fields.get(k)]
    if missing:
        raise MutantError(f"{path}: the header lacks {', '.join(k.capitalize() + ':' for k in missing)} "
                          f"(every mutant says {', '.join(k.capitalize() for k in REQUIRED)})")
    if fields["mutant"] != path.stem:
        raise MutantError(f"{path}: `Mutant: {fields['mutant']}` must be the file's name, {path.stem}")
    kconfig = tuple(fields.get("kconfig", "").split())
    try:
        parse_kconfig(list(kconfig))
    except BuildError as exc:
        raise MutantError(f"{path}: Kconfig: {exc}") from None
    workload = fields.get("workload") or None
    if workload is not None and not re.fullmatch(r"idle|dirty:\d+", workload):
        raise MutantError(f"{path}: Workload: {workload!r}; use idle or dirty:<percent>")
    return Mutant(name=path.stem, base=fields["base"], breaks=fields["breaks"], checks=fields["checks"],
                  path=path, kconfig=kconfig, workload=workload, expect=fields.get("expect", ""))


def load_mutant(path: Path) -> Mutant:
    return parse_header(path.read_text(errors="replace"), path)


def discover(directory: Path = MUTANTS_DIR) -> list[Mutant]:
    """Every ``*.patch`` of ``directory``, by name."""
    return [load_mutant(p) for p in sorted(directory.glob("*.patch"))]


def select(directory: Path, names: list[str], every: bool) -> list[Mutant]:
    known = {m.name: m for m in discover(directory)}
    if every:
        if not known:
            raise MutantError(f"{directory}: no *.patch mutants")
        return list(known.values())
    if not names:
        raise MutantError("name a mutant (`nested-xen mutant list` shows them) or give --all")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MutantError(f"no mutant {', '.join(unknown)} in {directory}; there are: {', '.join(known)}")
    return [known[n] for n in names]


# ---------------------------------------------------------------------- the source tree


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def base_commit(src: Path, base: str) -> str:
    out = _git(["rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], src)
    if out.returncode != 0:
        raise MutantError(f"{src} has no {base}: fetch it first (`git -C {src} fetch --depth 1 origin "
                          f"tag {base}`) or clone it (`git clone --depth 1 --branch {base} ...`)")
    return out.stdout.strip()


def checkout(src: Path, base: str, dest: Path) -> None:
    """A detached worktree of ``src`` (a checkout or a bare repository) at ``base`` in ``dest``."""
    remove_worktree(src, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    out = _git(["worktree", "add", "--detach", str(dest), base], src)
    if out.returncode != 0:
        raise MutantError(f"`git worktree add {dest} {base}` in {src} failed: {out.stderr.strip()}")


def remove_worktree(src: Path, dest: Path) -> None:
    if dest.exists():
        _git(["worktree", "remove", "--force", str(dest)], src)
        shutil.rmtree(dest, ignore_errors=True)
    _git(["worktree", "prune"], src)


def apply_patch(mutant: Mutant, tree: Path) -> None:
    """Apply the mutant to ``tree``, checked first: a patch that does not apply changes nothing."""
    for args in (["apply", "--check"], ["apply"]):
        out = _git([*args, str(mutant.path)], tree)
        if out.returncode != 0:
            raise MutantError(f"{mutant.path.name} does not apply to {mutant.base} ({tree}): "
                              f"{out.stderr.strip()}; rebase it on that tag with `git diff`")


def build(mutant: Mutant, src: Path, cache: Path, jobs: int, log=print) -> Path:
    """The mutant's dist tree: built once per key (patch, kconfig, base commit), then reused."""
    commit = base_commit(src, mutant.base)
    home = cache / "mutants" / f"{mutant.name}-{mutant.key(commit)}"
    marker = home / "dist.path"  # the dist tree under home: the cache may move (a CI container's)
    if marker.is_file() and (home / marker.read_text().strip()).is_dir():
        log(f"[mutant] {mutant.name}: built before, {home / marker.read_text().strip()}")
        return home / marker.read_text().strip()
    tree = cache / "mutants" / "work" / mutant.name
    checkout(src, commit, tree)
    try:
        apply_patch(mutant, tree)
        dist = build_xen(tree, home, jobs, kconfig=parse_kconfig(list(mutant.kconfig)))
    finally:
        remove_worktree(src, tree)
    marker.write_text(f"{dist.relative_to(home)}\n")
    return dist


# ---------------------------------------------------------------------- the checks and verdict


def run_config(mutant: Mutant, base_config: Path, dest: Path) -> Path:
    """``base_config`` with the mutant's workload as the migration workloads, written to ``dest``."""
    data = yaml.safe_load(base_config.read_text()) or {}
    if mutant.workload:
        data.setdefault("migration", {})["workloads"] = [mutant.workload]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(f"# {base_config} for mutant {mutant.name}\n" + yaml.safe_dump(data, sort_keys=False))
    try:
        load_run_config(dest)
    except ConfigError as exc:
        raise MutantError(f"the mutants' run config: {exc}") from None
    return dest


def pytest_command(mutant: Mutant, config: Path, artifacts: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "plugins", "-v", "-rA", "-p", "no:cacheprovider",
            "-k", mutant.checks, "--nx-config", str(config), "--artifacts-dir", str(artifacts), *extra]


@dataclass
class Verdict:
    caught: bool
    counts: dict[str, int]
    failed: list[str] = field(default_factory=list)  # the plain failures that caught it
    note: str = ""


def verdict(results_json: Path) -> Verdict:
    """CAUGHT when at least one check the mutant's selection ran is a plain ``failed``."""
    if not results_json.is_file():
        return Verdict(False, {}, note=f"no {results_json}: the run ended before any check reported")
    data = json.loads(results_json.read_text())
    results = data.get("results", []) if isinstance(data, dict) else []
    counts = Counter(str(r.get("outcome", "")) for r in results)
    failed = [r["nodeid"] for r in results if r.get("outcome") in CAUGHT_OUTCOMES]
    note = "" if results else "no check ran: the Checks expression selected nothing"
    if results and not failed:
        note = "no plain failure (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")"
    return Verdict(bool(failed), dict(sorted(counts.items())), failed, note)


@dataclass
class MutantRun:
    mutant: str
    breaks: str
    checks: str
    verdict: str  # CAUGHT | ESCAPED | BROKEN (not built or not run)
    counts: dict[str, int]
    seconds: float
    failed: list[str] = field(default_factory=list)
    note: str = ""
    dist: str = ""
    artifacts: str = ""

    def line(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items()) or "no results"
        return (f"{self.mutant:24} {self.verdict:8} {counts:40} {self.seconds:7.0f} s  "
                f"checks: {self.checks}  breaks: {self.breaks}" + (f"  [{self.note}]" if self.note else ""))


def run_one(mutant: Mutant, args: argparse.Namespace, cache: Path, artifacts: Path) -> MutantRun:
    started = time.monotonic()
    out = artifacts / "mutants" / mutant.name
    row = MutantRun(mutant.name, mutant.breaks, mutant.checks, "BROKEN", {}, 0.0, artifacts=str(out))
    try:
        dist = Path(args.dist) if args.dist else build(mutant, Path(args.xen_src).resolve(), cache, args.jobs)
        row.dist = str(dist)
        config = run_config(mutant, Path(args.mutant_config), out / "run-config.yaml")
        (out / "results.json").unlink(missing_ok=True)
        cache_arg = options.pytest_args(lambda name: getattr(args, name, None), ("cache_dir",))
        cmd = pytest_command(mutant, config, out, [*cache_arg, *args.pytest_args])
        print(f"[mutant] {mutant.name}: {' '.join(cmd)}", flush=True)
        env = {**os.environ, "XEN_DIST": str(dist)}
        subprocess.call(cmd, cwd=REPO, env=env)
        found = verdict(out / "results.json")
        row.verdict, row.counts = ("CAUGHT" if found.caught else "ESCAPED"), found.counts
        row.failed, row.note = found.failed, found.note
    except (MutantError, BuildError) as exc:
        row.note = str(exc).splitlines()[0][:300]
        print(f"[mutant] {mutant.name}: {exc}", file=sys.stderr, flush=True)
    row.seconds = round(time.monotonic() - started, 1)
    return row


def write_summary(rows: list[MutantRun], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": 1, "all_caught": bool(rows) and all(r.verdict == "CAUGHT" for r in rows),
            "mutants": [asdict(r) for r in rows]}
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------- commands


def cmd_mutant(args: argparse.Namespace) -> int:
    return run_as_build_error(_cmd_mutant, args, MutantError)


def _cmd_mutant(args: argparse.Namespace) -> int:
    directory = Path(args.mutants_dir)
    if args.action == "list":
        for m in discover(directory):
            print(f"{m.name:24} {m.base:16} checks: {m.checks}\n{'':24} {m.breaks}")
        return 0
    chosen = select(directory, args.names, args.all)
    if not args.dist and not args.xen_src:
        raise MutantError("give --xen-src SRC (a Xen git checkout or bare repository with the base tag) "
                          "or --dist DIR (an already built mutant)")
    if args.build_only and not args.xen_src:
        raise MutantError("--build-only builds from --xen-src SRC")
    if args.dist and len(chosen) != 1:
        raise MutantError("--dist is one mutant's build: name exactly one mutant")
    cfg = _config(args)
    if args.build_only:
        src, cache = Path(args.xen_src).resolve(), cfg.resolved_cache_dir()
        for mutant in chosen:
            print(f"{mutant.name}: {build(mutant, src, cache, args.jobs)}", flush=True)
        return 0
    artifacts = cfg.artifacts_dir.resolve()
    rows = []
    for mutant in chosen:
        rows.append(run_one(mutant, args, cfg.resolved_cache_dir(), artifacts))
        write_summary(rows, artifacts / "mutants.json")
    print("\nmutant                   verdict  outcomes                                     time")
    for row in rows:
        print(row.line())
    escaped = [r.mutant for r in rows if r.verdict != "CAUGHT"]
    print(f"{len(rows) - len(escaped)}/{len(rows)} caught" + (f"; not caught: {', '.join(escaped)}" if escaped
                                                              else "") + f" ({artifacts / 'mutants.json'})")
    return 0 if not escaped else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mutant", help="list the Xen mutants, or build one (or --all) and run the checks "
                       "that must catch it")
    p.add_argument("action", nargs="?", choices=["list", "run"], default="list",
                   help="list (the default) or run")
    p.add_argument("names", nargs="*", metavar="NAME", help="mutants to run (mutants/NAME.patch)")
    p.add_argument("--all", action="store_true", help="run every mutant")
    p.add_argument("--xen-src", metavar="SRC", help="a Xen git checkout (or bare repo) holding the base tag")
    p.add_argument("--dist", metavar="DIR", help="skip the build: this dist tree is the mutant's")
    p.add_argument("--build-only", action="store_true",
                   help="build the mutants into the cache and stop (a later run reuses the builds)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--mutants-dir", default=str(MUTANTS_DIR), metavar="DIR")
    p.add_argument("--mutant-config", default=str(MUTANT_CONFIG), metavar="YAML",
                   help="the run config the checks run with (the mutant's Workload: goes in)")
    p.add_argument("--pytest-arg", dest="pytest_args", action="append", default=[], metavar="ARG",
                   help="passed on to pytest (repeatable), e.g. --pytest-arg=--accel=tcg")
    options.add_arguments(p, ("artifacts_dir", "cache_dir"))
    p.set_defaults(func=cmd_mutant)
