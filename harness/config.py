"""YAML run configuration and host-image recipes -> typed, validated objects.

Every error names the file and the key, and lists the valid choices, so a user
can fix a typo without reading this code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import yaml

from . import timeouts as t
from .cross_version import CrossPair, parse_pairs
from .inputs import InputError, Inputs, from_options, parse_inputs
from .inputs import key_material as inputs_key_material
from .options import ACCELS, BACKENDS, DOM0_MODES, SNAPSHOT_MODES, Getter, overrides

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "images" / "hosts"


class ConfigError(Exception):
    """A configuration or recipe problem the user can fix; the message says how."""


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds, one per readiness stage and command class."""

    xen_banner: float = t.XEN_BANNER_S  # each default's reason: harness/timeouts.py
    dom0_kernel: float = t.DOM0_KERNEL_S
    dom0_ssh: float = t.DOM0_SSH_S
    command: float = t.COMMAND_S
    guest_ready: float = t.GUEST_READY_S
    workload: float = t.WORKLOAD_S


@dataclass(frozen=True)
class MigrationConfig:
    """What the migration plugin measures, and the budgets that fail it."""

    guest_types: tuple[str, ...] = ("pv", "pvh", "hvm")
    # Guest types migrated between two linked L1s (a second L1 is restored for it);
    # empty turns the two-host check off.
    two_host_guest_types: tuple[str, ...] = ("pv",)
    memory_mb: tuple[int, ...] = (256,)
    # idle | dirty:<percent of the 16 MiB dirty buffer rewritten per second>. The default makes
    # pre-copy iterate: 40 % is 1638 pages/s; measured here (bookworm, TCG, the same page rate
    # on a 64 MiB buffer) a PVH guest's localhost migration took 6 iterations re-sending
    # 16533, 3927, 919, 325 and 466 pages, an HVM guest's 5.
    workloads: tuple[str, ...] = ("dirty:40",)
    repeats: int = 1  # per kind and guest type; nightly: 3 (a two-host repeat is A->B->A)
    tick_ms: int = 20
    # Relay `xl migrate`'s stream through harness/agent/nxstream.py to count pre-copy
    # iterations and pages per iteration (Xen 4.17's xl prints neither); off: plain ssh.
    stream_stats: bool = True
    # How the stream goes from dom0 to dom0: "tcp" (nxstream.py serve/connect, plain,
    # on 127.0.0.1 or the private link: under TCG ssh's emulated cipher costs more
    # than the migration) or "ssh" (xl's default; counted with stream_stats).
    transport: str = "tcp"
    max_total_s: float | None = None
    max_downtime_s: float | None = None
    # (source, destination) host-image pairs migrated both ways across Xen versions
    # (plugins/cross_version.py, harness/cross_version.py): which is old is the booted Xens'.
    # Empty: none (the default; configs/cross-version.yaml lists one).
    cross_version: tuple[CrossPair, ...] = ()


# How PVH and HVM guests' memory is translated: "hap" (Xen's default: EPT/NPT, emulated
# under TCG) or "shadow" (the xl config's `hap = 0`: Xen's shadow page tables).
PAGING_MODES = ("hap", "shadow")


@dataclass(frozen=True)
class GuestsConfig:
    """How the run's L2 guests are created (`guests:` in the run config)."""

    paging: str = "hap"  # a PAGING_MODES entry, for PVH and HVM guests (PV has neither)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, after merging YAML and command-line options."""

    host_images: tuple[str, ...] = ("bookworm",)
    backend: str = "qemu"
    accel: str = "auto"
    memory_mb: int | None = None
    cpus: int = 2
    dom0: str | None = None
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path | None = None
    mirror: str | None = None
    # Build even when a suite's Release file is past its Valid-Until (snapshot mirrors,
    # testing/unstable on a stale mirror): apt's Acquire::Check-Valid-Until=false.
    allow_expired_release: bool = False
    rebuild: bool = False
    snapshot: str = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    libvirt_uri: str = "qemu:///system"
    # Shared guests created before the L1 snapshot is saved, so restores bring them up ready.
    snapshot_guests: tuple[str, ...] = ("pv", "pvh", "hvm")
    # How many checks a run may run again after an emulator fault (a guest death whose
    # evidence shows a known_issues.yaml guest-death signature); one rerun per check.
    emulator_fault_reruns: int = 6
    # Your own Xen / kernel / device model over every host image's recipe (harness/inputs.py).
    inputs: Inputs = field(default_factory=Inputs)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    guests: GuestsConfig = field(default_factory=GuestsConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    source: str = "<defaults>"

    def with_overrides(self, **changes: Any) -> RunConfig:
        """Return a copy with the non-None values in ``changes`` applied, validated."""
        real = {k: v for k, v in changes.items() if v is not None}
        cfg = dataclasses.replace(self, **real)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _choice(self.source, "backend", self.backend, BACKENDS)
        _choice(self.source, "accel", self.accel, ACCELS)
        _choice(self.source, "snapshot", self.snapshot, SNAPSHOT_MODES)
        if "://" not in self.libvirt_uri:
            raise ConfigError(f"{self.source}: libvirt_uri: {self.libvirt_uri!r} is not a libvirt URI; "
                              "e.g. qemu:///system or qemu+ssh://root@HOST/system")
        if self.dom0 is not None:
            _choice(self.source, "dom0", self.dom0, DOM0_MODES)
        if not self.host_images:
            raise ConfigError(f"{self.source}: host_images: list at least one recipe name")
        if self.emulator_fault_reruns < 0:
            raise ConfigError(f"{self.source}: emulator_fault_reruns: must be >= 0 (0: never rerun), "
                              f"got {self.emulator_fault_reruns}")
        if self.cpus < 1:
            raise ConfigError(f"{self.source}: cpus: must be >= 1, got {self.cpus}")
        if self.memory_mb is not None and self.memory_mb < 1024:
            raise ConfigError(f"{self.source}: memory_mb: Xen + dom0 need >= 1024, got {self.memory_mb}")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        env = os.environ.get("NESTED_XEN_CACHE")
        if env:
            return Path(env)
        return Path(platformdirs.user_cache_dir("nested-xen"))


def _choice(source: str, key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{source}: {key}: {value!r} is not valid; choose one of: {', '.join(choices)}"
        )


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _check_keys(source: str, data: dict[str, Any], allowed: set[str], where: str = "") -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{source}: {where}unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(allowed))}"
        )


def _typed(source: str, key: str, value: Any, typ: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and typ in (int, float):
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if typ is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, typ):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise ConfigError(f"{source}: {key}: expected {names}, got {value!r}")
    return value


def load_run_config(path: Path | None) -> RunConfig:
    """Load a run configuration; ``None`` gives the defaults."""
    if path is None:
        cfg = RunConfig()
        cfg.validate()
        return cfg
    source = str(path)
    data = _load_yaml(path)
    allowed = {f.name for f in dataclasses.fields(RunConfig)} - {"source"}
    _check_keys(source, data, allowed)
    kwargs: dict[str, Any] = {"source": source}
    for key, value in data.items():
        kwargs[key] = _convert_run_key(source, key, value)
    cfg = RunConfig(**kwargs)
    cfg.validate()
    return cfg


def run_config_from_options(get: Getter) -> RunConfig:
    """The run configuration a command line asks for (``get(option name)``, harness/options.py):
    its YAML file (``--config`` / ``--nx-config``), with the options given over it."""
    path = get("nx_config")
    cfg = load_run_config(Path(path).expanduser() if path else None)
    try:
        inputs = from_options(get, cfg.inputs)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.with_overrides(inputs=inputs, **overrides(get))


def run_config_from_args(args: Any) -> RunConfig:
    """:func:`run_config_from_options` for parsed arguments (an argparse namespace)."""
    return run_config_from_options(lambda name: getattr(args, name, None))


def _convert_run_key(source: str, key: str, value: Any) -> Any:
    if key == "host_images":
        if isinstance(value, str):
            value = [value]
        items = _typed(source, key, value, list)
        return tuple(_typed(source, f"{key}[{i}]", v, str) for i, v in enumerate(items))
    if key == "snapshot_guests":
        items = _typed(source, key, value, list)
        bad = [v for v in items if v not in ("pv", "pvh", "hvm")]
        if bad:
            raise ConfigError(f"{source}: snapshot_guests: {bad} invalid; choose from pv, pvh, hvm")
        return tuple(items)
    if key == "inputs":
        try:
            return parse_inputs(source, value)
        except InputError as exc:
            raise ConfigError(str(exc)) from None
    if key == "migration":
        return _migration(source, _typed(source, key, value, dict))
    if key == "guests":
        items = _typed(source, key, value, dict)
        _check_keys(source, items, {f.name for f in dataclasses.fields(GuestsConfig)}, where="guests: ")
        paging = _typed(source, "guests.paging", items.get("paging", "hap"), str)
        _choice(source, "guests.paging (hap: EPT/NPT; shadow: the xl config's hap = 0)", paging, PAGING_MODES)
        return GuestsConfig(paging=paging)
    if key == "timeouts":
        items = _typed(source, key, value, dict)
        allowed = {f.name for f in dataclasses.fields(Timeouts)}
        _check_keys(source, items, allowed, where="timeouts: ")
        return Timeouts(**{k: _typed(source, f"timeouts.{k}", v, float) for k, v in items.items()})
    if key in ("artifacts_dir", "cache_dir"):
        return Path(_typed(source, key, value, str)).expanduser()
    if key in ("memory_mb", "cpus", "emulator_fault_reruns"):
        return _typed(source, key, value, int)
    if key in ("rebuild", "allow_expired_release"):
        return _typed(source, key, value, bool)
    return _typed(source, key, value, str)


def _migration(source: str, items: dict[str, Any]) -> MigrationConfig:
    allowed = {f.name for f in dataclasses.fields(MigrationConfig)}
    _check_keys(source, items, allowed, where="migration: ")
    kwargs: dict[str, Any] = {}
    for key, value in items.items():
        where = f"migration.{key}"
        if key in ("guest_types", "two_host_guest_types", "workloads", "memory_mb"):
            typ = int if key == "memory_mb" else str
            kwargs[key] = tuple(_typed(source, where, v, typ) for v in _typed(source, where, value, list))
        elif key in ("repeats", "tick_ms"):
            kwargs[key] = _typed(source, where, value, int)
        elif key == "stream_stats":
            kwargs[key] = _typed(source, where, value, bool)
        elif key == "transport":
            kwargs[key] = _typed(source, where, value, str)
            _choice(source, where, kwargs[key], ("tcp", "ssh"))
        elif key == "cross_version":
            kwargs[key] = _cross_pairs(source, value)
        else:
            kwargs[key] = None if value is None else _typed(source, where, value, float)
    cfg = MigrationConfig(**kwargs)
    for key in ("guest_types", "two_host_guest_types"):
        bad = [t for t in getattr(cfg, key) if t not in ("pv", "pvh", "hvm")]
        if bad:
            raise ConfigError(f"{source}: migration.{key}: {bad} invalid; choose from pv, pvh, hvm")
    for w in cfg.workloads:
        if w != "idle" and not (w.startswith("dirty:") and w[6:].isdigit()):
            raise ConfigError(f"{source}: migration.workloads: {w!r}; use idle or dirty:<percent>")
    return cfg


def _cross_pairs(source: str, value: Any) -> tuple[CrossPair, ...]:
    """``migration.cross_version``: each pair well formed, each image a recipe."""
    try:
        pairs = parse_pairs(value)
        check_host_images(tuple(dict.fromkeys(n for p in pairs for n in p.images())))
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{source}: migration.cross_version{'' if str(exc).startswith('[') else ': '}{exc}"
                          ) from None
    return pairs


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class BootFiles:
    """Globs (relative to the image root) of the files QEMU boots."""

    xen: str = "boot/xen-*-amd64.gz"
    kernel: str = "boot/vmlinuz-*"
    initrd: str = "boot/initrd.img-*"


@dataclass(frozen=True)
class HostRecipe:
    """A declarative host image: Debian suite + packages -> Xen + dom0 disk."""

    name: str
    suite: str
    packages: tuple[str, ...]
    path: Path
    description: str = ""
    components: tuple[str, ...] = ("main",)
    extra_suites: tuple[str, ...] = ()
    mirror: str | None = None
    # The suite's Release file may be past its Valid-Until (testing on a stale mirror, a
    # snapshot mirror): build with apt's Acquire::Check-Valid-Until=false from the start.
    allow_expired_release: bool = False
    boot: BootFiles = field(default_factory=BootFiles)
    xen_cmdline: str = ""
    dom0_cmdline: str = ""
    dom0: str = "pv"
    memory_mb: int = 3072
    dom0_mem_mb: int = 1024
    free_space_mb: int = 2048
    # The QEMU versions (PEP 440 specifier, e.g. ">=8") that run this image's Xen and its
    # L2 guests under TCG, whose nested SVM differs by QEMU release; the harness takes
    # the configured QEMU if it fits, else a private one ./setup unpacked. Empty: any.
    qemu_tcg: str = ""
    # Your own Xen, kernel or device model over the Debian packages (harness/inputs.py);
    # `base: RECIPE` takes every other key from that recipe.
    inputs: Inputs = field(default_factory=Inputs)
    base: str = ""

    def key_material(self) -> dict[str, Any]:
        """What shapes the built image (the file path does not; inputs by content)."""
        data = dataclasses.asdict(self)
        data.pop("path")
        data.pop("description")
        data.pop("base")
        data["inputs"] = inputs_key_material(self.inputs)
        if not data["inputs"]:
            data.pop("inputs")  # images without inputs keep their keys
        # Boot-time settings do not change the disk; they are keyed by the machine.
        # Whether apt checks Valid-Until does not change which packages it installs.
        for k in ("xen_cmdline", "dom0_cmdline", "memory_mb", "dom0_mem_mb", "dom0", "qemu_tcg",
                  "allow_expired_release"):
            data.pop(k)
        return data


_RECIPE_REQUIRED = {"name", "suite", "packages"}
_RECIPE_KEYS = {f.name for f in dataclasses.fields(HostRecipe)} - {"path"}


def available_recipes(recipe_dir: Path = RECIPE_DIR) -> list[str]:
    return sorted(p.stem for p in recipe_dir.glob("*.yaml"))


def find_recipe(name_or_path: str, recipe_dir: Path = RECIPE_DIR) -> Path:
    """Resolve a recipe name (``bookworm``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = recipe_dir / f"{name_or_path}.yaml"
    if path.exists():
        return path
    raise ConfigError(
        f"unknown host image {name_or_path!r}; available recipes in {recipe_dir}: "
        f"{', '.join(available_recipes(recipe_dir)) or '(none)'}"
    )


def check_host_images(names: tuple[str, ...], recipe_dir: Path | None = None) -> None:
    """Every host-image name a run asks for is a recipe (or a recipe file): checked when
    the run's config is built, so a typo is one clear error before anything boots, not
    an error at each check's setup. The error lists the recipes."""
    where = recipe_dir or RECIPE_DIR  # the module's, read now (tests point it elsewhere)
    unknown = []
    for name in names:
        try:
            find_recipe(name, where)  # the same resolution the host's setup uses
        except ConfigError:
            unknown.append(name)
    if unknown:
        raise ConfigError(
            f"unknown host image{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"available recipes in {where}: {', '.join(available_recipes(where)) or '(none)'}")


def load_recipe(name_or_path: str, recipe_dir: Path = RECIPE_DIR) -> HostRecipe:
    path = find_recipe(name_or_path, recipe_dir)
    source = str(path)
    data = _load_yaml(path)
    _check_keys(source, data, _RECIPE_KEYS)
    if "base" in data:
        data = _with_base(source, data, recipe_dir)
    missing = sorted(_RECIPE_REQUIRED - set(data))
    if missing:
        raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
    kwargs: dict[str, Any] = {"path": path}
    for key, value in data.items():
        kwargs[key] = _convert_recipe_key(source, key, value)
    recipe = HostRecipe(**kwargs)
    if recipe.dom0 not in DOM0_MODES:
        _choice(source, "dom0", recipe.dom0, DOM0_MODES)
    _check_pins(source, recipe)
    return recipe


def _with_base(source: str, data: dict[str, Any], recipe_dir: Path) -> dict[str, Any]:
    """``base: trixie``: the base recipe's keys, with this file's over them."""
    base = _typed(source, "base", data["base"], str)
    if base == data.get("name"):
        raise ConfigError(f"{source}: base: a recipe cannot be its own base")
    base_data = _load_yaml(find_recipe(base, recipe_dir))
    if "base" in base_data:
        raise ConfigError(f"{source}: base: {base!r} has a base itself; name a plain Debian recipe")
    base_data.pop("description", None)
    return {**base_data, **data}


def package_pin(package: str) -> tuple[str, str | None]:
    """``linux-image-amd64/bookworm-backports`` -> (name, suite); no ``/`` -> (name, None).

    apt (and so mmdebstrap's ``--include``) installs ``name/suite`` from that
    suite, and takes the dependencies it needs from there too.
    """
    name, sep, suite = package.partition("/")
    return name, (suite if sep else None)


def _check_pins(source: str, recipe: HostRecipe) -> None:
    """A ``package/suite`` pin must name the recipe's suite or one of its ``extra_suites``."""
    suites = (recipe.suite, *recipe.extra_suites)
    for i, package in enumerate(recipe.packages):
        name, suite = package_pin(package)
        if suite is None:
            continue
        if not name or not suite or "/" in suite:
            raise ConfigError(f"{source}: packages[{i}]: {package!r}: write PACKAGE or PACKAGE/SUITE")
        if suite not in suites:
            raise ConfigError(
                f"{source}: packages[{i}]: {package!r} takes {name} from {suite!r}, which is not a "
                f"suite of this recipe; add it to extra_suites (suites now: {', '.join(suites)})"
            )


def _convert_recipe_key(source: str, key: str, value: Any) -> Any:
    if key in ("packages", "components", "extra_suites"):
        items = _typed(source, key, value, list)
        return tuple(_typed(source, f"{key}[{i}]", v, str) for i, v in enumerate(items))
    if key == "boot":
        items = _typed(source, key, value, dict)
        allowed = {f.name for f in dataclasses.fields(BootFiles)}
        _check_keys(source, items, allowed, where="boot: ")
        return BootFiles(**{k: _typed(source, f"boot.{k}", v, str) for k, v in items.items()})
    if key in ("memory_mb", "dom0_mem_mb", "free_space_mb"):
        return _typed(source, key, value, int)
    if key == "allow_expired_release":
        return _typed(source, key, value, bool)
    if key == "inputs":
        try:
            return parse_inputs(source, value)
        except InputError as exc:
            raise ConfigError(str(exc)) from None
    return _typed(source, key, value, str)
