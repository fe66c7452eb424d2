"""`nested-xen new-plugin`: the module it writes, and what it refuses.

tests/unit/test_plugin_runs.py collects and runs the written module with the harness's plugin.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.config import REPO_ROOT
from harness.discovery import readme_example
from harness.scaffold import TEMPLATE, ScaffoldError, write_plugin

pytestmark = pytest.mark.usefixtures("restore_process_state")


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "plugins").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_template_is_the_readme_example() -> None:
    assert readme_example((REPO_ROOT / "README.md").read_text()) == TEMPLATE


def test_new_plugin_writes_the_template_and_says_what_next(checkout: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["new-plugin", "edge_pages"]) == 0
    assert (checkout / "plugins" / "edge_pages.py").read_text() == TEMPLATE
    out = capsys.readouterr().out
    assert out.startswith("wrote plugins/edge_pages.py: ")
    assert "tox -e nested-xen -- -k edge_pages" in out and "README.md" in out


def test_outside_plugins_the_next_steps_name_the_entry_point_group(
        checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (checkout / "src").mkdir()
    assert cli.main(["new-plugin", "grants", "--dir", "src"]) == 0
    assert (checkout / "src" / "grants.py").is_file()
    assert "nested_xen.plugins entry-point group" in capsys.readouterr().out


def test_written_module_compiles_and_every_check_has_a_negative_control(checkout: Path) -> None:
    path = write_plugin("edge_pages")
    tree = ast.parse(path.read_text(), str(path))
    compile(tree, str(path), "exec")
    tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    checks = [t for t in tests if not t.startswith("test_negative_control_")]
    assert checks and len(tests) == 2 * len(checks), tests


def _ruff() -> str | None:
    return shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed here (tox -e lint has it)")
def test_written_module_is_ruff_clean(checkout: Path) -> None:
    path = write_plugin("edge_pages")
    # The project's configuration, so `harness` is first-party as in plugins/.
    out = subprocess.run([_ruff(), "check", "--no-cache", "--config", str(REPO_ROOT / "pyproject.toml"),
                          str(path.resolve())], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_existing_module_is_never_overwritten(checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = checkout / "plugins" / "smoke.py"
    existing.write_text("# mine\n")
    assert cli.main(["new-plugin", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err == "nested-xen: error: plugins/smoke.py exists; choose another name\n"
    assert existing.read_text() == "# mine\n"


@pytest.mark.parametrize("name", ["Edge", "edge-pages", "1pages", "_private", "class", "edge.pages", ""])
def test_name_must_be_a_collectable_module_name(checkout: Path, name: str) -> None:
    with pytest.raises(ScaffoldError, match="use a lowercase Python identifier"):
        write_plugin(name)
    assert list((checkout / "plugins").iterdir()) == []


def test_bad_name_is_one_line_exit_2(checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["new-plugin", "Edge-Pages"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nested-xen: error: plugin name 'Edge-Pages': ")


def test_without_a_plugins_dir_it_says_where_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["new-plugin", "edge_pages"]) == 2
    assert "plugins/ is not a directory: run this in the repository's root or pass --dir DIR" in \
        capsys.readouterr().err
