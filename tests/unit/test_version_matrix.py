"""The version matrix is data: recipes for other suites and kernels, and a recipe field
that takes one package from an extra suite (``PACKAGE/SUITE``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import ConfigError, available_recipes, load_recipe, package_pin
from harness.imaging import build_command

MIRROR = "http://mirror.invalid/deb-mirror"
RECIPE = """\
name: x
suite: bookworm
{extra}packages: [xen-system-amd64, {kernel}]
"""


def write(tmp_path: Path, kernel: str, extra: str = "") -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(RECIPE.format(kernel=kernel, extra=extra))
    return path


@pytest.mark.parametrize("text, want", [
    ("linux-image-amd64", ("linux-image-amd64", None)),
    ("linux-image-amd64/bookworm-backports", ("linux-image-amd64", "bookworm-backports")),
])
def test_package_pin(text: str, want: tuple) -> None:
    assert package_pin(text) == want


def test_pin_to_an_extra_suite(tmp_path: Path) -> None:
    write(tmp_path, "linux-image-amd64/bookworm-backports", "extra_suites: [bookworm-backports]\n")
    recipe = load_recipe("x", recipe_dir=tmp_path)
    assert "linux-image-amd64/bookworm-backports" in recipe.packages


def test_pin_to_the_main_suite_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "linux-image-amd64/bookworm")
    assert load_recipe("x", recipe_dir=tmp_path).extra_suites == ()


def test_pin_to_a_suite_the_recipe_lacks_says_add_it(tmp_path: Path) -> None:
    path = write(tmp_path, "linux-image-amd64/bookworm-backports")
    with pytest.raises(ConfigError) as info:
        load_recipe("x", recipe_dir=tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "packages[1]" in msg and "add it to extra_suites" in msg
    assert "suites now: bookworm" in msg


@pytest.mark.parametrize("package", ["linux-image-amd64/", "/bookworm", "a/b/c"])
def test_malformed_pin(tmp_path: Path, package: str) -> None:
    write(tmp_path, package, "extra_suites: [b]\n")
    with pytest.raises(ConfigError, match="write PACKAGE or PACKAGE/SUITE"):
        load_recipe("x", recipe_dir=tmp_path)


def test_backports_recipe_is_bookworm_plus_one_suite_and_one_pin() -> None:
    bookworm, bpo = load_recipe("bookworm"), load_recipe("bookworm-backports")
    assert bpo.suite == bookworm.suite and bpo.extra_suites == ("bookworm-backports",)
    assert set(bpo.packages) ^ set(bookworm.packages) == {
        "linux-image-amd64", "linux-image-amd64/bookworm-backports"}
    assert (bpo.xen_cmdline, bpo.dom0_cmdline, bpo.boot) == (
        bookworm.xen_cmdline, bookworm.dom0_cmdline, bookworm.boot)


def test_backports_build_command_has_the_suite_and_the_pin(tmp_path: Path) -> None:
    recipe = load_recipe("bookworm-backports")
    cmd = build_command(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root")
    assert f"deb {MIRROR} bookworm-backports main" in cmd
    (include,) = [a for a in cmd if a.startswith("--include=")]
    assert "linux-image-amd64/bookworm-backports" in include.split("=", 1)[1].split(",")


def test_trixie_recipe_takes_the_xen_420_tools() -> None:
    recipe = load_recipe("trixie")
    assert recipe.suite == "trixie" and "xen-utils-4.20" in recipe.packages
    assert not any(p.startswith("xen-utils-4.17") for p in recipe.packages)


def test_the_matrix_recipes_ship() -> None:
    assert {"bookworm", "bookworm-backports", "trixie"} <= set(available_recipes())
