"""`nested-xen build-xen` checks its build tools and headers before it configures anything,
and names the Debian packages to install in one apt-get line."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli, ownbuild

pytestmark = pytest.mark.usefixtures("restore_process_state")


def fake_machine(tmp_path: Path, drop: str = "") -> tuple[Path, str]:
    """A root holding every file a Xen build needs and a PATH with every tool, but ``drop``."""
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ownbuild.XEN_TOOLS:
        if tool != drop:
            (bin_dir / tool).write_text("#!/bin/sh\n")
            (bin_dir / tool).chmod(0o755)
    for pattern in ownbuild.XEN_FILES:
        if pattern != drop:
            path = root / pattern.lstrip("/").replace("*", ".11")  # python3*/ -> python3.11/
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
    return root, str(bin_dir)


def test_a_machine_with_everything_lacks_nothing(tmp_path: Path) -> None:
    assert ownbuild.xen_build_missing(*fake_machine(tmp_path)) == []


def test_a_fresh_machine_lacks_every_package(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    missing = ownbuild.xen_build_missing(tmp_path / "root", str(tmp_path / "bin"))
    assert missing == sorted(set(ownbuild.XEN_TOOLS.values()) | set(ownbuild.XEN_FILES.values()))
    for pkg in ("build-essential", "acpica-tools", "bison", "flex", "libyajl-dev", "uuid-dev",
                "libncurses-dev", "python3-dev", "libzstd-dev", "liblzma-dev", "seabios", "pkg-config"):
        assert pkg in missing


@pytest.mark.parametrize("probe", [*ownbuild.XEN_TOOLS, *ownbuild.XEN_FILES])
def test_each_probe_names_its_package(tmp_path: Path, probe: str) -> None:
    want = {**ownbuild.XEN_TOOLS, **ownbuild.XEN_FILES}[probe]
    assert ownbuild.xen_build_missing(*fake_machine(tmp_path, drop=probe)) == [want]


def test_build_xen_stops_before_configuring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "xen-src"
    (src / "xen").mkdir(parents=True)
    (src / "xen" / "Makefile").write_text("")
    (src / "tools").mkdir()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no compiler, no iasl, no flex...
    ran: list[list[str]] = []
    monkeypatch.setattr(ownbuild, "_step", lambda cmd, *a, **k: ran.append(cmd))
    cache = tmp_path / "cache"
    assert cli.main(["build-xen", str(src), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nested-xen: error: a Xen build needs ")
    needs, _, line = err[0].partition(": apt-get install ")
    packages = line.removesuffix(" (nothing was built)").split()
    assert needs.endswith(", ".join(packages))
    assert {"build-essential", "acpica-tools", "flex", "bison", "pkg-config"} <= set(packages)
    assert ran == [] and not cache.exists(), "nothing configured, nothing in the cache"
