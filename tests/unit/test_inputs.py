"""Own-build inputs: parsing, checks before a build, content keys, the image build's command."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from harness import input_image
from harness.config import ConfigError, load_recipe, load_run_config
from harness.imaging import ImageBuilder, ImageError, build_command, image_key
from harness.inputs import (
    InputError,
    Inputs,
    bzimage_version,
    check,
    content_digest,
    from_options,
    parse_inputs,
)
from harness.results import CheckResult, image_label, xen_label

MIRROR = "http://mirror.invalid/deb-mirror"


def elf(path: Path, machine: int = 0x3E) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = b"\x7fELF\x02\x01\x01" + b"\0" * 11 + machine.to_bytes(2, "little")
    path.write_bytes(head + b"\0" * 44)
    return path


def dist_tree(root: Path, machine: int = 0x3E) -> Path:
    install = root / "dist" / "install"
    (install / "boot").mkdir(parents=True)
    (install / "boot/xen-4.22.0.gz").write_bytes(b"gz")
    (install / "boot/xen.gz").symlink_to("xen-4.22.0.gz")
    elf(install / "usr/local/sbin/xl")
    elf(install / "usr/local/lib/libxenlight.so.4.22.0", machine)
    (install / "usr/local/lib/systemd/system").mkdir(parents=True)
    (install / "usr/local/lib/systemd/system/xenstored.service").write_text("[Unit]\n")
    return root / "dist"


def bzimage(path: Path, release: str = "6.18.0-nx") -> Path:
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    text = f"{release} (dev@box) #1 SMP".encode()
    data[0x400:0x400 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


def modules(root: Path, release: str = "6.18.0-nx") -> Path:
    d = root / "mods/lib/modules" / release
    d.mkdir(parents=True)
    (d / "modules.builtin").write_text("kernel/drivers/xen/xen-privcmd.ko\n")
    return root / "mods"


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("value, message", [
    ({"xen_tree": "x"}, "unknown key(s) xen_tree"),
    ({"xen_dist": "a", "xen_debs": "b"}, "not both"),
    ({"kernel": "bz"}, "needs kernel_modules"),
    ({"kernel": "bz", "kernel_for": "dom1"}, "choose one of dom0, guests, both"),
    ({"xen_dist": 3}, "expected a path"),
    ("dist", "expected a mapping"),
])
def test_parse_inputs_names_the_problem(value: object, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_inputs("cfg.yaml", value)


def test_guest_kernel_needs_no_modules() -> None:
    inputs = parse_inputs("cfg", {"kernel": "bz", "kernel_for": "guests"})
    assert inputs.guest_kernel and not inputs.dom0_kernel
    assert inputs.label() == "kernel(guests)"


def test_run_config_inputs_and_options(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("inputs:\n  xen_debs: debs\n  device_model: qemu\n")
    loaded = load_run_config(cfg)
    assert loaded.inputs == Inputs(xen_debs="debs", device_model="qemu")
    opts = {"kernel": "bz", "kernel_for": "guests"}  # option names (harness/options.py)
    merged = from_options(opts.get, loaded.inputs)
    assert merged.xen_debs == "debs" and merged.kernel == str(Path("bz").resolve())
    assert merged.kernel_for == "guests"
    cfg.write_text("inputs:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_run_config(cfg)


def test_resolved_paths_are_under_the_inputs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NX_TEST_DIR", str(tmp_path / "abs"))
    inputs = Inputs(xen_dist="bookworm/tree", xen="$NX_TEST_DIR/xen.gz").resolved(tmp_path / "in")
    assert inputs.xen_dist == str(tmp_path / "in/bookworm/tree")
    assert inputs.xen == str(tmp_path / "abs/xen.gz")


# ------------------------------------------------------------------ checks


def test_dist_tree_is_found_under_dist(tmp_path: Path) -> None:
    found = check(Inputs(xen_dist=str(dist_tree(tmp_path))))
    assert found["xen_root"] == str(tmp_path / "dist/install")


@pytest.mark.parametrize("remove, message", [
    ("boot", "no boot/xen"),
    ("usr/local/sbin/xl", "has no tools: expected usr/local/sbin/xl"),
    ("usr/local/lib/libxenlight.so.4.22.0", "no libxenlight.so"),
    ("usr/local/lib/systemd", "neither systemd units"),
])
def test_dist_tree_lacking_a_part_is_named(tmp_path: Path, remove: str, message: str) -> None:
    dist = dist_tree(tmp_path)
    target = dist / "install" / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(InputError, match=message):
        check(Inputs(xen_dist=str(dist)))


def test_dist_tree_for_another_architecture(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="ELF machine 183, not x86-64"):
        check(Inputs(xen_dist=str(dist_tree(tmp_path, machine=183))))


def test_missing_paths_and_non_elf_device_model(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is not a directory"):
        check(Inputs(xen_dist=str(tmp_path / "nope")))
    with pytest.raises(InputError, match="no \\*.deb files"):
        check(Inputs(xen_debs=str(tmp_path)))
    (tmp_path / "qemu").write_text("#!/bin/sh\n")
    with pytest.raises(InputError, match="not an ELF executable"):
        check(Inputs(device_model=str(tmp_path / "qemu")))


def test_bzimage_release_and_its_modules(tmp_path: Path) -> None:
    bz = bzimage(tmp_path / "bzImage")
    assert bzimage_version(bz) == "6.18.0-nx"
    found = check(Inputs(kernel=str(bz), kernel_modules=str(modules(tmp_path))))
    assert found["kernel_release"] == "6.18.0-nx"
    other = modules(tmp_path / "o", "6.1.0")
    with pytest.raises(InputError, match="no 6.18.0-nx/ for the bzImage \\(it has 6.1.0\\)"):
        check(Inputs(kernel=str(bz), kernel_modules=str(other)))
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 0x300)
    with pytest.raises(InputError, match="not an x86 bzImage"):
        bzimage_version(tmp_path / "vmlinux")


# ------------------------------------------------------------------ keys


def test_content_digest_follows_content_not_place(tmp_path: Path) -> None:
    dist = dist_tree(tmp_path / "a")
    first = content_digest(dist)
    shutil.copytree(dist, tmp_path / "b", symlinks=True)
    assert content_digest(tmp_path / "b") == first
    (dist / "install/usr/local/sbin/xl").write_bytes(b"\x7fELF changed")
    assert content_digest(dist) != first


def test_image_key_covers_inputs_and_keeps_plain_keys(tmp_path: Path) -> None:
    plain = load_recipe("bookworm")
    assert "inputs" not in plain.key_material()
    dist = dist_tree(tmp_path)
    own = dataclasses.replace(plain, inputs=Inputs(xen_dist=str(dist)))
    key = image_key(own, MIRROR)
    assert key != image_key(plain, MIRROR)
    (dist / "install/boot/xen-4.22.0.gz").write_bytes(b"other")
    assert image_key(own, MIRROR) != key


def test_base_recipes_take_the_base_keys() -> None:
    own = load_recipe("bookworm-own-tree")
    base = load_recipe("bookworm")
    assert own.packages == base.packages and own.xen_cmdline == base.xen_cmdline
    assert own.inputs == Inputs(xen_dist="bookworm/tree")


# ------------------------------------------------------------------ the build


def test_build_command_with_a_dist_tree(tmp_path: Path) -> None:
    dist = dist_tree(tmp_path)
    recipe = dataclasses.replace(load_recipe("bookworm"), inputs=Inputs(xen_dist=str(dist)))
    found = check(recipe.inputs)
    cmd = build_command(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root", found=found)
    include = next(c for c in cmd if c.startswith("--include="))
    assert "xen-utils-4.17" not in include and "qemu-system-xen" not in include
    assert "libyajl2" in include and "linux-image-amd64" in include
    hooks = " ".join(cmd)
    assert f"tar -C {dist / 'install'}" in hooks and "--keep-directory-symlink" in hooks
    assert "systemctl enable $units" in hooks and "ldd" in hooks
    assert "XENCONSOLED_TRACE=guest" in hooks and "etc/nested-xen/inputs" in hooks


def test_build_command_with_a_kernel_and_debs(tmp_path: Path) -> None:
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs/xen-hypervisor-4.17-amd64_1_amd64.deb").write_bytes(b"")
    inputs = Inputs(xen_debs=str(tmp_path / "debs"), kernel=str(bzimage(tmp_path / "bz")),
                    kernel_modules=str(modules(tmp_path)))
    recipe = dataclasses.replace(load_recipe("bookworm"), inputs=inputs)
    cmd = build_command(recipe, MIRROR, tmp_path / "o", tmp_path / "s", tmp_path / "t", "root",
                        found={"kernel_release": "6.18.0-nx"})
    assert f"--include={tmp_path / 'debs/xen-hypervisor-4.17-amd64_1_amd64.deb'}" in cmd
    assert f"--hook-dir={input_image.FILE_MIRROR_HOOKS}" in cmd
    include = next(c for c in cmd if c.startswith("--include=systemd"))
    assert "linux-image-amd64" not in include and "initramfs-tools" in include
    hooks = " ".join(cmd)
    assert "depmod 6.18.0-nx" in hooks and "update-initramfs -c -k 6.18.0-nx" in hooks
    assert "xen-privcmd" in hooks


def test_bad_input_fails_before_anything_is_in_the_cache(tmp_path: Path) -> None:
    recipe = dataclasses.replace(load_recipe("bookworm"), inputs=Inputs(xen_dist=str(tmp_path / "none")))
    builder = ImageBuilder(tmp_path / "cache", mirror=MIRROR)
    with pytest.raises(ImageError, match="recipe bookworm: inputs: xen_dist: .* is not a directory"):
        builder.get(recipe)
    assert not (tmp_path / "cache").exists() or not any(os.scandir(tmp_path / "cache"))


def test_newest_xen_skips_links(tmp_path: Path) -> None:
    boot = dist_tree(tmp_path) / "install/boot"
    (boot / "xen-4.9.0.gz").write_bytes(b"")
    assert input_image.newest_xen(boot) == boot / "xen-4.22.0.gz"


# ------------------------------------------------------------------ the summary


def test_image_column_says_where_the_build_came_from() -> None:
    assert image_label("bookworm", "debian") == "bookworm"
    assert image_label("bookworm", "xen_dist") == "bookworm (xen_dist)"
    r = CheckResult("n", "smoke", "c", xen_version="4.22.0", xen_changeset="Tue Jul 29 git:0123abcd")
    assert xen_label(r) == "4.22.0 (git:0123abcd)"


def test_build_xen_rejects_a_tree_that_is_not_xen(tmp_path: Path) -> None:
    from harness.ownbuild import BuildError, build_xen, xen_configure_flags

    with pytest.raises(BuildError, match="not a Xen source tree"):
        build_xen(tmp_path, tmp_path / "cache", 1)
    flags = xen_configure_flags()
    assert "--disable-stubdom" in flags and "--disable-docs" in flags
    assert any(f.startswith(("--with-system-seabios=", "--disable-seabios")) for f in flags)


def test_kernel_build_names_the_packages_it_lacks(tmp_path: Path, monkeypatch) -> None:
    from harness import ownbuild

    src = tmp_path / "linux"
    (src / "arch" / "x86").mkdir(parents=True)
    (src / "Kbuild").write_text("")
    bin_dir = tmp_path / "bin"  # every kernel tool but flex
    bin_dir.mkdir()
    for tool in ownbuild.KERNEL_TOOLS:
        if tool != "flex":
            (bin_dir / tool).write_text("#!/bin/sh\n")
            (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(ownbuild, "KERNEL_HEADERS", {str(tmp_path / "no" / "gelf.h"): "libelf-dev"})
    assert ownbuild.kernel_build_missing() == ["flex", "libelf-dev"]
    with pytest.raises(ownbuild.BuildError, match="apt-get install flex libelf-dev"):
        ownbuild.build_kernel(src, tmp_path / "cache", 1)
    assert not (tmp_path / "cache").exists(), "nothing built, nothing left in the cache"


def test_build_xen_sets_kconfig_options_and_says_when_one_is_dropped(tmp_path: Path, monkeypatch) -> None:
    """`build-xen --kconfig CONFIG_SHADOW_PAGING=y`: Xen 4.22's default config leaves shadow
    paging out, so its PV guests cannot live-migrate; the option goes into xen/.config and
    must survive olddefconfig (here a fake olddefconfig drops one to show the error)."""
    from harness import ownbuild

    with pytest.raises(ownbuild.BuildError, match="expected CONFIG_NAME=VALUE"):
        ownbuild.parse_kconfig(["SHADOW_PAGING=y"])
    wanted = ownbuild.parse_kconfig(["CONFIG_SHADOW_PAGING=y", "CONFIG_HVM=n"])
    config = tmp_path / "xen" / ".config"
    config.parent.mkdir()
    config.write_text("CONFIG_PV=y\n# CONFIG_SHADOW_PAGING is not set\nCONFIG_HVM=y\n")
    ownbuild.apply_kconfig(config, wanted)
    assert config.read_text().splitlines() == ["CONFIG_PV=y", "CONFIG_SHADOW_PAGING=y",
                                               "# CONFIG_HVM is not set"]
    assert ownbuild.kconfig_lost(config, wanted) == []

    def olddefconfig(cmd, cwd, log, offline=True):  # drops shadow paging, as an unmet dependency would
        if cmd[-1] == "olddefconfig":
            text = config.read_text()
            config.write_text(text.replace("CONFIG_SHADOW_PAGING=y", "# CONFIG_SHADOW_PAGING is not set"))

    monkeypatch.setattr(ownbuild, "_step", olddefconfig)
    with pytest.raises(ownbuild.BuildError, match="CONFIG_SHADOW_PAGING=y did not survive"):
        ownbuild._configure_hypervisor(tmp_path, wanted, tmp_path / "log")
