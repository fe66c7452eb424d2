"""Your own Xen and Linux as a host image's inputs, on top of a Debian base recipe.

An input replaces what the base recipe's Debian packages would supply:

- ``xen_dist``: a ``make dist`` tree (``dist/`` or ``dist/install``) or a
  ``make install DESTDIR=`` tree: ``boot/xen*.gz`` plus the tools under
  ``usr/local`` or ``usr``; copied over dom0's root.
- ``xen_debs``: a directory of Xen .debs, installed by apt with their dependencies.
- ``xen``: a hypervisor file alone (``xen-*.gz`` or an ELF ``xen``); the tools stay the recipe's.
- ``kernel`` + ``kernel_modules``: a ``bzImage`` and the tree ``make modules_install
  INSTALL_MOD_PATH=`` wrote, for ``kernel_for``: dom0, guests or both.
- ``device_model``: a QEMU built against the Xen under test, installed where that Xen's
  libxl runs its device model.

Everything here is checked before an image is built (what is missing, malformed or
for another architecture is named), and the image key hashes the inputs' content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import KERNEL_FOR, input_values
from .timeouts import HOST_TOOL_S

ELF_X86_64 = 0x3E
# Debian packages a Xen input replaces (the base recipe's own Xen and device model).
XEN_PACKAGE = re.compile(r"^(xen-|libxen|qemu-system-xen)")
# What the tools of a dist tree link against, from the base suite (bookworm and trixie names).
TOOLS_RUNTIME = ("libyajl2", "libnl-3-200", "libnl-route-3-200", "libfdt1", "libuuid1",
                 "zlib1g", "libzstd1", "liblzma5", "libbz2-1.0", "liblzo2-2", "libtinfo6",
                 "libncurses6", "libncursesw6", "libext2fs2", "iproute2", "bridge-utils")
DEB_HYPERVISOR = "xen-hypervisor-"


# Why an HVM check skips on a host whose Xen has no device model (harness/fixtures/guests.py).
NO_DEVICE_MODEL = ("no device model for this Xen ({origin}): libxl's qemu-system-i386 is not in dom0; "
                   "give one built against this Xen as inputs.device_model (or a dist tree with "
                   "qemu-xen); PV and PVH need none")


class InputError(ValueError):
    """An input is missing, malformed or for another machine; the message says what was expected."""


@dataclass(frozen=True)
class Inputs:
    """Paths as given (``~`` and ``$VARS`` expanded; relative ones against ``base_dir``)."""

    xen_dist: str | None = None
    xen_debs: str | None = None
    xen: str | None = None
    kernel: str | None = None
    kernel_modules: str | None = None
    kernel_for: str = "both"
    device_model: str | None = None

    KEYS = ("xen_dist", "xen_debs", "xen", "kernel", "kernel_modules", "kernel_for", "device_model")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, k) for k in self.KEYS if k != "kernel_for")

    @property
    def replaces_xen(self) -> bool:
        return bool(self.xen_dist or self.xen_debs)

    @property
    def dom0_kernel(self) -> bool:
        return bool(self.kernel) and self.kernel_for in ("dom0", "both")

    @property
    def guest_kernel(self) -> bool:
        return bool(self.kernel) and self.kernel_for in ("guests", "both")

    def path(self, key: str) -> Path | None:
        value = getattr(self, key)
        return Path(value) if value else None

    def over(self, other: Inputs) -> Inputs:
        """``other``'s set keys win over these (a run's inputs over a recipe's)."""
        changes = {k: getattr(other, k) for k in self.KEYS if getattr(other, k) not in (None, "both")}
        return dataclasses.replace(self, **changes)

    def resolved(self, base_dir: Path) -> Inputs:
        def one(value: str | None) -> str | None:
            if not value:
                return value
            expanded = os.path.expandvars(value)
            unset = re.findall(r"\$\{?(\w+)", expanded)
            if unset:
                raise InputError(f"inputs: {value!r} names ${unset[0]}, which is not set: "
                                 f"export {unset[0]}=PATH")
            path = Path(expanded).expanduser()
            return str(path if path.is_absolute() else (base_dir / path).resolve())

        return dataclasses.replace(self, **{k: one(getattr(self, k)) for k in self.KEYS
                                            if k != "kernel_for"})

    def label(self) -> str:
        """Where the build came from, for manifests and facts: ``xen_dist+kernel``."""
        parts = [k for k in ("xen_dist", "xen_debs", "xen", "kernel", "device_model") if getattr(self, k)]
        if self.kernel:
            parts[parts.index("kernel")] = f"kernel({self.kernel_for})"
        return "+".join(parts) or "debian"


def parse_inputs(source: str, value: Any) -> Inputs:
    """The ``inputs:`` mapping of a recipe or a run config."""
    if not isinstance(value, dict):
        raise InputError(f"{source}: inputs: expected a mapping with keys {', '.join(Inputs.KEYS)}")
    unknown = sorted(set(value) - set(Inputs.KEYS))
    if unknown:
        raise InputError(f"{source}: inputs: unknown key(s) {', '.join(unknown)}; "
                         f"valid keys: {', '.join(Inputs.KEYS)}")
    bad = [k for k, v in value.items() if v is not None and not isinstance(v, str)]
    if bad:
        raise InputError(f"{source}: inputs.{bad[0]}: expected a path (a string), got {value[bad[0]]!r}")
    inputs = Inputs(**value)
    if inputs.kernel_for not in KERNEL_FOR:
        raise InputError(f"{source}: inputs.kernel_for: {inputs.kernel_for!r}; choose one of "
                         f"{', '.join(KERNEL_FOR)}")
    if inputs.xen_dist and inputs.xen_debs:
        raise InputError(f"{source}: inputs: give xen_dist or xen_debs, not both")
    if bool(inputs.kernel) and not inputs.kernel_modules and inputs.dom0_kernel:
        raise InputError(f"{source}: inputs: a dom0 kernel needs kernel_modules too (the tree "
                         "`make modules_install INSTALL_MOD_PATH=DIR` wrote)")
    return inputs


# --------------------------------------------------------------------------- checks


def elf_machine(path: Path) -> int | None:
    """The e_machine of an ELF file, or None if it is not one."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def _require_file(what: str, path: Path) -> None:
    if not path.exists():
        raise InputError(f"{what}: {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what}: {path} is not a file")


def _require_x86_64(what: str, path: Path) -> None:
    machine = elf_machine(path)
    if machine is None:
        raise InputError(f"{what}: {path} is not an ELF executable (expected x86-64)")
    if machine != ELF_X86_64:
        raise InputError(f"{what}: {path} is for ELF machine {machine}, not x86-64 ({ELF_X86_64}); "
                         "build it for x86_64")


def dist_root(path: Path) -> Path:
    """The directory to copy over dom0's root: ``dist/install`` of a ``make dist`` tree,
    else the tree itself (a ``make install DESTDIR=`` tree)."""
    if not path.is_dir():
        raise InputError(f"xen_dist: {path} is not a directory (expected Xen's dist/ or "
                         "a `make install DESTDIR=` tree)")
    return path / "install" if (path / "install" / "boot").is_dir() else path


def check_xen_dist(path: Path) -> Path:
    """The install root of a dist tree; raises naming what is missing."""
    root = dist_root(path)
    gz = sorted((root / "boot").glob("xen*.gz"))
    if not gz:
        raise InputError(f"xen_dist: {root} has no boot/xen*.gz (expected the hypervisor "
                         "`make dist` installs, e.g. boot/xen-4.22.0.gz)")
    xl = next((root / p for p in ("usr/local/sbin/xl", "usr/sbin/xl") if (root / p).exists()), None)
    if xl is None:
        raise InputError(f"xen_dist: {root} has no tools: expected usr/local/sbin/xl or usr/sbin/xl "
                         "(build the tools too: `make dist`, not `make dist-xen`)")
    lib = next(iter([*root.glob("usr/local/lib/libxenlight.so*"), *root.glob("usr/lib/libxenlight.so*"),
                     *root.glob("usr/lib/*/libxenlight.so*")]), None)
    if lib is None:
        raise InputError(f"xen_dist: {root} has no libxenlight.so under usr/local/lib or usr/lib")
    _require_x86_64("xen_dist", lib.resolve())
    if not any((root / d).is_dir() for d in ("usr/local/lib/systemd/system", "usr/lib/systemd/system",
                                             "lib/systemd/system", "etc/init.d")):
        raise InputError(f"xen_dist: {root} ships neither systemd units (xenstored.service, "
                         "xenconsoled.service) nor init scripts (etc/init.d/xencommons or xen) "
                         "to start xenstored and xenconsoled")
    return root


def deb_field(deb: Path, name: str) -> str:
    try:
        out = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                             check=True, timeout=HOST_TOOL_S)
    except FileNotFoundError:
        raise InputError("xen_debs: dpkg-deb is not installed: apt-get install dpkg") from None
    except subprocess.CalledProcessError as exc:
        raise InputError(f"xen_debs: {deb} is not a .deb package: {exc.stderr.strip()}") from None
    return out.stdout.strip()


def check_xen_debs(path: Path) -> list[Path]:
    """The .debs of a directory: at least a hypervisor, all amd64 or all."""
    if not path.is_dir():
        raise InputError(f"xen_debs: {path} is not a directory (expected one holding Xen .debs)")
    debs = sorted(path.glob("*.deb"))
    if not debs:
        raise InputError(f"xen_debs: {path} has no *.deb files")
    for deb in debs:
        arch = deb_field(deb, "Architecture")
        if arch not in ("amd64", "all"):
            raise InputError(f"xen_debs: {deb.name} is for {arch}, expected amd64 (or all)")
    if not any(deb_field(d, "Package").startswith(DEB_HYPERVISOR) for d in debs):
        raise InputError(f"xen_debs: {path} has no {DEB_HYPERVISOR}* package "
                         "(expected the hypervisor's .deb beside the tools')")
    return debs


def bzimage_version(path: Path) -> str:
    """The release of an x86 bzImage, from its setup header (``HdrS`` at 0x202)."""
    _require_file("kernel", path)
    data = path.read_bytes()[:0x10000]
    if data[0x202:0x206] != b"HdrS":
        raise InputError(f"kernel: {path} is not an x86 bzImage (no 'HdrS' setup header at 0x202; "
                         "expected arch/x86/boot/bzImage)")
    offset = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    raw = data[offset:offset + 256].split(b"\0", 1)[0].decode(errors="replace")
    if not raw:
        raise InputError(f"kernel: {path} has no version string in its setup header")
    return raw.split()[0]


def check_kernel(inputs: Inputs) -> str:
    """The kernel's release; its modules tree must hold lib/modules/<release>."""
    release = bzimage_version(Path(inputs.kernel or ""))
    if inputs.kernel_modules:
        mods = Path(inputs.kernel_modules)
        found = [d for d in (mods / "lib/modules", mods / "usr/lib/modules") if d.is_dir()]
        if not found:
            raise InputError(f"kernel_modules: {mods} has no lib/modules/ (expected the tree "
                             "`make modules_install INSTALL_MOD_PATH=DIR` wrote)")
        if not (found[0] / release).is_dir():
            have = ", ".join(p.name for p in found[0].iterdir()) or "nothing"
            raise InputError(f"kernel_modules: {found[0]} has no {release}/ for the bzImage "
                             f"(it has {have}): give the modules built with this kernel")
    return release


def check(inputs: Inputs) -> dict[str, str]:
    """Check every input; return what the image build needs to know (release, roots)."""
    found: dict[str, str] = {}
    if inputs.xen_dist:
        found["xen_root"] = str(check_xen_dist(Path(inputs.xen_dist)))
    if inputs.xen_debs:
        check_xen_debs(Path(inputs.xen_debs))
    if inputs.xen:
        path = Path(inputs.xen)
        _require_file("xen", path)
        if not path.name.endswith(".gz"):
            _require_x86_64("xen", path)
    if inputs.kernel:
        found["kernel_release"] = check_kernel(inputs)
    if inputs.device_model:
        path = Path(inputs.device_model)
        _require_file("device_model", path)
        _require_x86_64("device_model", path)
    return found


# --------------------------------------------------------------------------- keys


_DIGESTS: dict[tuple, str] = {}


def _walk(path: Path) -> list[tuple[str, os.stat_result]]:
    if not path.is_dir():
        return [("", path.lstat())]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            full = Path(root, name)
            out.append((str(full.relative_to(path)), full.lstat()))
    return out


def content_digest(path: Path) -> str:
    """sha256 over a file's or tree's names, modes, link targets and contents
    (memoized per process on the tree's sizes and mtimes)."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    entries = _walk(path)
    signature = (str(path), tuple((r, s.st_size, s.st_mtime_ns, s.st_mode) for r, s in entries))
    if signature in _DIGESTS:
        return _DIGESTS[signature]
    h = hashlib.sha256()
    for rel, st in entries:
        full = path / rel if rel else path
        h.update(f"{rel}\0{stat.S_IMODE(st.st_mode)}\0{stat.S_IFMT(st.st_mode)}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(full).encode())
        elif stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    _DIGESTS[signature] = h.hexdigest()
    return _DIGESTS[signature]


def key_material(inputs: Inputs) -> dict[str, str]:
    """What the image key covers: each input's content digest (not its path)."""
    out: dict[str, str] = {}
    if not inputs.empty:  # how inputs are installed shapes the image too
        here = Path(__file__).parent
        code = b"".join((here / f).read_bytes() for f in ("inputs.py", "input_image.py"))
        out["install"] = hashlib.sha256(code).hexdigest()[:16]
    for key in Inputs.KEYS:
        value = getattr(inputs, key)
        if not value or (key == "kernel_for" and not inputs.kernel):
            continue
        out[key] = value if key == "kernel_for" else content_digest(Path(value))
    return out


# --------------------------------------------------------------------------- options


def from_options(get: Any, over: Inputs) -> Inputs:
    """``over`` with the inputs given on a command line (``get(option name)``, harness/options.py)
    over it."""
    values = input_values(get)
    if not values:
        return over
    merged = {k: getattr(over, k) for k in Inputs.KEYS} | values
    # Paths from the command line are relative to where it ran.
    for key in values:
        if key != "kernel_for":
            merged[key] = str(Path(merged[key]).expanduser().resolve())
    return parse_inputs("command line", merged)
