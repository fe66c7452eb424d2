"""A booted Xen host: an L1 machine, SSH to its dom0, and the toolstack.

This is where the machine layer meets Xen: the readiness stages (Xen banner,
dom0 kernel, dom0 answering a command) and the facts read from the booted
host (versions, capabilities, dom0 mode) that checks are gated on.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import dom0_layout as layout
from . import timeouts as t
from .accel import AccelChoice
from .agent.channel import Channel
from .config import HostRecipe, RunConfig, Timeouts
from .imaging import HostImage
from .machines.base import LinkPorts, Machine, MachineSpec, Module, Stage
from .machines.qemu import find_qemu, l1_iommu, qemu_version_label
from .machines.qemu_choice import parse_qemu_release
from .remote import Remote
from .settle import settle_dom0_memory
from .xen import XenInfo, Xl

log = logging.getLogger(__name__)

XEN_BANNER = r"Xen version \d+\.\d+"
DOM0_KERNEL = r"Linux version \d+\.\d+"
LINK_NET = "10.99.0"  # the private L1-to-L1 link; only the two L1s are on it
# A socket netdev carries each frame as one UDP datagram on 127.0.0.1 and has no
# offloads, so fewer, larger frames win: measured here dom0 to dom0 over TCP, 100 MiB
# took 12.4 s at MTU 1500, 10.7 s at 9000 and 3.6 s at 65000 (a datagram holds 65507).
LINK_MTU = 65000


@dataclass(frozen=True)
class HostFacts:
    """What the booted host says about itself (not what the recipe says)."""

    xen_version: str
    kernel_release: str
    dom0_mode: str
    virt_caps: frozenset[str]
    xen_caps: frozenset[str]
    accel: str
    qemu_version: str = "0"  # of the L1's QEMU, "10.0": a nested-SVM fault under TCG can be QEMU's
    # Read from the booted host: `xl info`'s xen_changeset, who built Xen (cc_compile_by@
    # cc_compile_domain), the image's inputs ("debian": its packages; else harness/inputs.py's
    # label) and the device model libxl runs for HVM ("" none on this host, None unknown).
    xen_changeset: str = ""
    xen_build: str = ""
    origin: str = "debian"
    device_model: str | None = None
    # That device model's version, from the binary itself ("11.1.2"), and the package that
    # installed it ("qemu-system-xen 1:11.1.2+ds-3"; "" not from a package); None unknown.
    device_model_version: str | None = None
    device_model_package: str | None = None
    # The L1's IOMMU device ("" none: a PV dom0's L1 has none), with `pt=off` where that
    # QEMU's AMD IOMMU has the unfixed pass-through mode (machines/qemu.py: iommu_device).
    l1_iommu: str = ""
    # How the run's PVH and HVM guests' memory is translated here: "hap" (EPT/NPT, emulated
    # under TCG) or "shadow" (the run's `guests: paging: shadow`, or a Xen without HAP); ""
    # unknown or no HVM. What Xen offers is in virt_caps.
    paging: str = ""

    def as_dict(self) -> dict:
        return {
            "xen_version": self.xen_version,
            "kernel_release": self.kernel_release,
            "dom0_mode": self.dom0_mode,
            "virt_caps": sorted(self.virt_caps),
            "xen_caps": sorted(self.xen_caps),
            "accel": self.accel,
            "qemu_version": self.qemu_version,
            "xen_changeset": self.xen_changeset,
            "xen_build": self.xen_build,
            "origin": self.origin,
            "device_model": self.device_model,
            "device_model_version": self.device_model_version,
            "device_model_package": self.device_model_package,
            "l1_iommu": self.l1_iommu,
            "paging": self.paging,
        }


# Line 1: the image's inputs label; line 2: libxl's device model, if present and executable;
# line 3: its `--version` line; line 4: the package that installed it and its version.
DEVICE_MODEL_PROBE = (
    f"cat {layout.INPUTS_FILE} 2>/dev/null || echo debian; "
    "lib=$(ldconfig -p | awk '/libxenlight\\.so/{print $NF; exit}'); "
    "dm=$(grep -aoE '/[-_./A-Za-z0-9]*qemu-system-i386' \"$lib\" 2>/dev/null | head -n1); "
    "if [ -n \"$dm\" ] && [ -x \"$dm\" ]; then echo \"$dm\"; "
    f"echo \"$(timeout {t.QEMU_VERSION_S:g} \"$dm\" --version 2>&1 | head -n1)\"; "
    # dpkg knows a file by the path its package ships (usrmerge: /bin/x for /usr/bin/x)
    "pkg=$(for f in \"$dm\" \"$(readlink -f \"$dm\")\" \"${dm#/usr}\"; do "
    "dpkg -S \"$f\" 2>/dev/null && break; done); pkg=${pkg%%:*}; pkg=${pkg%%,*}; "
    "[ -n \"$pkg\" ] && echo \"$pkg $(dpkg-query -W --showformat='${Version}' \"$pkg\" 2>/dev/null)\" "
    "|| echo; "
    "else echo; fi"
)


def device_model_version(line: str) -> str:
    """The version a device model's `--version` line gives, "11.1.2" for "QEMU emulator
    version 11.1.2 (Debian 1:11.1.2+ds-3)" ("" if it names none)."""
    release = parse_qemu_release(line)
    return ".".join(map(str, release)) if release else ""


@dataclass(frozen=True)
class DeviceModel:
    """What DEVICE_MODEL_PROBE found: the image's inputs label, libxl's device model ("" none
    here), its version and package ("" each when unknown or none)."""

    origin: str
    path: str
    version: str = ""
    package: str = ""


def parse_device_model_probe(text: str) -> DeviceModel:
    lines = [line.strip() for line in text.splitlines()] + ["", "", "", ""]
    path = lines[1]
    return DeviceModel(lines[0] or "debian", path, device_model_version(lines[2]) if path else "",
                       lines[3].strip() if path else "")


def guest_paging(offered: str, asked: str) -> str:
    """The paging PVH and HVM guests get on a Xen that offers ``offered`` (XenInfo.paging)
    when the run asks for ``asked``: shadow when asked (`hap = 0`) or when Xen has no HAP
    (libxl's default then); "" where Xen offers neither."""
    if not offered:
        return ""
    return "shadow" if asked == "shadow" else offered


def build_of(raw: dict[str, str]) -> str:
    """Who built the running Xen and when, from `xl info`: 'user@domain date'."""
    who = raw.get("cc_compile_by", "")
    domain = raw.get("cc_compile_domain", "")
    return f"{who}@{domain} {raw.get('cc_compile_date', '')}".strip(" @")


def image_facts(recipe: HostRecipe, image: HostImage, accel: str, qemu: str = "0") -> HostFacts:
    """What a host of this image is expected to report, read from the image's file names
    (``xen-4.17-amd64.gz`` -> 4.17, ``vmlinuz-6.1.0-50-amd64`` -> 6.1.0-50-amd64) and the
    dom0 mode asked for: the facts of a host that did not come up (known boot issues)."""
    manifest = image.manifest
    xen = re.search(r"xen-(\d+\.\d+(?:\.\d+)?)", manifest.get("xen_file", ""))
    kernel = manifest.get("kernel_file", "").removeprefix("vmlinuz-")
    return HostFacts(
        xen_version=xen.group(1) if xen else "0",
        kernel_release=kernel or "0",
        dom0_mode=recipe.dom0,
        origin=manifest.get("inputs", "debian"),
        virt_caps=frozenset(),
        xen_caps=frozenset(),
        accel=accel,
        qemu_version=qemu,
    )


def qemu_for(recipe: HostRecipe, cfg: RunConfig, accel: AccelChoice) -> str:
    """The run's QEMU, or under TCG one that meets the recipe's ``qemu_tcg`` range."""
    if accel.accel != "tcg" or not recipe.qemu_tcg or cfg.backend != "qemu":
        return cfg.qemu_binary
    return find_qemu(recipe.qemu_tcg, cfg.qemu_binary, cfg.resolved_cache_dir(),
                     why=f"recipe {recipe.name}: qemu_tcg")


def machine_spec(
    name: str, recipe: HostRecipe, image: HostImage, cfg: RunConfig, accel: AccelChoice,
    run_dir: Path, link: LinkPorts | None = None,
) -> MachineSpec:
    dom0_mem = recipe.dom0_mem_mb
    append = f"{recipe.xen_cmdline} dom0_mem={dom0_mem}M,max:{dom0_mem}M".strip()
    pvh = recipe.dom0 == "pvh"  # the recipe's mode, or the run's `dom0:` / --dom0 over it
    if pvh:
        append += " dom0=pvh"
    return MachineSpec(
        name=name,
        kernel=image.xen,
        append=append,
        modules=(Module(image.kernel, recipe.dom0_cmdline), Module(image.initrd)),
        disk=image.rootfs,
        memory_mb=cfg.memory_mb or recipe.memory_mb,
        cpus=cfg.cpus,
        accel=accel,
        run_dir=run_dir,
        qemu_binary=qemu_for(recipe, cfg, accel),
        link=link,
        iommu=pvh,
    )


def boot_stages(remote: Remote, timeouts: Timeouts) -> list[Stage]:
    return [
        Stage("xen", timeouts.xen_banner, "Xen did not boot", pattern=XEN_BANNER),
        Stage("dom0-kernel", timeouts.dom0_kernel, "the dom0 kernel did not boot",
              pattern=DOM0_KERNEL),
        Stage("dom0-ssh", timeouts.dom0_ssh, "dom0 did not answer over SSH",
              probe=remote.try_connect, interval=1.0),
    ]


@dataclass
class XenHost:
    """A running L1 with dom0 reachable."""

    name: str
    machine: Machine
    remote: Remote
    image: HostImage
    recipe: HostRecipe
    timings: dict[str, float] = field(default_factory=dict)
    _facts: HostFacts | None = None
    guest_pool: object = None  # harness.guests.GuestPool, attached by the pytest plugin
    # The virtio-serial channel to dom0's nxchannel.py (None: this backend has none).
    channel: Channel | None = None
    # The paging the run asks for its PVH and HVM guests (run config guests.paging).
    guest_paging: str = "hap"

    @property
    def xl(self) -> Xl:
        return Xl(self.remote)

    @classmethod
    def create(cls, name: str, machine: Machine, image: HostImage, recipe: HostRecipe,
               timeouts: Timeouts) -> XenHost:
        host, _port = machine.ssh_address
        remote = Remote(host, _port, image.ssh_key, label=name, default_timeout=timeouts.command)
        channel = Channel(machine.channel_path, label=name) if machine.channel_path else None
        return cls(name, machine, remote, image, recipe, channel=channel)

    def boot(self, timeouts: Timeouts) -> None:
        """Start the machine and wait for each readiness stage in turn."""
        started = time.monotonic()
        self.machine.start()
        self.remote.port = self.machine.ssh_address[1]
        self.timings.update(self.machine.wait_ready(boot_stages(self.remote, timeouts)))
        self.timings["boot_total"] = round(time.monotonic() - started, 2)
        log.info("%s: Xen + dom0 ready in %.1f s (%s)", self.name, self.timings["boot_total"],
                 ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))

    def facts(self) -> HostFacts:
        if self._facts is None:
            info: XenInfo = self.xl.info()
            uname = f"uname -r; cat {layout.GUEST_TYPE_FILE} 2>/dev/null || echo unknown"
            out = self.remote.check_output(uname, timeout=t.QUICK_COMMAND_S).split()
            spec = getattr(self.machine, "spec", None)
            accel = getattr(spec, "accel", None)
            probe = self.remote.check_output(DEVICE_MODEL_PROBE, timeout=t.SMALL_COMMAND_S)
            dm = parse_device_model_probe(probe)
            self._facts = HostFacts(
                xen_changeset=info.raw.get("xen_changeset", ""),
                xen_build=build_of(info.raw),
                origin=dm.origin,
                device_model=dm.path,
                device_model_version=dm.version,
                device_model_package=dm.package,
                xen_version=info.xen_version,
                kernel_release=out[0],
                dom0_mode=out[1].lower() if len(out) > 1 else "unknown",
                virt_caps=info.virt_caps,
                xen_caps=info.xen_caps,
                accel=accel.accel if accel else "unknown",
                qemu_version=qemu_version_label(getattr(spec, "qemu_binary", "qemu-system-x86_64")),
                l1_iommu=l1_iommu(spec),
                paging=guest_paging(info.paging, self.guest_paging),
            )
        return self._facts

    def sync_clock(self) -> None:
        """Set dom0's clock to the harness's (a restored snapshot's clock is old)."""
        self.remote.run_expect(f"date -u -s @{time.time():.3f} >/dev/null", timeout=t.QUICK_COMMAND_S)

    def sync_clock_over_channel(self, timeout: float) -> dict:
        """Set dom0's clock through the channel: the first thing a restored dom0 answers.
        Returns nxchannel.py's answer (dom0's uptime and new wall clock)."""
        assert self.channel is not None
        return self.channel.request("set_clock", timeout=timeout, epoch=time.time)

    def settle_for_snapshot(self) -> dict:
        """Make dom0's memory cheap to snapshot: write back and drop the page cache, then
        zero the free pages (QEMU sends a zero page as a flag, not 4 KiB). The stream
        shrinks by the dom0 memory that held old data, and a restore loads that much less.
        Returns dom0's MemFree before and after, in MiB."""
        return settle_dom0_memory(self.remote)

    @property
    def link(self) -> LinkPorts:
        """This L1's private link ports; another L1 started with them reversed is its peer."""
        return self.machine.link

    def link_up(self, index: int) -> str:
        """Give dom0's link NIC (PCI 00:06.0) the address ``LINK_NET.<index>`` and a MAC of
        its own (both ends restored from one snapshot would share one). Returns the address."""
        address = f"{LINK_NET}.{index}"
        script = (
            f"set -e; dev=$(ls {layout.LINK_NIC_NET_DIRS}); "
            "ip link set dev $dev down; "
            f"ip link set dev $dev address 52:54:00:12:35:{index:02x}; "
            f"ip addr flush dev $dev; ip addr add {address}/24 dev $dev; "
            # Each frame is one UDP datagram between the QEMUs: see LINK_MTU.
            f"ip link set dev $dev mtu {LINK_MTU}; "
            "ip link set dev $dev up; echo $dev"
        )
        self.remote.run_expect(script, timeout=t.SMALL_COMMAND_S)
        return address

    def stop(self) -> None:
        self.guest_pool = None
        self.remote.close()
        if self.channel is not None:
            self.channel.close()
        self.machine.stop()
