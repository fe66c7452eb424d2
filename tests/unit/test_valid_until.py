"""Builds against Release files past their Valid-Until: when the harness retries, and how."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness import imaging
from harness.config import ConfigError, load_recipe, load_run_config
from harness.imaging import NO_VALID_UNTIL, CommandError, ImageBuilder, build_command, expired_release

MIRROR = "file:/srv/apt/debian"
SAID = "Release file for file:/srv/apt/debian/dists/testing/InRelease is expired (invalid since 25d 8h 32min)"
EXPIRED = f"E: {SAID}. Updates for this repository will not be applied."


def fails(rc: int, *lines: str) -> CommandError:
    return CommandError("mmdebstrap failed", rc, list(lines))


def test_expired_release_is_exit_25_saying_is_expired() -> None:
    said = fails(25, "I: running apt-get update...", EXPIRED, "E: apt-get update failed")
    assert expired_release(said) == SAID
    assert expired_release(fails(25, "E: Failed to fetch file:/x/InRelease  404 Not Found")) is None
    assert expired_release(fails(1, EXPIRED)) is None  # another failure that mentions it


def test_a_real_command_failing_so_is_recognised() -> None:
    script = f"echo 'I: running apt-get update...'; echo '{EXPIRED}'; exit 25"
    with pytest.raises(CommandError) as info:
        imaging._run_streaming(["sh", "-c", script], lambda line: None)
    assert info.value.rc == 25 and expired_release(info.value) == SAID


def test_build_command_without_valid_until(tmp_path: Path) -> None:
    recipe = load_recipe("testing")
    checked = build_command(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root")
    unchecked = build_command(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root", False)
    assert f"--aptopt={NO_VALID_UNTIL}" not in checked
    assert f"--aptopt={NO_VALID_UNTIL}" in unchecked
    assert [a for a in unchecked if a.startswith("deb ")] == [f"deb {MIRROR} testing main"]


def _builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcomes: list, allow: bool = False):
    """An ImageBuilder whose mmdebstrap runs answer ``outcomes`` in turn (None: success)."""
    said: list[str] = []
    commands: list[list[str]] = []

    def run(cmd: list[str], progress) -> None:
        commands.append(cmd)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(imaging, "_run_streaming", run)
    return ImageBuilder(tmp_path, MIRROR, said.append, allow), said, commands


def _bootstrap(builder: ImageBuilder, recipe, tmp_path: Path) -> None:
    builder._bootstrap(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root")


def test_expired_release_builds_again_without_the_check(tmp_path: Path, monkeypatch) -> None:
    builder, said, commands = _builder(tmp_path, monkeypatch, [fails(25, EXPIRED), None])
    _bootstrap(builder, load_recipe("testing"), tmp_path)
    assert len(commands) == 2
    assert f"--aptopt={NO_VALID_UNTIL}" not in commands[0] and f"--aptopt={NO_VALID_UNTIL}" in commands[1]
    assert any("is expired" in line and "building again" in line for line in said)


def test_other_failures_are_not_retried(tmp_path: Path, monkeypatch) -> None:
    builder, _said, commands = _builder(tmp_path, monkeypatch, [fails(25, "E: 404 Not Found"), None])
    with pytest.raises(CommandError):
        _bootstrap(builder, load_recipe("testing"), tmp_path)
    assert len(commands) == 1


@pytest.mark.parametrize("where", ["recipe", "run config"])
def test_declared_expired_release_skips_the_first_try(tmp_path: Path, monkeypatch, where: str) -> None:
    recipe = load_recipe("testing")
    if where == "recipe":
        recipe = dataclasses.replace(recipe, allow_expired_release=True)
    builder, said, commands = _builder(tmp_path, monkeypatch, [None], allow=where == "run config")
    _bootstrap(builder, recipe, tmp_path)
    assert len(commands) == 1 and f"--aptopt={NO_VALID_UNTIL}" in commands[0]
    assert any("expired Release file" in line for line in said)
    # An expired Release file after that is not a reason to try again: the check was off.
    builder, _said, commands = _builder(tmp_path, monkeypatch, [fails(25, EXPIRED)], allow=True)
    with pytest.raises(CommandError):
        _bootstrap(builder, recipe, tmp_path)


def test_setting_is_typed_and_not_in_the_image_key(tmp_path: Path) -> None:
    recipe = load_recipe("testing")
    assert "allow_expired_release" not in recipe.key_material()
    good = tmp_path / "run.yaml"
    good.write_text("allow_expired_release: true\n")
    assert load_run_config(good).allow_expired_release is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("allow_expired_release: yes please\n")
    with pytest.raises(ConfigError, match="allow_expired_release: expected bool"):
        load_run_config(bad)
