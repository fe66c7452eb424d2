"""How a host image build takes your own Xen and Linux (harness/inputs.py) on top of a
Debian base recipe: which packages go, which come, and the mmdebstrap hooks that put the
inputs into dom0's root so it comes up the way a Debian host does (libraries found,
xenstored and xenconsoled started by the tree's own units or init scripts, the
privcmd, gntdev and evtchn drivers present)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from . import dom0_layout as layout
from .inputs import TOOLS_RUNTIME, XEN_PACKAGE, Inputs

FILE_MIRROR_HOOKS = "/usr/share/mmdebstrap/hooks/file-mirror-automount"
# Units a Xen tree ships (upstream's tools/hotplug/Linux/systemd); enabled when present.
XEN_UNITS = ("proc-xen.mount", "xenstored.service", "xenconsoled.service", "xen-init-dom0.service",
             "xen-qemu-dom0-disk-backend.service")
UNIT_DIRS = tuple(d.lstrip("/") for d in layout.SYSTEMD_UNIT_DIRS)  # from the image's root
# Where dom0 reads what it was built from (HostFacts.origin); harness/host.py reads it back.
ORIGIN_FILE = layout.INPUTS_FILE.lstrip("/")
DEVICE_MODEL_LIBS = ("libpixman-1-0", "libaio1")
XEN_DRIVERS = ("xen-privcmd", "xen-gntdev", "xen-evtchn")


def packages(recipe_packages: tuple[str, ...], inputs: Inputs) -> list[str]:
    """The base recipe's packages without what the inputs replace, plus what they need."""
    out = list(recipe_packages)
    if inputs.replaces_xen:
        out = [p for p in out if not XEN_PACKAGE.match(p)]
    if inputs.xen_dist:
        out += [p for p in TOOLS_RUNTIME if p not in out]
    if inputs.dom0_kernel:
        out = [p for p in out if not p.split("/")[0].startswith("linux-image-")]
        out += ["initramfs-tools"]
    if inputs.device_model:
        out += list(DEVICE_MODEL_LIBS)
    return out


def include_args(inputs: Inputs) -> list[str]:
    """mmdebstrap options for local .debs: each by path, made visible inside the chroot."""
    if not inputs.xen_debs:
        return []
    debs = sorted(Path(inputs.xen_debs).glob("*.deb"))
    return [f"--hook-dir={FILE_MIRROR_HOOKS}", *(f"--include={d}" for d in debs)]


def _enable_services() -> str:
    """Enable the tree's Xen units, else its init script; fail naming both if neither."""
    units = " ".join(XEN_UNITS)
    dirs = " ".join(UNIT_DIRS)
    init_d = layout.INIT_D.lstrip("/")
    return (
        'cd "$1" && units=""; '
        f"for u in {units}; do for d in {dirs}; do "
        '[ -e "$d/$u" ] && { units="$units $u"; break; }; done; done; '
        'if [ -n "$units" ]; then chroot "$1" systemctl enable $units; '
        f'elif [ -x {init_d}/xencommons ]; then chroot "$1" update-rc.d xencommons defaults; '
        f'elif [ -x {init_d}/xen ]; then chroot "$1" update-rc.d xen defaults; '
        'else echo "nested-xen: the Xen input ships no xenstored.service/xenconsoled.service '
        f'and no {init_d}/xencommons or {init_d}/xen to start xenstored and xenconsoled" >&2; '
        "exit 1; fi"
    )


def _missing_libraries() -> str:
    """Fail, naming each binary and library, when the tools cannot be loaded."""
    tools = (f"{layout.LOCAL_SBIN}/* {layout.LOCAL_BIN}/* {layout.OWN_XEN_LIB}/bin/* {layout.XL} "
             f"{layout.DEBIAN_XEN_LIB_ANY}/bin/* {layout.XEN_LIB}/bin/*")
    report = f'"$1{layout.LDD_REPORT}"'
    return (
        f'chroot "$1" ldconfig && chroot "$1" sh -c \'for f in {tools}; do '
        '[ -f "$f" ] && [ -x "$f" ] || continue; '
        f'ldd "$f" 2>/dev/null | grep "not found" | sed "s|^|$f needs|"; done\' > {report}; '
        f'if [ -s {report} ]; then echo "nested-xen: the Xen tools lack shared libraries '
        f'(add their packages to the base recipe):" >&2; sort -u {report} >&2; exit 1; fi; '
        f'rm -f {report}'
    )


def _device_model(path: str) -> str:
    """Install the device model where this Xen's libxl runs it (read from libxenlight)."""
    libs = " ".join(f'"$1"{g}' for g in layout.LIBXENLIGHT_GLOBS)
    return (
        f'lib=$(ls {libs} 2>/dev/null | head -n1); '
        "dm=$(grep -aoE '/[-_./A-Za-z0-9]*qemu-system-i386' \"$lib\" | head -n1); "
        '[ -n "$dm" ] || { echo "nested-xen: cannot read the device model path from $lib" >&2; exit 1; }; '
        f'mkdir -p "$1$(dirname "$dm")" && cp {shlex.quote(path)} "$1$dm" && chmod 755 "$1$dm"'
    )


def _drivers(release: str) -> str:
    """The dom0 kernel must carry privcmd, gntdev and evtchn, built in or as modules."""
    checks = " ".join(XEN_DRIVERS)
    return (
        f'd="$1{layout.MODULES_DIR}/{release}"; for m in {checks}; do '
        '{ grep -q "/$m.ko" "$d/modules.builtin" 2>/dev/null || '
        'find "$d" -name "$m.ko*" | grep -q .; } || '
        '{ echo "nested-xen: the dom0 kernel has no $m driver (CONFIG_XEN_PRIVCMD, '
        'CONFIG_XEN_GNTDEV, CONFIG_XEN_DEV_EVTCHN: build them in or as modules)" >&2; exit 1; }; done'
    )


def _kernel_config(mods: Path, release: str) -> str:
    """update-initramfs reads /boot/config-<release> to choose a compression: the modules
    tree's boot/config-<release> if it has one, else a note saying gzip (which every x86
    kernel that boots an initrd here supports)."""
    config = mods / "boot" / f"config-{release}"
    dest = f'"$1{layout.BOOT_DIR}/config-{release}"'
    if config.is_file():
        return f"cp {shlex.quote(str(config))} {dest}"
    return (f"printf '# nested-xen: no .config came with the kernel input\\nCONFIG_RD_GZIP=y\\n' > {dest}"
            f' && mkdir -p "$1{layout.INITRAMFS_CONF_DIR}" && '
            f'echo COMPRESS=gzip > "$1{layout.INITRAMFS_CONF_DIR}/nested-xen"')


def hooks(inputs: Inputs, found: dict[str, str]) -> list[str]:
    """mmdebstrap customize hooks, run after the overlay and before the harness's own."""
    out: list[str] = []
    if found.get("xen_root"):
        out.append(copy_tree(Path(found["xen_root"]), "/"))
    if inputs.replaces_xen:
        out += [_enable_services(),
                f'[ ! -f "$1{layout.XENCOMMONS_DEFAULTS}" ] || '
                f'echo XENCONSOLED_TRACE=guest >> "$1{layout.XENCOMMONS_DEFAULTS}"']
    if inputs.device_model:
        out.append(_device_model(inputs.device_model))
    if inputs.replaces_xen or inputs.device_model:
        out.append(_missing_libraries())
    release = found.get("kernel_release")
    if inputs.dom0_kernel and release:
        mods = Path(inputs.kernel_modules or "")
        tree = mods / "lib/modules" if (mods / "lib/modules").is_dir() else mods / "usr/lib/modules"
        out += [copy_tree(tree / release, f"{layout.MODULES_DIR}/{release}"),
                f'chroot "$1" depmod {shlex.quote(release)}',
                _drivers(release),
                _kernel_config(mods, release),
                f'chroot "$1" update-initramfs -c -k {shlex.quote(release)}']
    label = shlex.quote(inputs.label())
    out.append(f'mkdir -p "$1{layout.INPUTS_DIR}" && echo {label} > "$1{layout.INPUTS_FILE}"')
    return out


def newest_xen(boot: Path) -> Path | None:
    """The hypervisor an input tree put in /boot: the newest real ``xen*.gz`` (not a link)."""
    found = [p for p in boot.glob("xen*.gz") if not p.is_symlink()]
    found.sort(key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)])
    return found[-1] if found else None


def copy_tree(src: Path, dest: str) -> str:
    """A hook copying ``src``'s contents to ``dest`` in the chroot, owned by root, keeping
    the base's directory symlinks (merged /usr: /lib -> usr/lib)."""
    return (f'mkdir -p "$1{dest}" && tar -C {shlex.quote(str(src))} --owner=0 --group=0 -cf - . '
            f'| tar -C "$1{dest}" --keep-directory-symlink -xf -')
