"""Build and cache host images from images/hosts/*.yaml recipes.

A host image is a directory in the cache holding an ext4 root filesystem for
dom0, the Xen hypervisor (gunzipped, for QEMU's multiboot loader), the dom0
kernel and initrd, a per-image SSH key and a manifest. It is built with
mmdebstrap (root mode as root, unshare mode without root) and ``mkfs.ext4 -d``
-- no loop mounts -- and keyed by a hash of the recipe, so a second run reuses
it and ``rebuild=True`` forces a new one. Concurrent builds of one key take a
file lock; a build is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from . import dom0_layout as layout
from . import input_image
from . import timeouts as t
from .config import HostRecipe
from .dom0_overlay import ROOT_LABEL, generate_ssh_key, write_overlay  # noqa: F401 (re-exported)
from .inputs import InputError
from .inputs import check as check_inputs
from .procs import pid_alive

log = logging.getLogger(__name__)

# Bump when the way an image is built changes (overlay files, hooks, layout).
IMAGE_FORMAT = 3
REMOTE_PAYLOAD_DIR = layout.PAYLOAD_DIR


class ImageError(RuntimeError):
    """An image could not be built or found; the message says what to do."""


class CommandError(ImageError):
    """A build command exited non-zero: its exit status and last lines of output."""

    def __init__(self, message: str, rc: int, tail: list[str]) -> None:
        super().__init__(message)
        self.rc = rc
        self.tail = tail


# mmdebstrap's exit status when apt's update failed, e.g. on a Release file past its
# Valid-Until ("Release file for .../InRelease is expired (invalid since 25d 8h)").
MMDEBSTRAP_APT_UPDATE_FAILED = 25
NO_VALID_UNTIL = 'Acquire::Check-Valid-Until "false"'


def expired_release(exc: CommandError) -> str | None:
    """What apt said about the expired Release file ("Release file for URL is expired
    (invalid since 25d 8h)"), when that is why the build failed (mmdebstrap exit 25);
    else None."""
    if exc.rc != MMDEBSTRAP_APT_UPDATE_FAILED:
        return None
    line = next((line for line in exc.tail if "is expired" in line), None)
    if line is None:
        return None
    match = re.search(r"Release file for \S+ is expired(?: \([^)]*\))?", line)
    return match.group(0) if match else line.strip()


@dataclass(frozen=True)
class HostImage:
    """A built host image in the cache."""

    name: str
    key: str
    dir: Path

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"

    @property
    def xen(self) -> Path:
        return self.dir / "xen"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def guest_kernel(self) -> Path:
        """The guests' kernel: an input's own bzImage if given for guests, else dom0's."""
        own = self.dir / "guest-vmlinuz"
        return own if own.exists() else self.kernel

    @property
    def busybox(self) -> Path:
        return self.dir / "busybox"

    @property
    def ssh_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())


def image_key(recipe: HostRecipe, mirror: str) -> str:
    material = {"format": IMAGE_FORMAT, "recipe": recipe.key_material(), "mirror": mirror}
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- mirror


def resolve_mirror(override: str | None, recipe: HostRecipe) -> str:
    """The Debian mirror: run config, else recipe, else the host's apt, else debootstrap's."""
    return mirror_and_source(override, recipe)[0]


def mirror_and_source(override: str | None, recipe: HostRecipe) -> tuple[str, str]:
    """The Debian mirror and where it came from (what ``nested-xen doctor`` prints)."""
    for candidate, where in ((override, "the run config's mirror"), (recipe.mirror, f"recipe {recipe.name}"),
                             (_host_apt_mirror(), "this host's apt sources"),
                             (_debootstrap_default(), "debootstrap's default")):
        if candidate:
            return candidate.rstrip("/"), where
    raise ImageError(
        "no Debian mirror known: set `mirror:` in the run config (or --mirror), "
        "or install debootstrap, whose default mirror is used otherwise"
    )


def _host_apt_mirror() -> str | None:
    """The first Debian (not security) URI in the host's apt sources, if any."""
    sources = Path("/etc/apt/sources.list.d")
    paths = [*sorted(sources.glob("*.sources")), Path("/etc/apt/sources.list"),
             *sorted(sources.glob("*.list"))]
    texts = [p.read_text() for p in paths if p.is_file()]
    for text in texts:
        for uri in re.findall(r"(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return None


def _debootstrap_default() -> str | None:
    script = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    try:
        text = Path(script).read_text()
    except OSError:
        return None
    match = re.search(r'^DEF_MIRROR="([^"]+)"', text, re.M)
    return match.group(1) if match else None


# Shell hooks run by mmdebstrap after the packages are installed; "$1" is the
# new root. Kept as data so the image key covers them through IMAGE_FORMAT.
CUSTOMIZE_HOOKS = (
    f'cat "$1{layout.XEN_DEFAULTS_ADDITION}" >> "$1{layout.XEN_DEFAULTS_FILE}"',
    'chroot "$1" systemctl enable systemd-networkd.service',
    'chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer '
    "e2scrub_all.timer e2scrub_reap.service systemd-networkd-wait-online.service "
    "getty@tty1.service serial-getty@hvc0.service",
    f'rm -f "$1{layout.MACHINE_ID}" && touch "$1{layout.MACHINE_ID}"',
    f'mkdir -p "$1{layout.CONSOLE_DIR}" "$1{layout.PAYLOAD_DIR}"',
)


# --------------------------------------------------------------------------- build


def build_command(
    recipe: HostRecipe,
    mirror: str,
    overlay: Path,
    stage: Path,
    target: Path,
    mode: str,
    check_valid_until: bool = True,
    found: dict[str, str] | None = None,
) -> list[str]:
    """The mmdebstrap command line that builds ``recipe`` into ``target``; without
    ``check_valid_until`` apt accepts Release files past their Valid-Until; ``found`` is
    what checking the recipe's inputs found (harness/inputs.py)."""
    inputs = recipe.inputs
    sources = [f"deb {mirror} {recipe.suite} {' '.join(recipe.components)}"]
    sources += [f"deb {mirror} {s} {' '.join(recipe.components)}" for s in recipe.extra_suites]
    cmd = [
        "mmdebstrap",
        f"--mode={mode}",
        "--variant=apt",
        "--include=" + ",".join(input_image.packages(recipe.packages, inputs)),
        *input_image.include_args(inputs),
        "--aptopt=Acquire::Retries=3",
        *([] if check_valid_until else [f"--aptopt={NO_VALID_UNTIL}"]),
        f"--customize-hook=sync-in {overlay} /",
    ]
    if not inputs.empty:
        cmd += [f"--customize-hook={hook}" for hook in input_image.hooks(inputs, found or {})]
    cmd += [f"--customize-hook={hook}" for hook in CUSTOMIZE_HOOKS]
    cmd += [
        f"--customize-hook=sync-out {layout.BOOT_DIR} {stage / 'boot'}",
        f'--customize-hook=cp "$1{layout.BUSYBOX}" {stage / "busybox"}',
        recipe.suite,
        str(target),
    ]
    cmd += sources
    return cmd


def pick_newest(directory: Path, pattern: str) -> Path:
    """The file matching ``pattern`` with the highest version-like name."""
    matches = sorted(directory.glob(pattern), key=lambda p: _natural_key(p.name))
    if not matches:
        raise ImageError(
            f"the image has no file matching {pattern!r} under {directory}: "
            "check the recipe's `boot:` globs and that its packages install a kernel and Xen"
        )
    return matches[-1]


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _run_streaming(cmd: list[str], progress: Callable[[str], None]) -> None:
    log.debug("run: %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace", bufsize=1,
        )
    except FileNotFoundError:
        raise ImageError(
            f"{cmd[0]} is not installed: run `apt-get install {cmd[0]}` "
            "(or `nested-xen doctor` to see everything this host lacks)"
        ) from None
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-30:]
            progress(line)
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=t.BUILD_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc != 0:
        raise CommandError(f"{cmd[0]} failed with exit status {rc}; last output:\n" + "\n".join(tail),
                           rc, tail)


class ImageBuilder:
    """Builds recipes into the cache and finds built images."""

    def __init__(
        self,
        cache_dir: Path,
        mirror: str | None = None,
        progress: Callable[[str], None] | None = None,
        allow_expired_release: bool = False,
    ) -> None:
        self.root = cache_dir / "images"
        self.mirror_override = mirror
        self.allow_expired_release = allow_expired_release
        self.progress = progress or (lambda line: log.info("%s", line))

    def image_dir(self, recipe: HostRecipe) -> tuple[str, Path]:
        key = image_key(recipe, resolve_mirror(self.mirror_override, recipe))
        return key, self.root / f"{recipe.name}-{key}"

    def cached(self, recipe: HostRecipe) -> HostImage | None:
        key, final = self.image_dir(recipe)
        if (final / "manifest.json").exists():
            return HostImage(recipe.name, key, final)
        return None

    def get(self, recipe: HostRecipe, rebuild: bool = False) -> HostImage:
        """Return the cached image for ``recipe``, building it if needed."""
        self.check_inputs(recipe)  # before anything is built, locked or booted
        key, final = self.image_dir(recipe)
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if rebuild and final.exists():
                self.progress(f"[image {recipe.name}] --rebuild: dropping {final}")
                shutil.rmtree(final)
            if (final / "manifest.json").exists():
                self.progress(f"[image {recipe.name}] cached: {final}")
                return HostImage(recipe.name, key, final)
            self._reap_stale_builds()
            self._build(recipe, key, final)
        return HostImage(recipe.name, key, final)

    @staticmethod
    def check_inputs(recipe: HostRecipe) -> dict[str, str]:
        """Check the recipe's own-build inputs before anything is built or booted."""
        try:
            return check_inputs(recipe.inputs)
        except InputError as exc:
            raise ImageError(f"recipe {recipe.name}: inputs: {exc}") from None

    def _reap_stale_builds(self) -> None:
        for stale in self.root.glob(".build-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                log.warning("removing half-built image %s left by a killed run", stale)
                shutil.rmtree(stale, ignore_errors=True)

    def _build(self, recipe: HostRecipe, key: str, final: Path) -> None:
        found = self.check_inputs(recipe)
        mirror = resolve_mirror(self.mirror_override, recipe)
        work = self.root / f".build-{recipe.name}-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        started = time.monotonic()
        self.progress(f"[image {recipe.name}] building {final.name} from {mirror} (a few minutes)")
        try:
            self._build_into(recipe, mirror, work, found)
            manifest = self._finish(recipe, key, mirror, work, time.monotonic() - started)
            shutil.rmtree(final, ignore_errors=True)  # an interrupted --rebuild's remains
            os.rename(work / "out", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.progress(
            f"[image {recipe.name}] built in {manifest['build_seconds']:.0f} s: {final}"
        )

    def _build_into(self, recipe: HostRecipe, mirror: str, work: Path, found: dict[str, str]) -> None:
        out = work / "out"
        stage = work / "stage"
        overlay = work / "overlay"
        for d in (out, stage, overlay):
            d.mkdir(parents=True)
        public = generate_ssh_key(out / "id_ed25519")
        write_overlay(overlay, public, out / "id_ed25519")
        rootless = os.geteuid() != 0
        target = work / ("rootfs.ext2" if rootless else "rootfs")
        self._bootstrap(recipe, mirror, overlay, stage, target, "unshare" if rootless else "root", found)
        self._make_filesystem(recipe, target, out / "rootfs.ext4", rootless)
        self._extract_boot(recipe, stage, out, found)

    def _bootstrap(self, recipe: HostRecipe, mirror: str, overlay: Path, stage: Path, target: Path,
                   mode: str, found: dict[str, str] | None = None) -> None:
        """mmdebstrap, once more without apt's Valid-Until check when the mirror's Release
        file turns out to be expired (saying so), or at once when the recipe or run
        config allows expired Release files."""
        def say(line: str) -> None:
            self.progress(f"[image {recipe.name}] {line}")

        check = not (recipe.allow_expired_release or self.allow_expired_release)
        if not check:
            say(f"apt will accept an expired Release file for {recipe.suite} "
                f"(allow_expired_release: {NO_VALID_UNTIL})")
        try:
            _run_streaming(build_command(recipe, mirror, overlay, stage, target, mode, check, found), say)
            return
        except CommandError as exc:
            expired = expired_release(exc) if check else None
            if expired is None:
                raise
        say(f"{mirror}: {expired}; building again with apt's {NO_VALID_UNTIL} (set "
            "allow_expired_release: true in the recipe or run config to skip this first try)")
        shutil.rmtree(target, ignore_errors=True)
        _run_streaming(build_command(recipe, mirror, overlay, stage, target, mode, False, found), say)

    def _make_filesystem(self, recipe: HostRecipe, target: Path, image: Path, rootless: bool) -> None:
        """ext4 from the tree (root) or grow the ext2 mmdebstrap made (rootless)."""
        extra = recipe.free_space_mb * 1024 * 1024
        if rootless:
            os.rename(target, image)
            size_mb = (image.stat().st_size + extra) // (1024 * 1024)
            _run_streaming(["e2fsck", "-fy", str(image)], self.progress)
            _run_streaming(["tune2fs", "-L", ROOT_LABEL, "-j", str(image)], self.progress)
            _run_streaming(["resize2fs", str(image), f"{size_mb}M"], self.progress)
            return
        size_mb = (int(_tree_size(target) * 1.15) + extra) // (1024 * 1024)
        self.progress(f"[image {recipe.name}] mkfs.ext4 -d ({size_mb} MiB, sparse)")
        _run_streaming(
            ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(target), str(image), f"{size_mb}M"],
            self.progress,
        )
        shutil.rmtree(target)

    def _extract_boot(self, recipe: HostRecipe, stage: Path, out: Path, found: dict[str, str]) -> None:
        inputs = recipe.inputs
        xen_gz = (Path(inputs.xen) if inputs.xen else
                  input_image.newest_xen(stage / "boot") if inputs.replaces_xen else None)
        xen_gz = xen_gz or pick_newest(stage, recipe.boot.xen)
        if xen_gz.name.endswith(".gz"):
            with gzip.open(xen_gz) as src, open(out / "xen", "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copy(xen_gz, out / "xen")
        release = found.get("kernel_release")
        kernel = Path(inputs.kernel) if inputs.dom0_kernel else pick_newest(stage, recipe.boot.kernel)
        initrd = f"boot/initrd.img-{release}" if inputs.dom0_kernel else recipe.boot.initrd
        shutil.copy(kernel, out / "vmlinuz")
        shutil.copy(pick_newest(stage, initrd), out / "initrd.img")
        if inputs.guest_kernel:
            shutil.copy(inputs.kernel or "", out / "guest-vmlinuz")
        shutil.copy(stage / "busybox", out / "busybox")
        (out / "boot-files.json").write_text(
            json.dumps({"xen": xen_gz.name, "kernel": kernel.name}, indent=2)
        )

    def _finish(
        self, recipe: HostRecipe, key: str, mirror: str, work: Path, seconds: float
    ) -> dict:
        out = work / "out"
        boot = json.loads((out / "boot-files.json").read_text())
        manifest = {
            "name": recipe.name,
            "key": key,
            "format": IMAGE_FORMAT,
            "recipe": str(recipe.path),
            "suite": recipe.suite,
            "mirror": mirror,
            "xen_file": boot["xen"],
            "kernel_file": boot["kernel"],
            "inputs": recipe.inputs.label(),
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rootfs_bytes": (out / "rootfs.ext4").stat().st_size,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

