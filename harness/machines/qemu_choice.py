"""Which QEMU runs an L1, what its version says, and the AMD IOMMU a PVH dom0's L1 gets.

A recipe can need another QEMU than the system's for TCG's nested SVM (``qemu_tcg``);
a QEMU release decides whether its AMD IOMMU needs ``pt=off`` (see iommu_device).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

from .. import timeouts as t
from .base import MachineStartError


@functools.cache
def qemu_version(binary: str) -> str:
    """The first line of ``binary --version``. Asked once per binary and process: the
    snapshot key, its metadata, the host facts and the QEMU choice all need it."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=t.QEMU_VERSION_S)
    except FileNotFoundError:
        raise MachineStartError(
            f"{binary} is not installed: run `apt-get install qemu-system-x86 qemu-utils` "
            "(`nested-xen doctor` lists everything this host lacks)"
        ) from None
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def parse_qemu_version(line: str) -> tuple[int, int] | None:
    """(major, minor) from `qemu-system-x86_64 --version`'s first line."""
    release = parse_qemu_release(line)
    return (release[0], release[1]) if release else None


# Private QEMU builds ./setup unpacks (cache/qemu/<version>/usr/bin/...): a recipe can
# need another QEMU than the system's for TCG's nested SVM (see HostRecipe.qemu_tcg).
PRIVATE_QEMU_GLOB = "qemu/*/usr/bin/qemu-system-x86_64"


def _release_of_binary(binary: str) -> tuple[int, int, int] | None:
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        return parse_qemu_release(qemu_version(path))
    except (MachineStartError, OSError, subprocess.SubprocessError):
        return None


def _version_of_binary(binary: str) -> tuple[int, int] | None:
    release = _release_of_binary(binary)
    return (release[0], release[1]) if release else None


def qemu_version_label(binary: str) -> str:
    """"10.0.2" for ``binary``, "0" when it is missing or says no version (host facts and
    known-issue matching compare it as a version; the micro release matters: 10.0.3 fixed
    the AMD IOMMU's pass-through mode)."""
    release = _release_of_binary(binary)
    return ".".join(map(str, release)) if release else "0"


def qemu_candidates(preferred: str, cache_dir: Path) -> list[tuple[str, tuple[int, int]]]:
    """(binary, version) of the configured QEMU, then of the private ones, newest first."""
    private = [(str(p), v) for p in cache_dir.glob(PRIVATE_QEMU_GLOB)
               if (v := _version_of_binary(str(p))) is not None]
    private.sort(key=lambda c: c[1], reverse=True)
    version = _version_of_binary(preferred)
    return ([(preferred, version)] if version else []) + private


def find_qemu(requirement: str, preferred: str, cache_dir: Path, why: str = "") -> str:
    """The QEMU binary to run an L1 with: ``preferred`` when its version meets
    ``requirement`` (a PEP 440 specifier such as ">=8"; empty: anything), else the
    newest private QEMU that does. Raises MachineStartError saying how to get one."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if not requirement:
        return preferred
    candidates = qemu_candidates(preferred, cache_dir)
    wanted = SpecifierSet(requirement)
    for binary, version in candidates:
        if wanted.contains(Version(f"{version[0]}.{version[1]}")):
            return binary
    have = ", ".join(f"{b} ({v[0]}.{v[1]})" for b, v in candidates) or "none"
    raise MachineStartError(
        f"this host image needs QEMU {requirement} under TCG{f' ({why})' if why else ''}; found: {have}. "
        f"Run ./setup (on Debian bookworm it unpacks QEMU 10.0 from bookworm-backports into "
        f"{cache_dir / 'qemu'}), or set qemu_binary in the run config to such a QEMU"
    )


# Xen builds no PVH hardware domain without an IOMMU (Xen 4.17.5 on -machine pc panics:
# "Presently, iommu must be enabled for PVH hardware domain"); with this one on q35,
# Xen 4.17.5 and 4.20 boot a PVH dom0 under TCG.
IOMMU_DEVICE = "amd-iommu,intremap=on"
# QEMU 9.2 gave its AMD IOMMU a pass-through mode (the x86-iommu property `pt`, on by
# default; commit c1f46999ef506). Until 31753d5a33 ("Fix device setup failure when PT is
# on": 10.0.3, 10.1.0) a device then DMAs to untranslated addresses. Under a PVH dom0 those
# are gfns, not mfns, so dom0's virtio and AHCI reads never complete (measured on 10.0.2).
# `pt=off` avoids it on those releases; 7.2's amd-iommu has no pass-through mode at all.
PT_MODE_SINCE = (9, 2, 0)
PT_FIXED_IN = ((10, 0, 3), (10, 1, 0))  # the stable 10.0 branch, and every release after it
IOMMU_PT_OFF = "pt=off"
# QEMU 10.2 (8a8837f90323) made the AMD IOMMU's DMA remapping a property, `dma-remap`, off
# by default: device DMA is then untranslated whatever Xen sets up (11.1.3 lists it,
# "default: off", and has no `pt`). A PVH dom0 needs it on.
DMA_REMAP_SINCE = (10, 2, 0)
IOMMU_DMA_REMAP = "dma-remap=on"
# Behind an IOMMU a virtio device must use the DMA API (iommu_platform) and be
# modern-only (as measured before: without it a PVH dom0 saw neither disk nor NIC).
VIRTIO_BEHIND_IOMMU = "iommu_platform=on,disable-legacy=on"


def parse_qemu_release(line: str) -> tuple[int, int, int] | None:
    """(major, minor, micro) from `qemu-system-x86_64 --version`'s first line."""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", line)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def iommu_device(version_line: str) -> str:
    """The AMD IOMMU device for a PVH dom0's L1 under the QEMU that says ``version_line``:
    with ``pt=off`` where that QEMU has the pass-through mode but not its fix, and
    ``dma-remap=on`` where remapping is a property that is off by default."""
    release = parse_qemu_release(version_line)
    if release is None or release < PT_MODE_SINCE:
        return IOMMU_DEVICE
    if release >= DMA_REMAP_SINCE:
        return f"{IOMMU_DEVICE},{IOMMU_DMA_REMAP}"
    fixed = release >= PT_FIXED_IN[1] or (release[:2] == PT_FIXED_IN[0][:2] and release >= PT_FIXED_IN[0])
    return IOMMU_DEVICE if fixed else f"{IOMMU_DEVICE},{IOMMU_PT_OFF}"


def l1_iommu(spec: object) -> str:
    """The IOMMU device an L1 of ``spec`` gets (its ``qemu_binary``'s release decides), or
    "" for one without (a PV dom0): the command line and the host facts both use it."""
    if not getattr(spec, "iommu", False):
        return ""
    return iommu_device(qemu_version(getattr(spec, "qemu_binary", "qemu-system-x86_64")))


def with_iommu(cmd: list[str], device: str = IOMMU_DEVICE) -> list[str]:
    """``cmd`` on a q35 machine (QEMU only plugs its AMD IOMMU into q35) with an AMD
    IOMMU (``device``) before the first PCI device, and every virtio PCI device put behind it."""
    out: list[str] = []
    added = False
    for i, arg in enumerate(cmd):
        device_arg = i > 0 and cmd[i - 1] == "-device"
        if i > 0 and cmd[i - 1] == "-machine" and arg.split(",", 1)[0] == "pc":
            arg = "q35" + arg[2:]
        if device_arg and not added:
            out[-1:] = ["-device", device, "-device"]
            added = True
        if device_arg and arg.startswith("virtio-") and "-pci" in arg.split(",", 1)[0]:
            arg = f"{arg},{VIRTIO_BEHIND_IOMMU}"
        out.append(arg)
    if not added:
        out += ["-device", device]
    return out
