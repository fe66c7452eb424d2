"""Unit tests for harness.imaging: mirrors, the mmdebstrap command, the cache.

Nothing here runs mmdebstrap or touches the network: the build itself is
replaced by a fake that writes an output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from harness import imaging
from harness.config import HostRecipe, load_recipe
from harness.imaging import (
    CUSTOMIZE_HOOKS,
    ROOT_LABEL,
    HostImage,
    ImageBuilder,
    ImageError,
    build_command,
    generate_ssh_key,
    image_key,
    pick_newest,
    resolve_mirror,
    write_overlay,
)

MIRROR = "http://mirror.invalid/deb-mirror"


@pytest.fixture
def recipe() -> HostRecipe:
    return load_recipe("bookworm")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ resolve_mirror


@pytest.fixture
def mirrors(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """Control what the host's apt and debootstrap would say."""
    found: dict[str, str | None] = {"apt": None, "debootstrap": None}
    monkeypatch.setattr(imaging, "_host_apt_mirror", lambda: found["apt"])
    monkeypatch.setattr(imaging, "_debootstrap_default", lambda: found["debootstrap"])
    return found


def test_mirror_override_wins(recipe: HostRecipe, mirrors: dict) -> None:
    mirrors.update(apt="http://apt.invalid/deb-mirror", debootstrap="http://ds.invalid/deb-mirror")
    with_recipe = dataclasses.replace(recipe, mirror="http://recipe.invalid/deb-mirror")
    assert resolve_mirror("http://override.invalid/deb-mirror/", with_recipe) == "http://override.invalid/deb-mirror"


def test_mirror_recipe_beats_host(recipe: HostRecipe, mirrors: dict) -> None:
    mirrors.update(apt="http://apt.invalid/deb-mirror", debootstrap="http://ds.invalid/deb-mirror")
    with_recipe = dataclasses.replace(recipe, mirror="http://recipe.invalid/deb-mirror")
    assert resolve_mirror(None, with_recipe) == "http://recipe.invalid/deb-mirror"


def test_mirror_host_apt_beats_debootstrap(recipe: HostRecipe, mirrors: dict) -> None:
    mirrors.update(apt="http://apt.invalid/deb-mirror/", debootstrap="http://ds.invalid/deb-mirror")
    assert resolve_mirror(None, recipe) == "http://apt.invalid/deb-mirror"


def test_mirror_debootstrap_default_last(recipe: HostRecipe, mirrors: dict) -> None:
    mirrors.update(debootstrap="http://ds.invalid/deb-mirror")
    assert resolve_mirror(None, recipe) == "http://ds.invalid/deb-mirror"
    assert resolve_mirror("", recipe) == "http://ds.invalid/deb-mirror"  # empty counts as unset


def test_no_mirror_at_all(recipe: HostRecipe, mirrors: dict) -> None:
    with pytest.raises(ImageError, match="set `mirror:` in the run config"):
        resolve_mirror(None, recipe)


# ------------------------------------------------------------------ host apt sources


@pytest.fixture
def apt_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Redirect the module's /etc/apt paths into tmp_path; returns the fake /etc/apt."""
    real = imaging.Path
    root = tmp_path / "fakeroot"

    def fake_path(p, *rest):
        text = str(p)
        if text.startswith("/etc/apt"):
            return real(str(root) + text, *rest)
        return real(p, *rest)

    monkeypatch.setattr(imaging, "Path", fake_path)
    etc_apt = root / "etc/apt"
    (etc_apt / "sources.list.d").mkdir(parents=True)
    return etc_apt


def test_host_apt_deb822(apt_dir: Path) -> None:
    (apt_dir / "sources.list.d/debian.sources").write_text("""\
Types: deb
URIs: file:/srv/apt/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
URIs: file:/srv/apt/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
""")
    assert imaging._host_apt_mirror() == "file:/srv/apt/debian/"


def test_host_apt_one_line(apt_dir: Path) -> None:
    (apt_dir / "sources.list").write_text("""\
# deb file:/srv/apt/commented/debian bookworm main
deb-src file:/srv/apt/src/debian bookworm main
deb file:/srv/apt/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian.gpg] file:/srv/apt/one/debian bookworm main
""")
    assert imaging._host_apt_mirror() == "file:/srv/apt/one/debian"


def test_host_apt_ubuntu_is_not_a_debian_mirror(apt_dir: Path) -> None:
    (apt_dir / "sources.list").write_text("deb file:/srv/apt/ubuntu jammy main\n")
    assert imaging._host_apt_mirror() is None


def test_host_apt_nothing(apt_dir: Path) -> None:
    assert imaging._host_apt_mirror() is None


def test_host_apt_list_file_in_sources_list_d(apt_dir: Path) -> None:
    (apt_dir / "sources.list.d/debian.list").write_text("deb file:/srv/apt/list/debian bookworm main\n")
    assert imaging._host_apt_mirror() == "file:/srv/apt/list/debian"


def test_debootstrap_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = tmp_path / "debootstrap"
    script.write_text('#!/bin/sh\nDEF_MIRROR="file:/srv/apt/ds/debian"\nDEF_HTTPS_MIRROR="x"\n')
    monkeypatch.setattr(imaging.shutil, "which", lambda name: str(script))
    assert imaging._debootstrap_default() == "file:/srv/apt/ds/debian"
    script.unlink()
    assert imaging._debootstrap_default() is None


# ------------------------------------------------------------------ build_command


@pytest.mark.parametrize("mode", ["root", "unshare"])
def test_build_command(recipe: HostRecipe, tmp_path: Path, mode: str) -> None:
    recipe = dataclasses.replace(recipe, extra_suites=("bookworm-updates", "bookworm-backports"),
                                 components=("main", "contrib"))
    mirror = MIRROR
    overlay, stage, target = tmp_path / "overlay", tmp_path / "stage", tmp_path / "rootfs"
    cmd = build_command(recipe, mirror, overlay, stage, target, mode)
    assert cmd[0] == "mmdebstrap"
    assert f"--mode={mode}" in cmd
    assert [a for a in cmd if a.startswith("--mode=")] == [f"--mode={mode}"]
    (include,) = [a for a in cmd if a.startswith("--include=")]
    assert include.removeprefix("--include=").split(",") == list(recipe.packages)
    # Positional: SUITE TARGET then one sources line per suite.
    i = cmd.index("bookworm")
    assert cmd[i + 1] == str(target)
    assert cmd[i + 2:] == [
        f"deb {mirror} bookworm main contrib",
        f"deb {mirror} bookworm-updates main contrib",
        f"deb {mirror} bookworm-backports main contrib",
    ]
    hooks = [a.removeprefix("--customize-hook=") for a in cmd if a.startswith("--customize-hook=")]
    assert hooks[0] == f"sync-in {overlay} /"
    for hook in CUSTOMIZE_HOOKS:
        assert hook in hooks
    assert f"sync-out /boot {stage / 'boot'}" in hooks
    assert any(str(stage / "busybox") in h for h in hooks)


def test_build_command_uses_only_the_given_mirror(recipe: HostRecipe, tmp_path: Path) -> None:
    cmd = build_command(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root")
    text = " ".join(cmd)
    assert "http" in text
    urls = {word for arg in cmd for word in arg.split() if "://" in word}
    assert urls == {MIRROR}


def test_build_command_no_extra_suites(recipe: HostRecipe, tmp_path: Path) -> None:
    cmd = build_command(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root")
    assert [a for a in cmd if a.startswith("deb ")] == [f"deb {MIRROR} bookworm main"]


# ------------------------------------------------------------------ pick_newest


def test_pick_newest_natural_sort(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    for name in ("vmlinuz-6.1.0-28-amd64", "vmlinuz-6.12.9-amd64", "vmlinuz-6.2.0-1-amd64",
                 "vmlinuz-6.9.12-amd64", "initrd.img-6.12.9-amd64", "config-6.13.0-amd64"):
        (boot / name).write_text(name)
    assert pick_newest(tmp_path, "boot/vmlinuz-*").name == "vmlinuz-6.12.9-amd64"


def test_pick_newest_xen(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    for name in ("xen-4.9-amd64.gz", "xen-4.17-amd64.gz", "xen-4.17-amd64.config"):
        (boot / name).write_text(name)
    assert pick_newest(tmp_path, "boot/xen-*-amd64.gz").name == "xen-4.17-amd64.gz"


def test_pick_newest_none(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(ImageError) as info:
        pick_newest(tmp_path, "boot/vmlinuz-*")
    msg = str(info.value)
    assert "'boot/vmlinuz-*'" in msg and str(tmp_path) in msg and "`boot:`" in msg


# ------------------------------------------------------------------ overlay and keys


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_overlay(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("PRIVATE KEY\n")
    dest = tmp_path / "overlay"
    write_overlay(dest, "ssh-ed25519 AAAATEST nested-xen", key)
    auth = dest / "root/.ssh/authorized_keys"
    assert auth.read_text() == "ssh-ed25519 AAAATEST nested-xen\n"
    assert mode_of(auth) == 0o600
    assert mode_of(dest / "root/.ssh/id_ed25519") == 0o600
    assert (dest / "root/.ssh/id_ed25519").read_text() == "PRIVATE KEY\n"
    assert mode_of(dest / "root/.ssh/config") == 0o600
    assert mode_of(dest / "root/.ssh/id_ed25519.pub") == 0o644
    assert mode_of(dest / "root/.ssh") == 0o700
    assert mode_of(dest / "root") == 0o700
    assert (dest / "etc/hostname").read_text() == "nxdom0\n"
    assert f"LABEL={ROOT_LABEL} / ext4" in (dest / "etc/fstab").read_text()
    assert "PasswordAuthentication no" in (dest / "etc/ssh/sshd_config.d/nested-xen.conf").read_text()
    assert "DHCP=ipv4" in (dest / "etc/systemd/network/20-wired.network").read_text()
    assert "xen-gntdev" in (dest / "etc/modules-load.d/nested-xen.conf").read_text().split()
    assert "--log=guest" in (dest / "etc/nested-xen-xen-defaults").read_text()
    assert mode_of(dest / "etc/hostname") == 0o644


def test_generate_ssh_key_loads_in_paramiko(tmp_path: Path) -> None:
    path = tmp_path / "id_ed25519"
    line = generate_ssh_key(path)
    assert mode_of(path) == 0o600
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    kind, blob, comment = line.split()
    assert kind == "ssh-ed25519" and comment == "nested-xen"
    assert blob == key.get_base64()
    assert (tmp_path / "id_ed25519.pub").read_text() == line + "\n"


def test_generate_ssh_key_is_fresh_each_time(tmp_path: Path) -> None:
    assert generate_ssh_key(tmp_path / "a") != generate_ssh_key(tmp_path / "b")


# ------------------------------------------------------------------ _run_streaming


def test_run_streaming_missing_command() -> None:
    with pytest.raises(ImageError) as info:
        imaging._run_streaming(["nx-no-such-command-xyz", "--help"], lambda line: None)
    msg = str(info.value)
    assert "nx-no-such-command-xyz is not installed" in msg
    assert "apt-get install nx-no-such-command-xyz" in msg


def test_run_streaming_failure_shows_tail() -> None:
    lines: list[str] = []
    with pytest.raises(ImageError) as info:
        imaging._run_streaming(["sh", "-c", "echo first; echo oops >&2; exit 3"], lines.append)
    msg = str(info.value)
    assert "sh failed with exit status 3" in msg
    assert "first" in msg and "oops" in msg
    assert lines == ["first", "oops"]


def test_run_streaming_success_streams_lines() -> None:
    lines: list[str] = []
    imaging._run_streaming(["sh", "-c", "echo one; echo two"], lines.append)
    assert lines == ["one", "two"]


def test_run_streaming_survives_non_utf8_output() -> None:
    lines: list[str] = []
    imaging._run_streaming(["sh", "-c", "printf 'caf\\351\\nnext\\n'"], lines.append)
    assert len(lines) == 2 and lines[0].startswith("caf") and lines[1] == "next"


# ------------------------------------------------------------------ ImageBuilder cache


@pytest.fixture
def builder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[ImageBuilder, list]:
    builds: list[tuple[str, Path]] = []

    def fake_build(self: ImageBuilder, recipe: HostRecipe, key: str, final: Path) -> None:
        builds.append((key, final))
        final.mkdir()
        (final / "manifest.json").write_text(json.dumps({"name": recipe.name, "key": key,
                                                         "build": len(builds)}))

    monkeypatch.setattr(ImageBuilder, "_build", fake_build)
    lines: list[str] = []
    b = ImageBuilder(tmp_path / "cache", mirror=MIRROR, progress=lines.append)
    b.lines = lines  # type: ignore[attr-defined]
    return b, builds


def test_get_builds_then_reuses(builder: tuple[ImageBuilder, list], recipe: HostRecipe,
                                tmp_path: Path) -> None:
    b, builds = builder
    assert b.cached(recipe) is None
    image = b.get(recipe)
    key = image_key(recipe, MIRROR)
    assert image == HostImage("bookworm", key, tmp_path / "cache/images" / f"bookworm-{key}")
    assert builds == [(key, image.dir)]
    again = b.get(recipe)
    assert again == image
    assert len(builds) == 1
    assert image.manifest["build"] == 1
    assert b.cached(recipe) == image
    assert any("cached" in line for line in b.lines)  # type: ignore[attr-defined]


def test_get_rebuild(builder: tuple[ImageBuilder, list], recipe: HostRecipe) -> None:
    b, builds = builder
    b.get(recipe)
    image = b.get(recipe, rebuild=True)
    assert len(builds) == 2
    assert image.manifest["build"] == 2


def test_stale_build_dirs_are_reaped(builder: tuple[ImageBuilder, list], recipe: HostRecipe) -> None:
    b, _builds = builder
    b.root.mkdir(parents=True)
    stale = b.root / f".build-bookworm-0123456789abcdef-{dead_pid()}"
    (stale / "out").mkdir(parents=True)
    (stale / "out/rootfs.ext4").write_text("half")
    live = b.root / f".build-other-0123456789abcdef-{os.getpid()}"
    live.mkdir()
    b.get(recipe)
    assert not stale.exists()
    assert live.exists()


def test_real_build_without_mmdebstrap_says_apt_get_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recipe: HostRecipe) -> None:
    """The real _build, up to the point where it runs mmdebstrap, which is not on PATH."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    lines: list[str] = []
    b = ImageBuilder(tmp_path / "cache", mirror=MIRROR, progress=lines.append)
    with pytest.raises(ImageError) as info:
        b.get(recipe)
    msg = str(info.value)
    assert "mmdebstrap is not installed" in msg and "apt-get install mmdebstrap" in msg
    # Nothing half-built is left behind, and no image claims to exist.
    assert [p.name for p in b.root.iterdir() if not p.name.endswith(".lock")] == []
    assert b.cached(recipe) is None
    assert any(MIRROR in line for line in lines)


def test_mirror_is_part_of_the_cache_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         recipe: HostRecipe) -> None:
    a = ImageBuilder(tmp_path, mirror="http://a.invalid/deb-mirror")
    b = ImageBuilder(tmp_path, mirror="http://b.invalid/deb-mirror")
    assert a.image_dir(recipe)[1] != b.image_dir(recipe)[1]
    assert a.image_dir(recipe)[1].parent == tmp_path / "images"
