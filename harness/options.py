"""Every run option, declared once: `nested-xen`'s parsers, pytest's ``addoption`` and
the run configuration's overrides are all made from :data:`OPTIONS`.

An option's ``name`` is its destination on both command lines (``args.<name>``,
``config.getoption("<name>")``); ``key`` is the :class:`~harness.config.RunConfig`
field it sets (``inputs.<key>`` for an own-build input, ``source`` for the YAML file
itself; ``None``: a pytest option the run configuration does not hold). ``nested-xen
run`` hands every option it was given on to pytest (:func:`pytest_args`), so an option
of ``run`` always reaches the run.

A leaf module (the standard library only): the choices live here, and the run
configuration (harness/config.py) and the inputs (harness/inputs.py) validate
against these same tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BACKENDS = ("qemu", "libvirt")
ACCELS = ("auto", "kvm", "tcg")
SNAPSHOT_MODES = ("auto", "off", "refresh")
DOM0_MODES = ("pv", "pvh")
KERNEL_FOR = ("dom0", "guests", "both")
STRICT_EMULATOR = ("on", "off", "auto")

# What an option's value is: a string, an int, a path (made absolute for pytest), a
# repeatable list (also comma-separated), or a flag (present or not).
KINDS = ("str", "int", "path", "list", "flag")
# Who has it: "config" options are run-config overrides every running subcommand
# (images, boot, bench, run) and pytest take; "pytest" options only `run` and pytest.
SCOPES = ("config", "pytest")


@dataclass(frozen=True)
class Option:
    name: str
    flags: tuple[str, ...]  # nested-xen's spelling
    help: str
    key: str | None = None  # the RunConfig field it sets
    kind: str = "str"
    choices: tuple[str, ...] | None = None
    default: Any = None  # pytest's default (None: the run configuration decides)
    metavar: str | None = None
    pytest_flags: tuple[str, ...] = ()  # pytest's spelling, when it differs
    scope: str = "config"

    @property
    def pytest(self) -> tuple[str, ...]:
        return self.pytest_flags or self.flags

    def kwargs(self) -> dict[str, Any]:
        """add_argument / addoption keywords (without the default)."""
        out: dict[str, Any] = {"dest": self.name, "help": self.help}
        if self.kind == "flag":
            out["action"] = "store_true"
            return out
        if self.kind == "list":
            out["action"] = "append"
        if self.kind == "int":
            out["type"] = int
        if self.choices:
            out["choices"] = list(self.choices)
        if self.metavar:
            out["metavar"] = self.metavar
        return out


OPTIONS: tuple[Option, ...] = (
    Option("nx_config", ("--config",), "run configuration file", key="source", kind="path",
           metavar="YAML", pytest_flags=("--nx-config",)),
    Option("host_images", ("--image",), "host image recipe (images/hosts/NAME.yaml); repeat or "
           "comma-separate", key="host_images", kind="list", metavar="NAME", pytest_flags=("--host-image",)),
    Option("backend", ("--backend",), "L1 machine backend", key="backend", choices=BACKENDS),
    Option("libvirt_uri", ("--libvirt-uri",), "libvirt connection for --backend libvirt "
           "(default qemu:///system)", key="libvirt_uri", metavar="URI"),
    Option("accel", ("--accel",), "QEMU accelerator", key="accel", choices=ACCELS),
    Option("dom0", ("--dom0",), "dom0 mode (overrides the recipe)", key="dom0", choices=DOM0_MODES),
    Option("artifacts_dir", ("--artifacts-dir",), "where logs and reports go", key="artifacts_dir",
           kind="path", metavar="DIR"),
    Option("cache_dir", ("--cache-dir",), "image and snapshot cache (default: $NESTED_XEN_CACHE, "
           "else the user cache)", key="cache_dir", kind="path", metavar="DIR"),
    Option("mirror", ("--mirror",), "Debian mirror for image builds", key="mirror", metavar="URL"),
    Option("snapshot", ("--snapshot",), "L1 snapshots: use/create (auto), never (off), recreate (refresh)",
           key="snapshot", choices=SNAPSHOT_MODES),
    Option("rebuild", ("--rebuild",), "rebuild images and drop snapshots", key="rebuild", kind="flag"),
    Option("memory_mb", ("--memory-mb",), "L1 memory in MiB", key="memory_mb", kind="int", metavar="MIB"),
    # Own-build inputs over every host image's recipe (harness/inputs.py).
    Option("xen_dist", ("--xen-dist",), "a Xen `make dist` (or `make install DESTDIR=`) tree",
           key="inputs.xen_dist", kind="path", metavar="PATH"),
    Option("xen_debs", ("--xen-debs",), "a directory of Xen .debs", key="inputs.xen_debs", kind="path",
           metavar="PATH"),
    Option("xen", ("--xen",), "a Xen hypervisor file (xen-*.gz); the tools stay the recipe's",
           key="inputs.xen", kind="path", metavar="PATH"),
    Option("kernel", ("--kernel",), "a Linux bzImage", key="inputs.kernel", kind="path", metavar="PATH"),
    Option("kernel_modules", ("--kernel-modules",), "the tree `make modules_install INSTALL_MOD_PATH=` "
           "wrote", key="inputs.kernel_modules", kind="path", metavar="PATH"),
    Option("kernel_for", ("--kernel-for",), "who boots --kernel: dom0, guests or both (default both)",
           key="inputs.kernel_for", choices=KERNEL_FOR),
    Option("device_model", ("--device-model",), "a qemu-system-i386 built against the Xen under test",
           key="inputs.device_model", kind="path", metavar="PATH"),
    # pytest's own (the run configuration does not hold them).
    Option("strict_emulator", ("--strict-emulator",), "a check that passed only after an emulator "
           "fault (rerun on a fresh guest) fails the run; auto: on under KVM, off under TCG",
           choices=STRICT_EMULATOR, default="auto", scope="pytest"),
    Option("known_issues", ("--known-issues",), "known issues file (default: the repository's "
           "known_issues.yaml)", kind="path", metavar="YAML", scope="pytest"),
    Option("nx_no_entry_points", ("--nx-no-entry-points",), "do not collect checks from installed "
           "packages' nested_xen.plugins entry points", kind="flag", scope="pytest"),
    Option("print_config", ("--print-config",), "print the effective config and exit", kind="flag",
           scope="pytest"),
)
BY_NAME = {o.name: o for o in OPTIONS}
INPUT_PREFIX = "inputs."

Getter = Callable[[str], Any]


def selected(names: Iterable[str] | None = None, scopes: Iterable[str] = SCOPES) -> list[Option]:
    """The options named (all, when None) in ``scopes``, in table order."""
    wanted = set(BY_NAME if names is None else names)
    unknown = wanted - set(BY_NAME)
    if unknown:
        raise KeyError(f"no such option(s): {', '.join(sorted(unknown))}")
    return [o for o in OPTIONS if o.name in wanted and o.scope in set(scopes)]


def add_arguments(parser: Any, names: Iterable[str] | None = None,
                  scopes: Iterable[str] = ("config",)) -> None:
    """Declare options on an argparse parser (defaults None: given or not, never guessed)."""
    for o in selected(names, scopes):
        parser.add_argument(*o.flags, default=None, **o.kwargs())


def add_pytest_options(addoption: Callable[..., None]) -> None:
    """Declare every option with a pytest group's ``addoption``."""
    for o in OPTIONS:
        addoption(*o.pytest, default=o.default, **o.kwargs())


def given(value: Any) -> bool:
    return value not in (None, False, [], ())


def converted(o: Option, value: Any) -> Any:
    """A given value as the run configuration holds it."""
    if o.kind == "list":
        return tuple(n.strip() for arg in value for n in str(arg).split(",") if n.strip())
    if o.kind == "path":
        return Path(str(value)).expanduser()
    if o.kind == "flag":
        return True
    return value


def overrides(get: Getter) -> dict[str, Any]:
    """RunConfig.with_overrides keywords for the options given (not the YAML file, not inputs)."""
    out = {}
    for o in OPTIONS:
        if o.key and o.key != "source" and not o.key.startswith(INPUT_PREFIX) and given(get(o.name)):
            out[o.key] = converted(o, get(o.name))
    return out


def input_values(get: Getter) -> dict[str, str]:
    """The own-build inputs given: {Inputs key: value as given}."""
    return {o.key[len(INPUT_PREFIX):]: str(get(o.name)) for o in OPTIONS
            if o.key and o.key.startswith(INPUT_PREFIX) and given(get(o.name))}


def pytest_args(get: Getter, names: Iterable[str] | None = None) -> list[str]:
    """The pytest command line for the options given (paths absolute: pytest may run elsewhere)."""
    out: list[str] = []
    for o in selected(names):
        value = get(o.name)
        if not given(value):
            continue
        flag = o.pytest[0]
        if o.kind == "flag":
            out.append(flag)
        elif o.kind == "list":
            for item in value:
                out += [flag, str(item)]
        elif o.kind == "path":
            out += [flag, str(Path(str(value)).expanduser().resolve())]
        else:
            out += [flag, str(value)]
    return out
