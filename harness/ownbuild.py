"""`nested-xen inputs`, `build-xen` and `build-kernel`: from a suite or a checkout to inputs.

``build-xen SRC`` configures and builds a Xen source tree with the flags the harness
needs (no stubdom, no in-tree QEMU, iPXE, ROMBIOS or docs; a system SeaBIOS for HVM's
hvmloader), niced so VM jobs keep priority and, as root, without network (``unshare -n``):
a build that reaches for the network fails saying so. ``make dist``'s ``dist/install``
is copied into the cache (``<cache>/builds/xen-<version>``), the tree `--xen-dist` takes.
``build-kernel SRC`` does the same for Linux: defconfig + Linux's own ``xen.config``.
Neither takes the VM lock: only booting does. Both first check the tools and headers
they need (``XEN_TOOLS``/``XEN_FILES``, ``KERNEL_TOOLS``/``KERNEL_HEADERS``) and stop,
before configuring anything, with the one ``apt-get install`` line that brings the
missing Debian packages.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import options
from .config import load_recipe
from .config import run_config_from_args as _config
from .debian_inputs import PrepareError, prepare
from .dom0_layout import OWN_DEVICE_MODEL
from .imaging import resolve_mirror
from .provision import inputs_dir

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
# Where libxl looks for its device model in dom0; `--device-model` installs one there.
QEMU_PATH = OWN_DEVICE_MODEL
XEN_CONFIGURE = ("--disable-stubdom", "--disable-docs", "--disable-ocamltools", "--disable-golang",
                 "--disable-pvshim", "--disable-rombios", "--disable-ipxe", "--enable-systemd",
                 f"--with-system-qemu={QEMU_PATH}")


class BuildError(RuntimeError):
    """A build could not run or failed; the message says what to do."""


def run_as_build_error(command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                       errors: type[Exception] | tuple[type[Exception], ...]) -> int:
    """Run a subcommand; one of its own ``errors`` becomes a BuildError with the same message,
    which cli.main prints as one line (exit 2)."""
    try:
        return command(args)
    except errors as exc:
        raise BuildError(str(exc)) from None


def xen_configure_flags() -> list[str]:
    seabios = f"--with-system-seabios={SEABIOS}" if SEABIOS.is_file() else "--disable-seabios"
    return [*XEN_CONFIGURE, seabios]


def _can_unshare_net() -> bool:
    """Whether this process may enter a network namespace of its own (root, and not in a
    container that forbids it)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.call(["unshare", "--net", "true"], stderr=subprocess.DEVNULL) == 0


def _niced(cmd: list[str], offline: bool) -> list[str]:
    prefix = ["nice", "-n", "19"]
    if offline and _can_unshare_net():
        prefix = ["unshare", "--net", *prefix]
    return prefix + cmd


def _step(cmd: list[str], cwd: Path, log: Path, offline: bool = True) -> None:
    started = time.monotonic()
    print(f"[build] {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "a") as out:
        rc = subprocess.call(_niced(cmd, offline), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {rc}) in {cwd}; the log's end:\n{tail}\n"
                         f"whole log: {log}")
    print(f"[build] done in {time.monotonic() - started:.0f} s", flush=True)


def _publish(src: Path, final: Path) -> None:
    """Copy ``src`` to ``final`` whole: under a temporary name, renamed at the end."""
    tmp = final.with_name(f".{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, symlinks=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def xen_version(src: Path) -> str:
    out = subprocess.run(["make", "-s", "-C", "xen", "xenversion"], cwd=src, capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unknown"


def parse_kconfig(settings: list[str]) -> dict[str, str]:
    """``CONFIG_X=y`` (or ``=n``, ``=VALUE``) options -> {symbol: value}; BuildError otherwise."""
    out = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"CONFIG_[A-Z0-9_]+", name) or not value:
            raise BuildError(f"--kconfig {item!r}: expected CONFIG_NAME=VALUE, e.g. CONFIG_SHADOW_PAGING=y")
        out[name] = value
    return out


def apply_kconfig(config: Path, wanted: dict[str, str]) -> None:
    """Set ``wanted`` in a Kconfig .config (``=n`` as "is not set"), replacing their lines."""
    drop = re.compile(r"^(?:(" + "|".join(wanted) + r")=.*|# (" + "|".join(wanted) + r") is not set)$")
    lines = [ln for ln in config.read_text().splitlines() if not drop.match(ln)]
    lines += [f"# {k} is not set" if v == "n" else f"{k}={v}" for k, v in wanted.items()]
    config.write_text("\n".join(lines) + "\n")


def kconfig_lost(config: Path, wanted: dict[str, str]) -> list[str]:
    """The ``wanted`` settings that olddefconfig dropped (unmet dependencies)."""
    lines = config.read_text().splitlines()
    return [f"{k}={v}" for k, v in wanted.items()
            if (any(ln.startswith(f"{k}=") for ln in lines) if v == "n" else f"{k}={v}" not in lines)]


def _configure_hypervisor(src: Path, wanted: dict[str, str], log: Path) -> None:
    """xen/.config (the tree's, else defconfig) with ``wanted`` set, checked after olddefconfig."""
    config = src / "xen" / ".config"
    if not config.is_file():
        _step(["make", "-C", "xen", "defconfig"], src, log)
    apply_kconfig(config, wanted)
    _step(["make", "-C", "xen", "olddefconfig"], src, log)
    lost = kconfig_lost(config, wanted)
    if lost:
        raise BuildError(f"{', '.join(lost)} did not survive `make -C xen olddefconfig` (a dependency "
                         f"is not met: see the symbol in xen/ Kconfig files); {config} says otherwise")


def build_xen(src: Path, cache: Path, jobs: int, configure: bool = True,
              kconfig: dict[str, str] | None = None) -> Path:
    """Build ``src`` (a Xen checkout) and copy its dist/install into the cache; return it.
    ``kconfig`` settings go into the hypervisor's xen/.config first (e.g. shadow paging,
    which PV live migration needs and Xen 4.22 leaves out by default)."""
    if not (src / "xen" / "Makefile").is_file() or not (src / "tools").is_dir():
        raise BuildError(f"{src} is not a Xen source tree (expected xen/Makefile and tools/)")
    require("a Xen build", xen_build_missing())
    log = cache / "builds" / "logs" / f"xen-{int(time.time())}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if configure:
        _step(["./configure", *xen_configure_flags()], src, log)
    if kconfig:
        _configure_hypervisor(src, kconfig, log)
    _step(["make", f"-j{jobs}", "dist"], src, log)
    install = src / "dist" / "install"
    if not (install / "boot").is_dir():
        raise BuildError(f"`make dist` left no {install}/boot; see {log}")
    final = cache / "builds" / f"xen-{xen_version(src)}"
    _publish(install, final)
    return final


# What a defconfig + xen.config x86 build runs or includes, and the Debian package with it
# (objtool needs libelf's gelf.h: measured, the build stopped there without libelf-dev).
KERNEL_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
                "perl": "perl"}
KERNEL_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}

# What Xen's ./configure (XEN_CONFIGURE) and `make dist` run, and the bookworm/trixie package
# with it: the hypervisor's Kconfig is built from lexer.l and parser.y (flex, bison); the
# tools' configure fails without iasl, Python's headers, uuid, curses, yajl or zlib.
XEN_TOOLS = {"gcc": "build-essential", "make": "build-essential", "python3": "python3-dev",
             "iasl": "acpica-tools", "flex": "flex", "bison": "bison",
             # without pkg-config, configure quietly leaves out zstd and libnl
             "pkg-config": "pkg-config"}
XEN_FILES = {
    "/usr/include/python3*/Python.h": "python3-dev",  # brings distutils too (Xen 4.17's setup.py)
    "/usr/include/uuid/uuid.h": "uuid-dev",
    "/usr/include/ncurses.h": "libncurses-dev",
    "/usr/include/yajl/yajl_version.h": "libyajl-dev",
    "/usr/include/zlib.h": "zlib1g-dev",
    # Optional to configure, but what a dist tree's tools link against in the image
    # (inputs.TOOLS_RUNTIME): libxenguest's kernel decompressors, Remus/COLO's libnl,
    # pygrub's ext2fs; left out, PV guests with such kernels or those tools fail in dom0.
    "/usr/include/zstd.h": "libzstd-dev",
    "/usr/include/lzma.h": "liblzma-dev",
    "/usr/include/bzlib.h": "libbz2-dev",
    "/usr/include/lzo/lzo1x.h": "liblzo2-dev",
    "/usr/include/libnl3/netlink/netlink.h": "libnl-3-dev",
    "/usr/include/libnl3/netlink/route/link.h": "libnl-route-3-dev",
    "/usr/include/ext2fs/ext2fs.h": "libext2fs-dev",
    str(SEABIOS): "seabios",  # hvmloader's BIOS: without it HVM guests have none
}


def build_missing(tools: dict[str, str], files: dict[str, str], root: Path = Path("/"),
                  path: str | None = None) -> list[str]:
    """The Debian packages of ``tools`` (looked up on ``path``, default $PATH) and ``files``
    (globs under ``root``) that this machine lacks, sorted, each once."""
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool, path=path) is None]
    missing += [pkg for pattern, pkg in files.items() if not any(root.glob(pattern.lstrip("/")))]
    return sorted(set(missing))


def kernel_build_missing(root: Path = Path("/"), path: str | None = None) -> list[str]:
    """The Debian packages a kernel build needs that this machine lacks."""
    return build_missing(KERNEL_TOOLS, KERNEL_HEADERS, root, path)


def xen_build_missing(root: Path = Path("/"), path: str | None = None) -> list[str]:
    """The Debian packages a Xen build (configure + make dist) needs that this machine lacks."""
    return build_missing(XEN_TOOLS, XEN_FILES, root, path)


def require(what: str, missing: list[str]) -> None:
    """Stop before anything is configured or built, naming the one apt-get line to run."""
    if missing:
        raise BuildError(f"{what} needs {', '.join(missing)}: "
                         f"apt-get install {' '.join(missing)} (nothing was built)")


def build_kernel(src: Path, cache: Path, jobs: int) -> Path:
    """defconfig + xen.config, bzImage + modules; copy both into the cache; return the dir."""
    if not (src / "Kbuild").is_file() or not (src / "arch" / "x86").is_dir():
        raise BuildError(f"{src} is not a Linux source tree (expected Kbuild and arch/x86/)")
    require("a kernel build", kernel_build_missing())
    log = cache / "builds" / "logs" / f"linux-{int(time.time())}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    _step(["make", "defconfig", "xen.config"], src, log)
    _step(["make", f"-j{jobs}", "bzImage", "modules"], src, log)
    stage = cache / "builds" / f".linux-stage-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _step(["make", "modules_install", f"INSTALL_MOD_PATH={stage / 'modules'}"], src, log)
        shutil.copy(src / "arch/x86/boot/bzImage", stage / "bzImage")
        release = subprocess.run(["make", "-s", "kernelrelease"], cwd=src, capture_output=True,
                                 text=True).stdout.strip()
        final = cache / "builds" / f"linux-{release or 'unknown'}"
        _publish(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


# ---------------------------------------------------------------------- commands


def cmd_inputs(args: argparse.Namespace) -> int:
    cfg = _config(args)
    mirror = resolve_mirror(cfg.mirror, load_recipe("bookworm"))
    out = Path(args.dir).resolve() if args.dir else inputs_dir(cfg)
    started = time.monotonic()
    try:
        path = prepare(args.suite, mirror, out, progress=lambda line: print(line, flush=True))
    except PrepareError as exc:
        raise BuildError(str(exc)) from None
    print(f"{path}: debs/ tree/ files/ in {time.monotonic() - started:.0f} s")
    return 0


def cmd_build_xen(args: argparse.Namespace) -> int:
    cache = _config(args).resolved_cache_dir()
    started = time.monotonic()
    dist = build_xen(Path(args.src).resolve(), cache, args.jobs, configure=not args.no_configure,
                     kconfig=parse_kconfig(args.kconfig))
    print(f"Xen dist tree: {dist} (built in {time.monotonic() - started:.0f} s)\n"
          f"next: nested-xen run --xen-dist {dist} --image bookworm -- plugins/smoke.py")
    return 0


def cmd_build_kernel(args: argparse.Namespace) -> int:
    cache = _config(args).resolved_cache_dir()
    out = build_kernel(Path(args.src).resolve(), cache, args.jobs)
    print(f"kernel: {out}/bzImage, modules: {out}/modules\n"
          f"next: nested-xen run --kernel {out}/bzImage --kernel-modules {out}/modules")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inputs", help="fetch a suite's Xen .debs, unpack them into a tree, and "
                       "its xen.gz + vmlinuz + modules as files: own-build inputs from Debian")
    p.add_argument("suite", help="e.g. bookworm or trixie")
    p.add_argument("--dir", help="write DIR/SUITE/ (default: $NESTED_XEN_INPUTS or <cache>/inputs)")
    options.add_arguments(p, ("nx_config", "mirror", "cache_dir"))  # its mirror: and cache_dir:
    p.set_defaults(func=cmd_inputs)
    jobs = os.cpu_count() or 1
    p = sub.add_parser("build-xen", help="build a Xen source tree (make dist) into the cache")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--jobs", type=int, default=jobs)
    p.add_argument("--no-configure", action="store_true", help="reuse the tree's configuration")
    p.add_argument("--kconfig", action="append", default=[], metavar="CONFIG_X=y",
                   help="set a hypervisor Kconfig option in xen/.config before the build (repeatable), "
                        "e.g. CONFIG_SHADOW_PAGING=y for PV live migration")
    options.add_arguments(p, ("nx_config", "cache_dir"))  # its cache_dir:
    p.set_defaults(func=cmd_build_xen)
    p = sub.add_parser("build-kernel", help="build a Linux tree (defconfig + xen.config) into the cache")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--jobs", type=int, default=jobs)
    options.add_arguments(p, ("nx_config", "cache_dir"))  # its cache_dir:
    p.set_defaults(func=cmd_build_kernel)
