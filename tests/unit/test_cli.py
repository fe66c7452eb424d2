"""Unit tests for the `nested-xen` command: listing, error handling, doctor."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli
from harness.config import available_recipes, load_recipe

pytestmark = pytest.mark.usefixtures("restore_process_state")


def test_images_list_prints_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["images", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == len(available_recipes())
    for name in available_recipes():
        (line,) = [ln for ln in lines if ln.split()[0] == name]
        assert load_recipe(name).description in line


@pytest.mark.parametrize("command", [["images", "build"], ["boot"], ["bench", "boot"]])
def test_broken_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          command: list[str]) -> None:
    broken = tmp_path / "run.yaml"
    broken.write_text("accel: tcg\nhost_images: [bookworm\ncpus: 2\n")
    assert cli.main([*command, "--config", str(broken)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith("nested-xen: error: ")
    assert str(broken) in err[0] and "line 3" in err[0] and "invalid YAML" in err[0]
    assert "Traceback" not in captured.err + captured.out


def test_unknown_key_in_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("acel: tcg\n")
    assert cli.main(["images", "build", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "nested-xen: error: " in err and "unknown key(s) acel" in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["boot", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_unknown_image_on_command_line_lists_recipes(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # `images build --image NAME` fails on the recipe before anything is built.
    def provisioner(cfg):
        class P:
            def image(self, name: str):
                return load_recipe(name), None
        return P()

    monkeypatch.setattr(cli, "_provisioner", provisioner)
    assert cli.main(["images", "build", "--image", "no-such-image"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nested-xen: error: unknown host image 'no-such-image'")
    assert "bookworm" in err


def test_overrides_from_the_command_line(tmp_path: Path) -> None:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("accel: kvm\nmirror: http://a.invalid/deb-mirror\n")
    args = cli.build_parser().parse_args(
        ["images", "build", "--config", str(cfg_file), "--accel", "tcg", "--image", "x", "--image", "y"]
    )
    cfg = cli._config(args)
    assert cfg.accel == "tcg" and cfg.host_images == ("x", "y")
    assert cfg.mirror == "http://a.invalid/deb-mirror" and cfg.rebuild is False


def test_doctor_with_empty_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("NESTED_XEN_CACHE", str(tmp_path / "cache"))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    for binary, package, _why in cli.TOOLS:
        i = next(i for i, ln in enumerate(lines) if ln.startswith(f"[MISSING] {binary}: missing"))
        assert lines[i + 1].strip() == f"fix: apt-get install {package}"
    assert any(ln.startswith("[ok] accelerator: ") for ln in lines)
    assert lines[-1].endswith("problem(s)")
    assert int(lines[-1].split()[0]) >= len(cli.TOOLS)
    assert (tmp_path / "cache").is_dir()


def test_doctor_all_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "doctor_findings", lambda: [(True, "x: /usr/bin/x", "apt-get install x")])
    assert cli.main(["doctor"]) == 0
    assert capsys.readouterr().out == "[ok] x: /usr/bin/x\nall good\n"
