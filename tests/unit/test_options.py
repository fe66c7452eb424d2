"""One option table (harness/options.py): every subcommand's every option reaches the
run configuration (or, for pytest's own options, the pytest option) the run sees;
`nested-xen run`'s through the pytest command line it starts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import cli, options, pytest_plugin
from harness.config import RunConfig

pytest_plugins = ["pytester"]

# Positional arguments a subcommand needs before its options.
POSITIONAL = {"images": ["build"], "bench": ["boot"], "inputs": ["bookworm"], "build-xen": ["SRC"],
              "build-kernel": ["SRC"], "bisect": ["SRC", "GOOD", "BAD"]}


def samples(tmp: Path) -> dict[str, tuple[list[str], Callable[[RunConfig], Any], Any]]:
    """Per option: its arguments, what to read back, and the value that must be there
    (none the default, so an option that is dropped on the way fails)."""
    yaml = tmp / "run.yaml"
    yaml.write_text("cpus: 3\n")
    return {
        "nx_config": (["--config", str(yaml)], lambda c: (c.source, c.cpus), (str(yaml), 3)),
        "host_images": (["--image", "trixie", "--image", "bookworm-backports,bookworm"],
                        lambda c: c.host_images, ("trixie", "bookworm-backports", "bookworm")),
        "backend": (["--backend", "libvirt"], lambda c: c.backend, "libvirt"),
        "libvirt_uri": (["--libvirt-uri", "qemu+ssh://root@h/system"], lambda c: c.libvirt_uri,
                        "qemu+ssh://root@h/system"),
        "accel": (["--accel", "tcg"], lambda c: c.accel, "tcg"),
        "dom0": (["--dom0", "pvh"], lambda c: c.dom0, "pvh"),
        "artifacts_dir": (["--artifacts-dir", str(tmp / "a")], lambda c: c.artifacts_dir, tmp / "a"),
        "cache_dir": (["--cache-dir", str(tmp / "c")], lambda c: c.resolved_cache_dir(), tmp / "c"),
        # a local mirror (no host name): the option's value reaches the run config as given
        "mirror": (["--mirror", f"file://{tmp}/mirror"], lambda c: c.mirror, f"file://{tmp}/mirror"),
        "snapshot": (["--snapshot", "off"], lambda c: c.snapshot, "off"),
        "rebuild": (["--rebuild"], lambda c: c.rebuild, True),
        "memory_mb": (["--memory-mb", "2048"], lambda c: c.memory_mb, 2048),
        "xen_dist": (["--xen-dist", str(tmp / "dist")], lambda c: c.inputs.xen_dist, str(tmp / "dist")),
        "xen_debs": (["--xen-debs", str(tmp / "debs")], lambda c: c.inputs.xen_debs, str(tmp / "debs")),
        "xen": (["--xen", str(tmp / "xen.gz")], lambda c: c.inputs.xen, str(tmp / "xen.gz")),
        "kernel": (["--kernel", str(tmp / "bz"), "--kernel-for", "guests"],
                   lambda c: (c.inputs.kernel, c.inputs.kernel_for), (str(tmp / "bz"), "guests")),
        "kernel_modules": (["--kernel-modules", str(tmp / "m")], lambda c: c.inputs.kernel_modules,
                           str(tmp / "m")),
        "kernel_for": (["--kernel-for", "dom0"], lambda c: c.inputs.kernel_for, "dom0"),
        "device_model": (["--device-model", str(tmp / "qemu")], lambda c: c.inputs.device_model,
                         str(tmp / "qemu")),
        # pytest's own options: read back with config.getoption(name).
        "strict_emulator": (["--strict-emulator", "on"], None, "on"),
        "known_issues": (["--known-issues", str(tmp / "k.yaml")], None, str(tmp / "k.yaml")),
        "nx_no_entry_points": (["--nx-no-entry-points"], None, True),
        "print_config": (["--print-config"], None, True),
    }


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def declared(parser: argparse.ArgumentParser) -> list[options.Option]:
    return [o for o in options.OPTIONS if o.flags[0] in parser._option_string_actions]


def test_every_option_has_a_sample(tmp_path: Path) -> None:
    assert set(samples(tmp_path)) == set(options.BY_NAME)


def test_the_subcommands_declare_the_table() -> None:
    subs = subcommands()
    assert [o.name for o in declared(subs["run"])] == [o.name for o in options.OPTIONS]
    config_scope = [o.name for o in options.OPTIONS if o.scope == "config"]
    for name in ("images", "boot", "bench"):
        assert [o.name for o in declared(subs[name])] == config_scope, name
    assert [o.name for o in declared(subs["build-xen"])] == ["nx_config", "cache_dir"]
    for name in ("doctor", "report", "new-plugin"):
        assert declared(subs[name]) == [], name


def _pytest_config(pytester: pytest.Pytester, args: argparse.Namespace) -> pytest.Config:
    """The pytest configuration `nested-xen run` would start pytest with."""
    return pytester.parseconfig(*cli.pytest_args(args))


def test_every_option_of_every_subcommand_reaches_the_run(pytester: pytest.Pytester, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NESTED_XEN_CACHE", raising=False)
    table = samples(tmp_path)
    walked = 0
    for sub, parser in subcommands().items():
        for o in declared(parser):
            argv, read, want = table[o.name]
            args = cli.build_parser().parse_args([sub, *POSITIONAL.get(sub, []), *argv])
            where = f"nested-xen {sub} {' '.join(argv)}"
            if sub == "run":
                config = _pytest_config(pytester, args)
                got = config.getoption(o.name) if read is None else read(pytest_plugin._build_config(config))
            elif read is None:  # a pytest option another subcommand hands on (bisect: --known-issues)
                got = getattr(args, o.name)
            else:
                got = read(cli._config(args))
            assert got == want, where
            walked += 1
    assert walked >= len(options.OPTIONS) + 3 * 19  # run has all; images, boot, bench the config's


def test_run_without_options_gives_pytest_the_defaults(pytester: pytest.Pytester) -> None:
    args = cli.build_parser().parse_args(["run", "--", "plugins/smoke.py", "-k", "boot"])
    assert cli.pytest_args(args) == ["-v", "-rA", "plugins/smoke.py", "-k", "boot"]
    config = _pytest_config(pytester, args)
    assert config.getoption("strict_emulator") == "auto"
    assert pytest_plugin._build_config(config) == RunConfig()


def test_run_hands_options_before_its_own_pytest_arguments(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["run", "--accel", "tcg", "--strict-emulator", "off",
                                          "--xen-dist", "rel/dist", "--", "-x"])
    assert cli.pytest_args(args) == ["plugins", "-v", "-rA", "--accel", "tcg",
                                     "--xen-dist", str(Path("rel/dist").resolve()),
                                     "--strict-emulator", "off", "-x"]


def test_bad_choices_are_refused_by_both_parsers(pytester: pytest.Pytester) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--strict-emulator", "maybe"])
    result = pytester.runpytest_inprocess("--strict-emulator", "maybe")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--strict-emulator*invalid choice*maybe*"])
