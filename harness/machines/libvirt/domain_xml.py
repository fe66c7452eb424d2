"""The domain XML of an L1 (the package docstring says what it holds, and why), and
its rewrite for a restore from a save image."""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..base import LinkPorts, MachineError, MachineSpec, MachineStartError
from ..common import LINK_SLOT
from .ownership import OWNER_NS, Owner
from .storage import sub_element

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NET_MAC = "52:54:00:12:34:56"

ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True)
class BootPaths:
    """Where the libvirt host finds the files (local paths, or pool volume paths)."""

    kernel: str
    modules: tuple[tuple[str, str], ...]  # (path, args)
    disk: str


def module_list(modules: tuple[tuple[str, str], ...]) -> str:
    """The multiboot module list for ``<initrd>``: ``"path args,path args"``."""
    for path, args in modules:
        if "," in path or "," in args:
            raise MachineStartError(f"multiboot module {path} or its args contain a comma")
    return ",".join(f"{path} {args}".strip() for path, args in modules)


def tcg_cpu(cpu: str) -> tuple[str, tuple[str, ...]]:
    """``qemu64,+svm,+npt`` -> (``qemu64``, (``svm``, ``npt``))."""
    model, *flags = cpu.split(",")
    bad = [f for f in flags if not f.startswith("+")]
    if bad:
        raise MachineStartError(f"CPU {cpu!r}: only +feature flags map to libvirt, not {bad}")
    return model, tuple(f[1:] for f in flags)


def net_args(port: int, link: LinkPorts) -> list[str]:
    """QEMU arguments for the NICs, as in the QEMU backend: the restricted user network
    with dom0's SSH forwarded, and the private link NIC (UDP on 127.0.0.1, PCI slot 6)."""
    return ["-netdev", f"user,id=nxnet0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", f"virtio-net-pci,netdev=nxnet0,addr=0x3,mac={NET_MAC}",
            "-netdev", f"socket,id=link0,udp=127.0.0.1:{link.peer},localaddr=127.0.0.1:{link.local}",
            "-device", f"virtio-net-pci,netdev=link0,addr={LINK_SLOT:#x},mac=52:54:00:12:35:01"]


def _set_commandline(root: ET.Element, args: list[str]) -> None:
    for old in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(old)
    cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)


def _set_owner(root: ET.Element, owner: Owner, volumes: tuple[str, ...]) -> None:
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        root.insert(2, meta)
    for old in meta.findall(f"{{{OWNER_NS}}}owner"):
        meta.remove(old)
    meta.append(owner.element(volumes))


def domain_xml(spec: MachineSpec, name: str, port: int, link: LinkPorts, paths: BootPaths,
               owner: Owner, volumes: tuple[str, ...] = (), dac_label: str | None = None,
               domain_uuid: str | None = None) -> str:
    """The transient domain's XML (see the module docstring for each choice)."""
    if spec.iommu:
        raise MachineStartError(
            "the libvirt backend has no IOMMU for a PVH dom0 yet (libvirt 9.0 has no AMD IOMMU "
            "model): use --backend qemu for --dom0 pvh")
    kvm = spec.accel.accel == "kvm"
    dom = ET.Element("domain", {"type": "kvm" if kvm else "qemu"})
    sub_element(dom, "name", name)
    sub_element(dom, "uuid", domain_uuid or str(uuid.uuid4()))
    _set_owner(dom, owner, volumes)
    sub_element(dom, "memory", str(spec.memory_mb), unit="MiB")
    sub_element(dom, "vcpu", str(spec.cpus))
    os_el = sub_element(dom, "os")
    sub_element(os_el, "type", "hvm", arch="x86_64", machine="pc")
    sub_element(os_el, "kernel", paths.kernel)
    sub_element(os_el, "initrd", module_list(paths.modules))
    sub_element(os_el, "cmdline", spec.append)
    features = sub_element(dom, "features")
    sub_element(features, "acpi")
    sub_element(features, "apic")
    if kvm:
        sub_element(dom, "cpu", mode="host-passthrough", check="none")
    else:
        model, flags = tcg_cpu(spec.accel.cpu)
        cpu = sub_element(dom, "cpu", mode="custom", match="exact", check="none")
        sub_element(cpu, "model", model, fallback="forbid")
        for flag in flags:
            sub_element(cpu, "feature", policy="require", name=flag)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        sub_element(dom, event, "destroy")
    devices = sub_element(dom, "devices")
    if os.path.isabs(spec.qemu_binary):
        sub_element(devices, "emulator", spec.qemu_binary)
    disk = sub_element(devices, "disk", type="file", device="disk")
    sub_element(disk, "driver", name="qemu", type="qcow2", cache="unsafe")
    sub_element(disk, "source", file=paths.disk)
    sub_element(disk, "target", dev="vda", bus="virtio")
    sub_element(disk, "address", type="pci", domain="0x0000", bus="0x00", slot="0x04", function="0x0")
    serial = sub_element(devices, "serial", type="pty")
    sub_element(serial, "target", port="0")
    sub_element(devices, "controller", type="usb", model="none")
    sub_element(devices, "memballoon", model="none")
    if dac_label:
        seclabel = sub_element(dom, "seclabel", type="static", model="dac", relabel="no")
        sub_element(seclabel, "label", dac_label)
    _set_commandline(dom, net_args(port, link))
    return ET.tostring(dom, encoding="unicode")


def rewrite_saved_xml(xml: str, name: str, port: int, link: LinkPorts, disk: str, owner: Owner,
                      volumes: tuple[str, ...] = ()) -> str:
    """A saved domain's XML made into a new L1: its own name, UUID, SSH port, overlay, owner.

    Everything else (devices, PCI addresses, CPU) stays as libvirt saved it,
    so QEMU loads the memory stream into the same machine.
    """
    root = ET.fromstring(xml)
    root.find("name").text = name  # type: ignore[union-attr]
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.SubElement(root, "uuid")
    uuid_el.text = str(uuid.uuid4())
    _set_owner(root, owner, volumes)
    target = None
    for d in root.iterfind("devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == "vda":
            target = d
    if target is None:
        raise MachineError("the saved domain has no vda disk")
    source = target.find("source")
    if source is None:
        source = ET.SubElement(target, "source")
    source.attrib = {"file": disk}
    for backing in target.findall("backingStore"):
        target.remove(backing)  # libvirt probes the new overlay's chain itself
    _set_commandline(root, net_args(port, link))
    return ET.tostring(root, encoding="unicode")
