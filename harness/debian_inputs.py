"""Debian's own binaries as own-build inputs, for CI without sources (`nested-xen inputs SUITE`).

From the Debian mirror (the run config's, else the host's apt source), into DIR/SUITE/:
- ``debs/``: the Xen .debs ``apt-get download`` fetches (a maintainer's "local .debs"),
  with qemu-system-xen, the device model built against them;
- ``tree/``: the same Xen .debs unpacked with ``dpkg-deb -x`` into one install tree;
- ``files/``: ``xen.gz``, ``vmlinuz`` and ``modules/`` (the kernel package unpacked), given
  as files ("your own hypervisor and kernel").

apt runs with a private state directory, so the host's own apt lists are untouched and
any suite can be fetched. A directory is written under a temporary name and renamed when
whole.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .timeouts import APT_FETCH_S

XEN_DEB = re.compile(r"^(xen|libxen)")  # xen-*, xenstore-utils, libxen*
DEVICE_MODEL_DEB = "qemu-system-xen"


class PrepareError(RuntimeError):
    """Fetching or unpacking Debian's binaries failed; the message says what to do."""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_FETCH_S)
    except FileNotFoundError:
        raise PrepareError(f"{cmd[0]} is not installed: apt-get install apt dpkg") from None
    if out.returncode != 0:
        raise PrepareError(f"`{' '.join(cmd[:4])} ...` failed (exit {out.returncode}):\n"
                           f"{out.stderr.strip()[-2000:]}")
    return out.stdout


class PrivateApt:
    """apt-get with its own sources and state, for one suite of one mirror."""

    def __init__(self, root: Path, mirror: str, suite: str) -> None:
        self.root = root
        for d in ("lists/partial", "cache/archives/partial", "etc/preferences.d", "etc/apt.conf.d"):
            (root / d).mkdir(parents=True, exist_ok=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (root / "etc/sources.list").write_text(f"deb [signed-by={keyring}] {mirror} {suite} main\n")
        (root / "status").write_text("")

    def options(self) -> list[str]:
        r = self.root
        return ["-o", f"Dir::Etc::SourceList={r}/etc/sources.list", "-o", "Dir::Etc::SourceParts=-",
                "-o", f"Dir::Etc::Preferences={r}/etc/preferences", "-o",
                f"Dir::Etc::PreferencesParts={r}/etc/preferences.d", "-o", f"Dir::State::Lists={r}/lists",
                "-o", f"Dir::State::status={r}/status", "-o", f"Dir::Cache={r}/cache",
                "-o", "APT::Architecture=amd64", "-o", "Acquire::Retries=3",
                "-o", "Debug::NoLocking=1"]

    def update(self) -> None:
        _run(["apt-get", *self.options(), "update"])

    def xen_packages(self) -> list[str]:
        """Xen's binary packages that xen-system-amd64 pulls in (hypervisor, tools, libraries)."""
        out = _run(["apt-cache", *self.options(), "depends", "--recurse", "--no-recommends",
                    "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
                    "--no-enhances", "xen-system-amd64"])
        names = {line.strip() for line in out.splitlines() if not line.startswith(" ")}
        return sorted(n for n in names if XEN_DEB.match(n) and not n.startswith("xen-system"))

    def kernel_package(self) -> str:
        out = _run(["apt-cache", *self.options(), "depends", "linux-image-amd64"])
        found = re.findall(r"Depends: (linux-image-[0-9]\S*)", out)
        if not found:
            raise PrepareError("linux-image-amd64 depends on no versioned linux-image package")
        return found[0]

    def download(self, names: list[str], dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.options(), "download", *names], cwd=dest)


def _unpack_all(debs: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(dest)])


def _files(apt: PrivateApt, tree: Path, dest: Path, work: Path) -> None:
    xen = sorted(p for p in (tree / "boot").glob("xen-*.gz") if not p.is_symlink())
    if not xen:
        raise PrepareError(f"the Xen hypervisor .deb put no boot/xen-*.gz into {tree}")
    dest.mkdir(parents=True)
    shutil.copy(xen[-1], dest / "xen.gz")
    kernel_debs = work / "kernel-debs"
    apt.download([apt.kernel_package()], kernel_debs)
    _unpack_all(sorted(kernel_debs.glob("*.deb")), dest / "modules")
    vmlinuz = sorted((dest / "modules/boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise PrepareError("the kernel package has no boot/vmlinuz-*")
    shutil.move(vmlinuz[-1], dest / "vmlinuz")
    for extra in (dest / "modules/boot").glob("System.map-*"):
        extra.unlink()  # boot/config-* stays: update-initramfs reads it


def prepare(suite: str, mirror: str, out_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """Write OUT_DIR/SUITE/{debs,tree,files}; return OUT_DIR/SUITE. Replaces an older one."""
    final = out_dir / suite
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{suite}-") as tmp:
        work = Path(tmp)
        apt = PrivateApt(work / "apt", mirror, suite)
        progress(f"[inputs {suite}] apt-get update ({suite} main)")
        apt.update()
        names = apt.xen_packages()
        progress(f"[inputs {suite}] apt-get download {' '.join(names)} {DEVICE_MODEL_DEB}")
        new = work / "new"
        apt.download([*names, DEVICE_MODEL_DEB], new / "debs")
        xen_debs = sorted(d for d in (new / "debs").glob("*.deb") if XEN_DEB.match(d.name))
        progress(f"[inputs {suite}] dpkg-deb -x {len(xen_debs)} Xen .debs into tree/")
        _unpack_all(xen_debs, new / "tree")
        progress(f"[inputs {suite}] files/: xen.gz, vmlinuz, modules/ from {apt.kernel_package()}")
        _files(apt, new / "tree", new / "files", work)
        if final.exists():
            shutil.rmtree(final)
        new.rename(final)
    return final
