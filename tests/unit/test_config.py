"""Unit tests for harness.config: run configuration and host-image recipes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness.config import (
    ACCELS,
    RECIPE_DIR,
    BootFiles,
    ConfigError,
    HostRecipe,
    RunConfig,
    Timeouts,
    available_recipes,
    find_recipe,
    load_recipe,
    load_run_config,
)
from harness.imaging import image_key

MIRROR = "http://mirror.invalid/deb-mirror"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ run config


def test_defaults_validate() -> None:
    cfg = load_run_config(None)
    assert cfg == RunConfig()
    cfg.validate()
    assert cfg.host_images == ("bookworm",)
    assert cfg.accel == "auto" and cfg.backend == "qemu" and cfg.snapshot == "auto"
    assert cfg.timeouts == Timeouts()
    assert cfg.source == "<defaults>"


def test_good_file_is_loaded_with_types(tmp_path: Path) -> None:
    path = write(tmp_path, """\
host_images: [bookworm, other]
accel: tcg
memory_mb: 4096
cpus: 4
dom0: pvh
artifacts_dir: ~/nx-artifacts
cache_dir: /var/cache/nx
mirror: http://mirror.invalid/deb-mirror
rebuild: true
snapshot: refresh
timeouts:
  xen_banner: 30
  dom0_ssh: 600.5
""")
    cfg = load_run_config(path)
    assert cfg.source == str(path)
    assert cfg.host_images == ("bookworm", "other")
    assert cfg.accel == "tcg" and cfg.dom0 == "pvh" and cfg.snapshot == "refresh"
    assert cfg.memory_mb == 4096 and cfg.cpus == 4 and cfg.rebuild is True
    assert cfg.artifacts_dir == Path("~/nx-artifacts").expanduser()
    assert not str(cfg.artifacts_dir).startswith("~")
    assert cfg.cache_dir == Path("/var/cache/nx")
    assert cfg.mirror == MIRROR
    # Integers are accepted for float timeouts and converted; unset ones keep defaults.
    assert cfg.timeouts.xen_banner == 30.0 and isinstance(cfg.timeouts.xen_banner, float)
    assert cfg.timeouts.dom0_ssh == 600.5
    assert cfg.timeouts.command == Timeouts().command
    assert cfg.timeouts.workload == Timeouts().workload


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, "# nothing here\n"))
    assert dataclasses.replace(cfg, source="<defaults>") == RunConfig()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_broken_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "accel: tcg\ncpus: 2\nhost_images: [bookworm\nmemory_mb: 4096\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:")
    assert "invalid YAML" in msg
    # The flow sequence opened on line 3 is broken at line 4.
    assert " line 4, column " in msg
    assert "Traceback" not in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping.*got list"):
        load_run_config(write(tmp_path, "- accel\n- tcg\n"))


def test_unknown_key_names_key_and_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "acel: tcg\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "unknown key(s) acel" in msg
    valid = msg.split("valid keys: ", 1)[1].strip().split(", ")
    assert valid == sorted(f.name for f in dataclasses.fields(RunConfig) if f.name != "source")


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "memory_mb: lots\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    msg = str(info.value)
    assert str(path) in msg and "memory_mb" in msg
    assert "expected int" in msg and "'lots'" in msg


def test_bool_is_not_a_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cpus: expected a number, got True"):
        load_run_config(write(tmp_path, "cpus: yes\n"))


def test_string_key_rejects_a_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mirror: expected str"):
        load_run_config(write(tmp_path, "mirror: 42\n"))


def test_bad_choice_lists_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "accel: warp\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    msg = str(info.value)
    assert str(path) in msg and "accel" in msg and "'warp'" in msg
    assert "choose one of: " + ", ".join(ACCELS) in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("snapshot: sometimes\n", "choose one of: auto, off, refresh"),
        ("backend: vmware\n", "choose one of: qemu, libvirt"),
        ("dom0: hvm\n", "choose one of: pv, pvh"),
        ("memory_mb: 512\n", "memory_mb: Xen \\+ dom0 need >= 1024, got 512"),
        ("cpus: 0\n", "cpus: must be >= 1, got 0"),
        ("host_images: []\n", "host_images: list at least one"),
        ("host_images: [bookworm, 7]\n", "host_images\\[1\\]: expected str"),
        ("rebuild: maybe\n", "rebuild: expected bool"),
        ("migration: {two_host_guest_types: [pv, xen]}\n",
         "migration.two_host_guest_types: \\['xen'\\] invalid; choose from pv, pvh, hvm"),
        ("migration: {guest_types: [dom0]}\n", "migration.guest_types: \\['dom0'\\] invalid"),
    ],
)
def test_invalid_values(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_run_config(write(tmp_path, text))


def test_timeouts_unknown_sub_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(write(tmp_path, "timeouts:\n  xen_banner: 10\n  dom0_shh: 5\n"))
    msg = str(info.value)
    assert "timeouts: unknown key(s) dom0_shh" in msg
    for f in dataclasses.fields(Timeouts):
        assert f.name in msg


def test_timeouts_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timeouts.xen_banner: expected float, got 'fast'"):
        load_run_config(write(tmp_path, "timeouts:\n  xen_banner: fast\n"))


def test_timeouts_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timeouts: expected dict"):
        load_run_config(write(tmp_path, "timeouts: 30\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host_images: bookworm\n", ("bookworm",)),
        ("host_images: [bookworm]\n", ("bookworm",)),
        ("host_images:\n  - a\n  - b\n", ("a", "b")),
    ],
)
def test_host_images_string_or_list(tmp_path: Path, text: str, expected: tuple[str, ...]) -> None:
    assert load_run_config(write(tmp_path, text)).host_images == expected


def test_with_overrides_ignores_none() -> None:
    base = RunConfig(accel="tcg", mirror="http://a.invalid/deb-mirror")
    cfg = base.with_overrides(accel=None, mirror=None, snapshot="off", host_images=None)
    assert cfg.accel == "tcg" and cfg.mirror == "http://a.invalid/deb-mirror"
    assert cfg.snapshot == "off"
    assert base.snapshot == "auto"  # the original is not changed


def test_with_overrides_validates() -> None:
    with pytest.raises(ConfigError, match="accel: 'warp' is not valid"):
        RunConfig().with_overrides(accel="warp")


def test_resolved_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NESTED_XEN_CACHE", str(tmp_path / "env"))
    assert RunConfig().resolved_cache_dir() == tmp_path / "env"
    assert RunConfig(cache_dir=tmp_path / "cfg").resolved_cache_dir() == tmp_path / "cfg"
    monkeypatch.delenv("NESTED_XEN_CACHE")
    assert RunConfig().resolved_cache_dir().name == "nested-xen"


# ------------------------------------------------------------------ recipes

RECIPE = """\
name: {name}
suite: trixie
packages: [linux-image-amd64, xen-system-amd64]
"""


def test_there_are_recipes() -> None:
    assert "bookworm" in available_recipes()


@pytest.mark.parametrize("name", available_recipes())
def test_every_shipped_recipe_loads(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name  # the image directory is named after it
    assert recipe.path == RECIPE_DIR / f"{name}.yaml"
    assert recipe.suite and recipe.packages
    assert recipe.dom0 in ("pv", "pvh")
    assert recipe.description
    # The boot globs must be able to find Xen and the dom0 kernel.
    assert recipe.boot.xen.startswith("boot/") and recipe.boot.kernel.startswith("boot/")
    assert recipe.mirror is None, "recipes should not pin a mirror host (see bookworm.yaml)"


def test_bookworm_recipe_contents() -> None:
    recipe = load_recipe("bookworm")
    assert recipe.suite == "bookworm"
    assert {"xen-system-amd64", "linux-image-amd64", "openssh-server"} <= set(recipe.packages)
    assert recipe.boot == BootFiles()
    assert "console=com1" in recipe.xen_cmdline
    assert "\n" not in recipe.xen_cmdline  # folded scalar


def test_recipe_by_path(tmp_path: Path) -> None:
    path = write(tmp_path, RECIPE.format(name="mine"), "mine.yaml")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.path == path
    assert recipe.packages == ("linux-image-amd64", "xen-system-amd64")
    assert recipe.components == ("main",) and recipe.extra_suites == ()


def test_recipe_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nsuite: trixie\n", "x.yaml")
    with pytest.raises(ConfigError) as info:
        load_recipe("x", recipe_dir=tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "missing required key(s): packages" in msg


def test_recipe_unknown_key(tmp_path: Path) -> None:
    write(tmp_path, RECIPE.format(name="x") + "pakages: [foo]\n", "x.yaml")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) pakages; valid keys: .*packages"):
        load_recipe("x", recipe_dir=tmp_path)


def test_recipe_unknown_boot_key(tmp_path: Path) -> None:
    write(tmp_path, RECIPE.format(name="x") + "boot:\n  hypervisor: boot/xen.gz\n", "x.yaml")
    expected = "boot: unknown key\\(s\\) hypervisor; valid keys: initrd, kernel, xen"
    with pytest.raises(ConfigError, match=expected):
        load_recipe("x", recipe_dir=tmp_path)


def test_recipe_bad_dom0(tmp_path: Path) -> None:
    write(tmp_path, RECIPE.format(name="x") + "dom0: hvm\n", "x.yaml")
    with pytest.raises(ConfigError, match="dom0: 'hvm' is not valid; choose one of: pv, pvh"):
        load_recipe("x", recipe_dir=tmp_path)


def test_recipe_packages_must_be_a_list(tmp_path: Path) -> None:
    write(tmp_path, "name: x\nsuite: trixie\npackages: xen-system-amd64\n", "x.yaml")
    with pytest.raises(ConfigError, match="packages: expected list"):
        load_recipe("x", recipe_dir=tmp_path)


def test_unknown_recipe_lists_available(tmp_path: Path) -> None:
    write(tmp_path, RECIPE.format(name="alpha"), "alpha.yaml")
    write(tmp_path, RECIPE.format(name="beta"), "beta.yaml")
    with pytest.raises(ConfigError) as info:
        load_recipe("gamma", recipe_dir=tmp_path)
    msg = str(info.value)
    assert "unknown host image 'gamma'" in msg and "alpha, beta" in msg and str(tmp_path) in msg


def test_unknown_recipe_in_shipped_dir_lists_bookworm() -> None:
    with pytest.raises(ConfigError, match="available recipes in .*bookworm"):
        find_recipe("no-such-recipe")


def test_unknown_recipe_in_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="\\(none\\)"):
        find_recipe("x", recipe_dir=tmp_path)


# ------------------------------------------------------------------ key material


def recipe() -> HostRecipe:
    return load_recipe("bookworm")


@pytest.mark.parametrize(
    "change",
    [
        {"xen_cmdline": "console=com1 loglvl=none"},
        {"dom0_cmdline": "root=/dev/vda ro"},
        {"memory_mb": 8192},
        {"dom0_mem_mb": 2048},
        {"dom0": "pvh"},
        {"description": "something else"},
        {"path": Path("/elsewhere/bookworm.yaml")},
    ],
)
def test_boot_time_keys_do_not_change_image_key(change: dict) -> None:
    base = recipe()
    changed = dataclasses.replace(base, **change)
    assert changed != base
    assert image_key(changed, MIRROR) == image_key(base, MIRROR)
    assert set(change).isdisjoint(base.key_material())


@pytest.mark.parametrize(
    "change",
    [
        {"packages": ("systemd-sysv", "xen-system-amd64")},
        {"suite": "trixie"},
        {"components": ("main", "contrib")},
        {"extra_suites": ("bookworm-updates",)},
        {"free_space_mb": 4096},
        {"boot": BootFiles(kernel="boot/vmlinuz-6.*")},
    ],
)
def test_disk_shaping_keys_change_image_key(change: dict) -> None:
    base = recipe()
    assert image_key(dataclasses.replace(base, **change), MIRROR) != image_key(base, MIRROR)


def test_mirror_changes_image_key() -> None:
    assert image_key(recipe(), MIRROR) != image_key(recipe(), "http://other.invalid/deb-mirror")


def test_image_key_is_stable_hex() -> None:
    key = image_key(recipe(), MIRROR)
    assert key == image_key(recipe(), MIRROR)
    assert len(key) == 16 and int(key, 16) >= 0


def test_two_host_guest_types_are_read(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, "migration: {two_host_guest_types: [pv, pvh]}\n"))
    assert cfg.migration.two_host_guest_types == ("pv", "pvh")
    assert RunConfig().migration.two_host_guest_types == ("pv",)
    off = load_run_config(write(tmp_path, "migration: {two_host_guest_types: []}\n", "off.yaml"))
    assert off.migration.two_host_guest_types == ()


def test_unknown_host_images_are_one_error_listing_the_recipes(tmp_path: Path) -> None:
    from harness.config import check_host_images

    (tmp_path / "bookworm.yaml").write_text("")
    (tmp_path / "trixie.yaml").write_text("")
    check_host_images(("bookworm", "trixie"), tmp_path)
    with pytest.raises(ConfigError, match=r"unknown host images 'bookwrom', 'sid'; available recipes in "
                                          r".*: bookworm, trixie"):
        check_host_images(("bookwrom", "trixie", "sid"), tmp_path)


def test_a_typo_in_host_image_stops_the_run_before_anything_boots(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest_inprocess("--host-image", "bookwrom")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown host image 'bookwrom'; available recipes in *bookworm*"])
