"""The dom0 agent built into one file (harness/agent/build.py): deterministic, and the built
file answers as the package does in-process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.agent import build, nxagent


def test_building_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    first = build.build(tmp_path / "a" / "nxagent.py").read_bytes()
    # A copy of the sources with other timestamps and permissions: the bytes do not change.
    copy = tmp_path / "src" / "nxagent"
    shutil.copytree(build.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for module in copy.glob("*.py"):
        module.chmod(0o600)
        os.utime(module, (1_000_000_000, 1_000_000_000))
    second = build.build(tmp_path / "b" / "nxagent.py", build.agent_bytes(copy)).read_bytes()
    assert first == second
    assert first == build.agent_bytes()
    assert os.stat(tmp_path / "a" / "nxagent.py").st_mode & 0o777 == 0o755


def test_the_built_file_is_a_zipapp_of_every_module() -> None:
    data = build.agent_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    modules = sorted(f"nxagent/{p.name}" for p in build.PACKAGE_DIR.glob("*.py"))
    assert names == sorted(["__main__.py", *modules])
    assert {(info.date_time, info.external_attr >> 16, info.compress_type) for info in infos} == {
        ((1980, 1, 1, 0, 0, 0), 0o100644, zipfile.ZIP_STORED)
    }


def test_the_shipped_file_is_the_build_in_the_cache(tmp_path: Path) -> None:
    built = build.built_agent(tmp_path)
    assert built.name == "nxagent.py"
    assert built.read_bytes() == build.agent_bytes()
    assert built.parent.parent == tmp_path / "agent"
    assert build.built_agent(tmp_path) == built  # the same content, the same path


def _in_process(args: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, dict]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = nxagent.cli.main(args)
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["info"], ""),
        (["mmapbatch_v2"], '{"domid": 1}'),  # request.frames missing
        (["mmapbatch_v2"], '{"domid": 1, "frames": [1], "bogus": 2}'),
        (["batch"], '{"calls": [{"command": "batch"}]}'),
        (["nope"], "{}"),
        ([], "{}"),
    ],
)
def test_the_built_file_answers_as_the_package(tmp_path, monkeypatch, capsys, args, stdin) -> None:
    """The single file dom0 runs, run by python3 under its dom0 name, says what the package
    says in-process (the same JSON, the same exit status)."""
    agent = build.build(tmp_path / "nxagent.py")
    proc = subprocess.run(
        [sys.executable, str(agent), *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},  # nothing but the file itself
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.count("\n") == 1
    status, answer = _in_process(args, stdin, monkeypatch, capsys)
    assert (proc.returncode, json.loads(proc.stdout)) == (status, answer)


def test_importing_the_harness_builds_no_agent(tmp_path: Path) -> None:
    """The agent is built when an install first needs it, into that run's cache: importing
    the modules that install it writes nothing into the default cache."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"))
    env.pop("NESTED_XEN_CACHE", None)
    code = "import harness.agent.client, harness.dom0_files, harness.provision, harness.pytest_plugin"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(build.__file__).parents[2])
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()
