"""From a run config to a ready Xen host: image, machine, boot or restore, prepare.

A cold boot prepares dom0 (agent and guest payload copied in) and, unless
snapshots are off, saves an L1 snapshot: QEMU's memory stream plus the frozen
disk overlay it belongs to. Later hosts restore it in seconds. Snapshots are
keyed by everything that shapes them; one that cannot be restored is
discarded with a warning and the host boots cold instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from . import dom0_layout as layout
from . import timeouts as t
from .accel import AccelChoice, choose_accel
from .agent.channel import ChannelError
from .agent.client import Agent, AgentError
from .config import ConfigError, HostRecipe, RunConfig, load_recipe
from .dom0_files import PREPARED, GuestPayload, digest, install, payload_files
from .host import XenHost, machine_spec
from .imaging import HostImage, ImageBuilder
from .inputs import InputError
from .machines.base import MachineError, MachineSpec, SnapshotFiles, Stage
from .machines.qemu import QemuMachine, Registry, device_model, qemu_version
from .remote import CommandFailed, RemoteError

log = logging.getLogger(__name__)

# Bump when prepare() changes what it puts into dom0.
PREPARE_VERSION = 2
# A restored dom0's SSH and channel: each one's reason in harness/timeouts.py.
RESTORE_SSH_TIMEOUT = t.RESTORE_SSH_S
RESTORE_CHANNEL_TIMEOUT = t.RESTORE_CHANNEL_S
RESTORE_SSH_ATTEMPT = t.RESTORE_SSH_ATTEMPT_S


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class SnapshotStore:
    """L1 snapshots beside the images: <cache>/snapshots/<key>/{memory,disk.qcow2,meta.json}."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> SnapshotFiles | None:
        d = self.path(key)
        if (d / "meta.json").exists() and (d / "memory").exists() and (d / "disk.qcow2").exists():
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                return None
            return SnapshotFiles(d / "memory", d / "disk.qcow2", meta.get("stream", "stream"),
                                 channel=bool(meta.get("channel")))
        return None

    def discard(self, key: str, why: str) -> None:
        log.warning("discarding L1 snapshot %s: %s", key, why)
        shutil.rmtree(self.path(key), ignore_errors=True)

    def drop_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def save(self, key: str, host: XenHost, meta: dict) -> Path | None:
        """Snapshot ``host`` under ``key`` unless another run already did."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path(key)) + ".lock"):
            if self.lookup(key):
                return None
            self._reap_temps()
            tmp = self.root / f".tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                started = time.monotonic()
                settled = host.settle_for_snapshot()
                settled["seconds"] = round(time.monotonic() - started, 2)
                started = time.monotonic()
                files = host.machine.snapshot(tmp)
                meta = dict(meta, saved_seconds=round(time.monotonic() - started, 2), stream=files.stream,
                            dom0_settle=settled,
                            memory_bytes=files.memory.stat().st_size,
                            # mapped-ram leaves zero pages as holes: what the file really holds
                            memory_allocated_bytes=files.memory.stat().st_blocks * 512,
                            disk_bytes=files.disk.stat().st_size)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
                shutil.rmtree(self.path(key), ignore_errors=True)  # incomplete leftover
                os.rename(tmp, self.path(key))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self.path(key)

    def _reap_temps(self) -> None:
        for tmp in self.root.glob(".tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(tmp, ignore_errors=True)


def inputs_dir(cfg: RunConfig) -> Path:
    """Where relative input paths point: $NESTED_XEN_INPUTS, else <cache>/inputs
    (`nested-xen inputs` prepares Debian's binaries there)."""
    env = os.environ.get("NESTED_XEN_INPUTS")
    return Path(env).expanduser() if env else cfg.resolved_cache_dir() / "inputs"


class Provisioner:
    """Builds images and hands out ready Xen hosts (cold-booted or restored)."""

    def __init__(self, cfg: RunConfig, progress: Callable[[str], None] | None = None,
                 guest_payload: Callable[[HostImage], GuestPayload] | None = None,
                 setup_guests: Callable[[XenHost], None] | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or (lambda line: log.info("%s", line))
        self.cache = cfg.resolved_cache_dir()
        self.accel: AccelChoice = choose_accel(cfg.accel)
        self.builder = ImageBuilder(self.cache, cfg.mirror, self.progress, cfg.allow_expired_release)
        self.registry = Registry(self.cache / "run")
        self.snapshots = SnapshotStore(self.cache / "snapshots")
        self.guest_payload = guest_payload
        self.setup_guests = setup_guests
        self._images: dict[str, tuple[HostRecipe, HostImage]] = {}
        if cfg.rebuild:
            self.snapshots.drop_all()

    def recipe(self, name: str) -> HostRecipe:
        recipe = load_recipe(name)
        if self.cfg.dom0 and self.cfg.dom0 != recipe.dom0:
            recipe = dataclasses.replace(recipe, dom0=self.cfg.dom0)
        # The run's own-build inputs over the recipe's; relative paths against the inputs dir.
        try:
            inputs = recipe.inputs.over(self.cfg.inputs).resolved(inputs_dir(self.cfg))
        except InputError as exc:
            raise ConfigError(f"recipe {recipe.name}: {exc}") from None
        return dataclasses.replace(recipe, inputs=inputs)

    def image(self, name: str) -> tuple[HostRecipe, HostImage]:
        if name not in self._images:
            recipe = self.recipe(name)
            self._images[name] = (recipe, self.builder.get(recipe, rebuild=self.cfg.rebuild))
        return self._images[name]

    # ------------------------------------------------------------------ hosts
    def host(self, image_name: str, label: str, run_dir: Path,
             link_to: XenHost | None = None, snapshot: str | None = None) -> XenHost:
        """A ready host: restored from a snapshot when one fits, else booted cold.

        With ``link_to``, the new host's link NIC is wired to that host's: a private
        network of two L1s over UDP on 127.0.0.1."""
        recipe, image = self.image(image_name)
        link = link_to.link.reversed() if link_to else None
        spec = machine_spec(label, recipe, image, self.cfg, self.accel, run_dir, link)
        mode = snapshot or self.cfg.snapshot
        payload = self.guest_payload(image) if self.guest_payload else None
        key = self.snapshot_key(image, spec, payload)
        if mode == "refresh":
            self.snapshots.discard(key, "snapshot=refresh")
        if mode != "off":
            restored = self._try_restore(key, label, spec, recipe, image)
            if restored:
                return restored
        host = self._cold(label, spec, recipe, image, payload)
        if mode != "off":
            self._save(key, host, image, spec)
        return host

    def _new_host(self, label: str, spec: MachineSpec, recipe: HostRecipe, image: HostImage) -> XenHost:
        if self.cfg.backend == "libvirt":
            from .machines.libvirt import LibvirtMachine  # libvirt-python is optional

            machine = LibvirtMachine(spec, self.cfg.libvirt_uri)
        else:
            machine = QemuMachine(spec, self.registry)
        host = XenHost.create(label, machine, image, recipe, self.cfg.timeouts)
        host.guest_paging = self.cfg.guests.paging  # what the facts say the PVH/HVM guests run on
        return host

    def _cold(self, label: str, spec: MachineSpec, recipe: HostRecipe, image: HostImage,
              payload: GuestPayload | None) -> XenHost:
        host = self._new_host(label, spec, recipe, image)
        self.progress(f"[{label}] cold boot of {image.name} ({self.accel.accel})")
        try:
            host.boot(self.cfg.timeouts)
            started = time.monotonic()
            self.progress(f"[{label}] preparing dom0: agent, channel service, guest payload")
            prepare(host, payload, self.cache)
            host.timings["prepare"] = round(time.monotonic() - started, 2)
            if self.setup_guests:
                self.progress(f"[{label}] starting the shared guests ({', '.join(self.cfg.snapshot_guests)})")
                started = time.monotonic()
                self.setup_guests(host)
                host.timings["guests"] = round(time.monotonic() - started, 2)
        except BaseException:
            host.stop()
            raise
        host.timings["path"] = "cold"  # type: ignore[assignment]
        self.progress(f"[{label}] cold boot: dom0 ready in {host.timings['boot_total']:.1f} s, "
                      f"prepared in {host.timings['prepare']:.1f} s"
                      + (f", shared guests ready in {host.timings['guests']:.1f} s"
                         if "guests" in host.timings else ""))
        return host

    def _try_restore(self, key: str, label: str, spec: MachineSpec, recipe: HostRecipe,
                     image: HostImage) -> XenHost | None:
        files = self.snapshots.lookup(key)
        if files is None:
            return None
        host = self._new_host(label, spec, recipe, image)
        started = time.monotonic()
        try:
            host.machine.start(incoming=files)
            host.remote.port = host.machine.ssh_address[1]
            host.machine.wait_incoming(incoming=files)
            host.timings["restore_running"] = round(time.monotonic() - started, 2)
            answered = self._restore_channel(host, files, label)
            if answered:
                host.timings["restore"] = round(time.monotonic() - started, 2)
            host.machine.wait_ready([Stage("dom0-ssh", RESTORE_SSH_TIMEOUT,
                                           "restored dom0 did not answer over SSH",
                                           probe=lambda: host.remote.try_connect(RESTORE_SSH_ATTEMPT),
                                           interval=0.05)])
            host.timings["restore_ssh"] = round(time.monotonic() - started, 2)
            if not answered:
                host.timings["restore"] = host.timings["restore_ssh"]
                host.sync_clock()
                host.timings["clock_sync"] = round(time.monotonic() - started - host.timings["restore"], 2)
        except (MachineError, RemoteError, OSError) as exc:
            host.stop()
            self.snapshots.discard(key, f"restore failed ({str(exc).splitlines()[0]}); booting cold")
            return None
        except BaseException:
            host.stop()
            raise
        host.timings["path"] = "restored"  # type: ignore[assignment]
        how = "over the channel (clock set)" if answered else "over SSH"
        self.progress(f"[{label}] restored L1 snapshot {key}: VM running in "
                      f"{host.timings['restore_running']:.2f} s, dom0 answered {how} in "
                      f"{host.timings['restore']:.2f} s, SSH in {host.timings['restore_ssh']:.2f} s")
        return host

    @staticmethod
    def _restore_channel(host: XenHost, files: SnapshotFiles, label: str) -> bool:
        """Ask the restored dom0 over the channel to set its clock: True once it has.
        A snapshot without the channel, or a channel that does not answer, leaves it
        to SSH (a warning says which)."""
        if not (files.channel and host.channel):
            return False
        started = time.monotonic()
        try:
            answer = host.sync_clock_over_channel(RESTORE_CHANNEL_TIMEOUT)
        except ChannelError as exc:
            log.warning("[%s] %s; going on over SSH", label, exc)
            host.channel.close()
            host.channel = None
            return False
        host.timings["clock_sync"] = round(time.monotonic() - started, 2)
        log.info("[%s] restored dom0 up %.0f s (snapshot age included), clock set to %.3f",
                 label, answer.get("uptime_s", 0), answer.get("realtime", 0))
        return True

    def _save(self, key: str, host: XenHost, image: HostImage, spec: MachineSpec) -> None:
        meta = {"key": key, "image": image.name, "image_key": image.key,
                "qemu": qemu_version(spec.qemu_binary), "accel": spec.accel.accel,
                "channel": host.channel is not None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            path = self.snapshots.save(key, host, meta)
        except (MachineError, RemoteError, CommandFailed, OSError, ValueError) as exc:
            log.warning("could not save an L1 snapshot (%s); runs will boot cold", exc)
            return
        if path:
            saved = json.loads((path / "meta.json").read_text())
            settled = saved.get("dom0_settle", {})
            on_disk = saved.get("memory_allocated_bytes", saved["memory_bytes"]) / 2**20
            self.progress(f"[{host.name}] saved L1 snapshot {key} in {saved['saved_seconds']:.1f} s "
                          f"({on_disk:.0f} MiB of memory on disk; dom0 page cache "
                          f"dropped and {settled.get('zeroed_mib', 0)} MiB free memory zeroed first, "
                          f"{settled.get('seconds', 0):.1f} s)")

    def snapshot_key(self, image: HostImage, spec: MachineSpec, payload: GuestPayload | None) -> str:
        """Everything that shapes a snapshot; a change to any of it makes a new one."""
        # dom0_files.py lists what goes into dom0 (with the guest payload); provision.py
        # prepares it; settle.py empties its free memory before the save.
        prep = [Path(__file__), Path(__file__).with_name("settle.py")]
        if self.setup_guests:
            prep.append(Path(__file__).with_name("guests.py"))
        files = digest(PREPARED + payload_files(payload))
        material = {
            "image": image.key,
            "qemu": qemu_version(spec.qemu_binary),
            "append": spec.append,
            "modules": [m.args for m in spec.modules],
            "memory": spec.memory_mb,
            "cpus": spec.cpus,
            "accel": [spec.accel.accel, spec.accel.cpu],
            "devices": device_model(spec),  # from the spec: no machine built, no port bound
            "iommu": spec.iommu,
            "prepare": [PREPARE_VERSION, _file_digest(prep), files],
            "guests": list(self.cfg.snapshot_guests) if self.setup_guests else [],
            "guest_paging": self.cfg.guests.paging,
        }
        if self.cfg.backend != "qemu":  # another snapshot format, on the libvirt host
            material["backend"] = [self.cfg.backend, self.cfg.libvirt_uri]
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def prepare(host: XenHost, payload: GuestPayload | None, cache: Path) -> None:
    """Put what checks need into dom0 (harness/dom0_files.py: the agent, built into the
    run's ``cache``, the watcher, the channel service, then the guest payload), check that
    the agent answers with this harness's version, and start the channel service."""
    install(host.remote, PREPARED, cache)  # harness/dom0_files.py
    try:
        Agent(host.remote.as_runner()).handshake()
    except AgentError as exc:
        raise AgentError(f"[{host.name}] the dom0 agent just installed: {exc}", answer=exc.answer) from None
    host.remote.run_expect(f"systemctl daemon-reload && systemctl enable --now {layout.CHANNEL_SERVICE}",
                           timeout=t.SERVICE_START_S)
    if host.channel is not None:
        # The snapshot records whether the channel answered, so restores know to use it.
        try:
            host.channel.request("ping", timeout=t.CHANNEL_FIRST_PING_S)
        except ChannelError as exc:
            log.warning("[%s] %s; this host and its snapshot go without the channel "
                        "(restores wait for SSH)", host.name, exc)
            host.channel.close()
            host.channel = None
    install(host.remote, payload_files(payload))
    host.remote.run_expect("sync", timeout=t.SMALL_COMMAND_S)
