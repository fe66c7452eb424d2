"""harness/mutants.py: the mutants' headers, the verdict, applying a patch, the command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import cli, mutants
from harness.mutants import MutantError, parse_header, verdict

DIFF = """diff --git a/f.c b/f.c
--- a/f.c
+++ b/f.c
@@ -1,3 +1,3 @@
 int a;
-int b;
+int b = 1;
 int c;
"""

HEADER = """# Mutant: m1
# Base: v1
# Breaks: b becomes 1.
# Checks: test_x and dirty
# Kconfig: CONFIG_SHADOW_PAGING=y CONFIG_X=n
# Workload: dirty:20
# Expect: first line
#   and its continuation.
"""


def patch_file(tmp_path: Path, text: str, name: str = "m1") -> Path:
    path = tmp_path / f"{name}.patch"
    path.write_text(text)
    return path


def test_header_is_parsed(tmp_path):
    path = patch_file(tmp_path, HEADER + DIFF)
    m = parse_header(path.read_text(), path)
    assert (m.name, m.base, m.breaks, m.checks) == ("m1", "v1", "b becomes 1.", "test_x and dirty")
    assert m.kconfig == ("CONFIG_SHADOW_PAGING=y", "CONFIG_X=n")
    assert m.workload == "dirty:20"
    assert m.expect == "first line and its continuation."


@pytest.mark.parametrize("drop, named", [("# Checks:", "Checks:"), ("# Breaks:", "Breaks:"),
                                          ("# Base:", "Base:")])
def test_a_missing_required_key_is_named(tmp_path, drop, named):
    text = "".join(ln for ln in (HEADER + DIFF).splitlines(True) if not ln.startswith(drop))
    path = patch_file(tmp_path, text)
    with pytest.raises(MutantError, match=named):
        parse_header(text, path)


@pytest.mark.parametrize("swap, message", [
    (("Mutant: m1", "Mutant: other"), "must be the file's name"),
    (("CONFIG_X=n", "SHADOW=y"), "Kconfig"),
    (("dirty:20", "busy"), "Workload"),
    (("# Expect: first line", "Expect: not a comment"), "not a `# Key: value` comment"),
    (("# Base: v1", "# Base: v1\n# Base: v2"), "given twice"),
])
def test_a_bad_header_says_what_is_wrong(tmp_path, swap, message):
    text = (HEADER + DIFF).replace(*swap)
    with pytest.raises(MutantError, match=message):
        parse_header(text, patch_file(tmp_path, text))


def test_a_header_without_a_diff_is_refused(tmp_path):
    with pytest.raises(MutantError, match="no diff"):
        parse_header(HEADER, patch_file(tmp_path, HEADER))


def test_the_shipped_mutants_parse_and_cover_the_three_areas():
    found = {m.name: m for m in mutants.discover()}
    assert len(found) >= 3
    touched = " ".join(m.path.read_text() for m in found.values())
    for area in ("xen/arch/x86/mm/paging.c", "tools/libs/guest/xg_sr_save.c", "xen/arch/x86/mm/p2m.c"):
        assert f"+++ b/{area}" in touched, area
    for m in found.values():
        assert m.base == "RELEASE-4.22.0" and m.checks and m.breaks.endswith("."), m


# ---------------------------------------------------------------------- verdict


def results_json(tmp_path: Path, *outcomes: str) -> Path:
    path = tmp_path / "results.json"
    rows = [{"nodeid": f"plugins/migration.py::test_x[{i}]", "plugin": "migration", "check": "test_x",
             "outcome": o} for i, o in enumerate(outcomes)]
    path.write_text(json.dumps({"version": 1, "results": rows, "incidents": []}))
    return path


def test_a_plain_failure_catches_the_mutant(tmp_path):
    found = verdict(results_json(tmp_path, "passed", "failed", "skipped"))
    assert found.caught and found.failed == ["plugins/migration.py::test_x[1]"]
    assert found.counts == {"failed": 1, "passed": 1, "skipped": 1}


@pytest.mark.parametrize("outcomes", [
    ("error",), ("xfailed",), ("passed-after-fault",), ("skipped",), ("passed",), ("xpassed",),
    ("error", "xfailed", "passed-after-fault", "skipped", "passed"),
])
def test_nothing_but_a_plain_failure_counts(tmp_path, outcomes):
    found = verdict(results_json(tmp_path, *outcomes))
    assert not found.caught and not found.failed
    assert "no plain failure" in found.note


def test_no_results_is_an_escape_that_says_why(tmp_path):
    assert "selected nothing" in verdict(results_json(tmp_path)).note
    missing = verdict(tmp_path / "absent.json")
    assert not missing.caught and "no " in missing.note


# ---------------------------------------------------------------------- applying


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture
def src(tmp_path):
    repo = tmp_path / "src"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "f.c").write_text("int a;\nint b;\nint c;\n")
    git(repo, "add", "f.c")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "tag", "v1")
    (repo / "f.c").write_text("int a;\nint bb;\nint c;\n")  # later work: the patch no longer applies
    git(repo, "commit", "-q", "-am", "later")
    return repo


def test_the_patch_applies_on_a_worktree_at_the_base_tag(tmp_path, src):
    m = parse_header(HEADER + DIFF, patch_file(tmp_path, HEADER + DIFF))
    tree = tmp_path / "work" / "m1"
    mutants.checkout(src, mutants.base_commit(src, "v1"), tree)
    mutants.apply_patch(m, tree)
    assert (tree / "f.c").read_text() == "int a;\nint b = 1;\nint c;\n"
    assert (src / "f.c").read_text() == "int a;\nint bb;\nint c;\n"  # SRC's own tree untouched
    mutants.remove_worktree(src, tree)
    assert not tree.exists() and "work/m1" not in git(src, "worktree", "list")


def test_a_patch_that_does_not_apply_is_named_and_changes_nothing(tmp_path, src):
    m = parse_header(HEADER + DIFF, patch_file(tmp_path, HEADER + DIFF))
    with pytest.raises(MutantError, match="m1.patch does not apply to v1"):
        mutants.apply_patch(m, src)  # src is at the later commit
    assert (src / "f.c").read_text() == "int a;\nint bb;\nint c;\n"


def test_a_missing_base_tag_says_how_to_fetch_it(src):
    with pytest.raises(MutantError, match="has no RELEASE-9.9.9: fetch it first"):
        mutants.base_commit(src, "RELEASE-9.9.9")


def test_the_build_key_follows_the_patch_and_kconfig(tmp_path):
    path = patch_file(tmp_path, HEADER + DIFF)
    m = parse_header(path.read_text(), path)
    key = m.key("abc")
    assert key == m.key("abc") and key != m.key("abd")
    path.write_text(HEADER + DIFF.replace("int b = 1;", "int b = 2;"))
    assert m.key("abc") != key
    path.write_text(HEADER + DIFF)
    other = parse_header(path.read_text().replace(" CONFIG_X=n", ""), path)
    assert other.key("abc") != key


def test_a_built_mutant_is_not_built_again(tmp_path, src, monkeypatch):
    m = parse_header(HEADER + DIFF, patch_file(tmp_path, HEADER + DIFF))
    home = tmp_path / "cache" / "mutants" / f"m1-{m.key(mutants.base_commit(src, 'v1'))}"
    (home / "builds" / "xen-1").mkdir(parents=True)
    (home / "dist.path").write_text("builds/xen-1\n")  # relative: the cache may have moved

    def no_build(*a, **k):
        raise AssertionError("built again")

    monkeypatch.setattr(mutants, "build_xen", no_build)
    assert mutants.build(m, src, tmp_path / "cache", 1, log=lambda s: None) == home / "builds" / "xen-1"


def test_build_applies_the_patch_at_the_base_and_keeps_the_dist(tmp_path, src, monkeypatch):
    """The compile itself (make dist, minutes) is replaced; what it is handed is checked."""
    m = parse_header(HEADER + DIFF, patch_file(tmp_path, HEADER + DIFF))
    seen = {}

    def make_dist(tree, home, jobs, kconfig):
        seen.update(source=(tree / "f.c").read_text(), kconfig=kconfig, tree=tree)
        (home / "builds" / "xen-1").mkdir(parents=True)
        return home / "builds" / "xen-1"

    monkeypatch.setattr(mutants, "build_xen", make_dist)
    dist = mutants.build(m, src, tmp_path / "cache", 1, log=lambda s: None)
    assert seen["source"] == "int a;\nint b = 1;\nint c;\n"
    assert seen["kconfig"] == {"CONFIG_SHADOW_PAGING": "y", "CONFIG_X": "n"}
    assert not seen["tree"].exists(), "the worktree is removed after the build"
    assert dist.is_dir() and (dist.parent.parent / "dist.path").read_text() == "builds/xen-1\n"


def test_the_workload_goes_into_the_run_config(tmp_path):
    m = parse_header(HEADER + DIFF, patch_file(tmp_path, HEADER + DIFF))
    out = mutants.run_config(m, mutants.MUTANT_CONFIG, tmp_path / "cfg.yaml")
    from harness.config import load_run_config

    cfg = load_run_config(out)
    assert cfg.migration.workloads == ("dirty:20",) and cfg.host_images == ("bookworm-own-dist",)
    assert set(cfg.migration.guest_types) == {"pv", "pvh"}


# ---------------------------------------------------------------------- the command


def test_list_and_a_run_without_a_name_through_the_cli(capsys):
    assert cli.main(["mutant", "list"]) == 0
    listed = capsys.readouterr().out
    assert "logdirty-2m-tail" in listed
    assert cli.main(["mutant"]) == 0 and capsys.readouterr().out == listed  # list is the default
    assert cli.main(["mutant", "run", "--xen-src", "/nonexistent"]) == 2
    assert "name a mutant" in capsys.readouterr().err
    assert cli.main(["mutant", "run", "nope", "--dist", "/x"]) == 2
    assert "no mutant nope" in capsys.readouterr().err


@pytest.mark.parametrize("outcome, rc, word", [("failed", 0, "CAUGHT"), ("xfailed", 1, "ESCAPED")])
def test_run_reads_the_checks_results_and_writes_mutants_json(tmp_path, monkeypatch, capsys, outcome,
                                                             rc, word):
    """The pytest run (which would boot L1s) is the faked boundary: it leaves a results.json."""
    seen = {}

    def fake_pytest(cmd, cwd, env):
        seen.update(cmd=cmd, env=env)
        art = Path(cmd[cmd.index("--artifacts-dir") + 1])
        results_json(art, "passed", outcome)
        return 1

    monkeypatch.setattr(mutants.subprocess, "call", fake_pytest)
    dist = tmp_path / "dist"
    dist.mkdir()
    code = cli.main(["mutant", "run", "save-batch-drop", "--dist", str(dist),
                     "--artifacts-dir", str(tmp_path / "art")])
    assert code == rc
    assert seen["env"]["XEN_DIST"] == str(dist)
    assert seen["cmd"][seen["cmd"].index("-k") + 1] == "test_localhost_migration and dirty"
    summary = json.loads((tmp_path / "art" / "mutants.json").read_text())
    assert summary["all_caught"] is (rc == 0) and summary["mutants"][0]["verdict"] == word
    assert f"save-batch-drop          {word}" in capsys.readouterr().out
