"""Unit tests for the libvirt backend: domain XML, save-image rewriting, reaping, URIs, errors.

No libvirt daemon and no libvirt-python are needed: the XML is parsed back and
checked, save images are synthetic, and the connection is a fake at the
boundary (listAllDomains / XMLDesc / destroy).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.accel import AccelChoice
from harness.config import ConfigError, RunConfig
from harness.machines import libvirt as lv
from harness.machines.base import (
    LinkPorts,
    MachineError,
    MachineSpec,
    MachineStartError,
    Module,
    SnapshotFiles,
)

Q = f"{{{lv.QEMU_NS}}}"
OWN = f"{{{lv.OWNER_NS}}}"
LINK = LinkPorts(40001, 40002)


@pytest.fixture
def spec(tmp_path: Path) -> MachineSpec:
    files = tmp_path / "bookworm-0123456789abcdef"
    files.mkdir()
    for name in ("xen", "vmlinuz", "initrd.img", "rootfs.ext4"):
        (files / name).write_bytes(b"\0" * 4096)
    return MachineSpec(
        name="h1", kernel=files / "xen", append="console=com1 dom0_mem=1024M,max:1024M",
        modules=(Module(files / "vmlinuz", "root=/dev/vda console=hvc0"), Module(files / "initrd.img")),
        disk=files / "rootfs.ext4", memory_mb=3072, cpus=2,
        accel=AccelChoice("tcg", "qemu64,+svm,+npt", "test"), run_dir=tmp_path / "run",
    )


def paths_for(spec: MachineSpec, disk: str = "/run/disk.qcow2") -> lv.BootPaths:
    return lv.BootPaths(str(spec.kernel), tuple((str(m.path), m.args) for m in spec.modules), disk)


OWNER = lv.Owner("harness-host", 4242, "777")


def build(spec: MachineSpec, **kw) -> ET.Element:
    args = dict(name="nx-h1-4242", port=40022, link=LINK, paths=paths_for(spec), owner=OWNER)
    args.update(kw)
    return ET.fromstring(lv.domain_xml(spec, **args))


def qemu_args(root: ET.Element) -> list[str]:
    return [a.get("value") for a in root.iterfind(f"{Q}commandline/{Q}arg")]


# ------------------------------------------------------------------ domain XML


def test_domain_xml_tcg(spec: MachineSpec) -> None:
    root = build(spec, dac_label="+0:+0")
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "nx-h1-4242"
    assert root.findtext("memory") == "3072" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    cpu = root.find("cpu")
    assert cpu.get("mode") == "custom" and cpu.findtext("model") == "qemu64"
    assert {f.get("name"): f.get("policy") for f in cpu.iterfind("feature")} == {
        "svm": "require", "npt": "require"}
    assert root.find("features/acpi") is not None and root.find("features/apic") is not None
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    label = root.find("seclabel")
    assert label.get("model") == "dac" and label.get("relabel") == "no" and label.findtext("label") == "+0:+0"


def test_domain_xml_multiboot_through_native_os_elements(spec: MachineSpec) -> None:
    os_el = build(spec).find("os")
    assert os_el.findtext("kernel") == str(spec.kernel)
    assert os_el.findtext("cmdline") == spec.append
    image = spec.kernel.parent
    # One <initrd>: the comma-separated module list QEMU's multiboot loader reads.
    modules = f"{image / 'vmlinuz'} root=/dev/vda console=hvc0,{image / 'initrd.img'}"
    assert os_el.findtext("initrd") == modules


def test_domain_xml_kvm_is_host_passthrough(spec: MachineSpec) -> None:
    kvm = dataclasses.replace(spec, accel=AccelChoice("kvm", "host", "test"))
    root = build(kvm)
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("cpu/model") is None


def test_domain_xml_disk_serial_and_no_extra_devices(spec: MachineSpec) -> None:
    root = build(spec, paths=paths_for(spec, "/x/overlay.qcow2"))
    disks = root.findall("devices/disk")
    assert len(disks) == 1
    assert disks[0].find("source").get("file") == "/x/overlay.qcow2"
    assert disks[0].find("driver").get("type") == "qcow2"
    assert disks[0].find("target").get("bus") == "virtio"
    assert disks[0].find("address").get("slot") == "0x04"
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/memballoon").get("model") == "none"
    assert root.find("devices/controller[@type='usb']").get("model") == "none"
    assert root.find("devices/interface") is None  # networking is passthrough, see below


def test_domain_xml_network_is_restricted_user_net_on_loopback(spec: MachineSpec) -> None:
    args = qemu_args(build(spec))
    netdevs = [args[i + 1] for i, a in enumerate(args) if a == "-netdev"]
    user = netdevs[0].split(",")
    assert user[0] == "user" and "restrict=on" in user
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in user
    assert netdevs[1] == "socket,id=link0,udp=127.0.0.1:40002,localaddr=127.0.0.1:40001"
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert devices[0].startswith("virtio-net-pci,netdev=nxnet0,addr=0x3")
    assert devices[1].startswith("virtio-net-pci,netdev=link0,addr=0x6")


def test_domain_xml_records_owner(spec: MachineSpec) -> None:
    text = lv.domain_xml(spec, "nx-h1-4242", 40022, LINK, paths_for(spec), OWNER, volumes=("a.qcow2",))
    owner, volumes = lv.parse_owner(text)
    assert owner == OWNER and volumes == ("a.qcow2",)


def test_domain_xml_emulator_only_for_absolute_binary(spec: MachineSpec) -> None:
    assert build(spec).find("devices/emulator") is None
    custom = dataclasses.replace(spec, qemu_binary="/opt/qemu/bin/qemu-system-x86_64")
    assert build(custom).findtext("devices/emulator") == "/opt/qemu/bin/qemu-system-x86_64"


@pytest.mark.parametrize("where", ["path", "args"])
def test_module_with_comma_is_refused(spec: MachineSpec, where: str) -> None:
    mods = ((("/odd,dir/vmlinuz", "root=/dev/vda"),) if where == "path"
            else (("/img/vmlinuz", "dom0_mem=1G,max:1G"),))
    with pytest.raises(MachineStartError, match="contain a comma"):
        lv.domain_xml(spec, "n", 1, LINK, lv.BootPaths("/img/xen", mods, "/d"), OWNER)


def test_pvh_dom0_iommu_is_refused_with_a_hint(spec: MachineSpec) -> None:
    with pytest.raises(MachineStartError, match="--backend qemu"):
        build(dataclasses.replace(spec, iommu=True))


def test_tcg_cpu_flags() -> None:
    assert lv.tcg_cpu("qemu64,+svm,+npt") == ("qemu64", ("svm", "npt"))
    with pytest.raises(MachineStartError, match="-x2apic"):
        lv.tcg_cpu("qemu64,-x2apic")


def test_domain_name() -> None:
    assert lv.domain_name("bookworm-main-0", 12) == "nx-bookworm-main-0-12"
    assert lv.domain_name("a b/c", 1) == "nx-a_b_c-1"
    assert lv.domain_name("x").endswith(f"-{os.getpid()}")


# ------------------------------------------------------------------ restore: XML and save image


def saved_xml(spec: MachineSpec) -> str:
    """What libvirt keeps in a save image: our XML after parsing (backing chain added)."""
    root = build(spec, paths=paths_for(spec, "/old/disk-1.qcow2"))
    disk = root.find("devices/disk")
    store = ET.SubElement(disk, "backingStore", type="file")
    ET.SubElement(store, "source", file="/old/disk.qcow2")
    return ET.tostring(root, encoding="unicode")


def test_rewrite_saved_xml_gives_a_new_identity(spec: MachineSpec) -> None:
    old = ET.fromstring(saved_xml(spec))
    me = lv.Owner("h", 99, "5")
    new = ET.fromstring(lv.rewrite_saved_xml(saved_xml(spec), "nx-r-99", 41000, LinkPorts(1, 2),
                                             "/new/disk.qcow2", me))
    assert new.findtext("name") == "nx-r-99"
    assert new.findtext("uuid") != old.findtext("uuid")
    disk = new.find("devices/disk")
    assert disk.find("source").attrib == {"file": "/new/disk.qcow2"}
    assert disk.find("backingStore") is None
    assert "user,id=nxnet0,restrict=on,hostfwd=tcp:127.0.0.1:41000-:22" in qemu_args(new)
    assert len(new.findall(f"{Q}commandline")) == 1
    assert lv.parse_owner(ET.tostring(new, encoding="unicode"))[0] == me
    assert len(new.findall(f"metadata/{OWN}owner")) == 1
    # Everything that shapes the machine is untouched.
    for path in ("cpu", "os", "devices/disk/address", "memory"):
        assert ET.tostring(new.find(path)) == ET.tostring(old.find(path)), path


def fake_save_image(path: Path, xml: str, cookie: bytes, stream: bytes, pad: int = 100) -> None:
    xml_b = xml.encode() + b"\0"
    cookie_b = cookie + b"\0"
    data_len = len(xml_b) + len(cookie_b) + pad
    head = lv.SAVE_HEADER.pack(lv.SAVE_MAGIC, 2, data_len, 1, 0, len(xml_b))
    path.write_bytes(head + xml_b + cookie_b + b"\0" * pad + stream)


def test_save_image_roundtrip_with_new_xml(tmp_path: Path) -> None:
    src = tmp_path / "memory"
    stream = bytes(range(256)) * 1000
    fake_save_image(src, "<domain><name>old</name></domain>", b"<qemu-migration/>", stream)
    image = lv.read_save_image(src)
    assert image.xml == "<domain><name>old</name></domain>"
    assert image.cookie == b"<qemu-migration/>"
    assert image.was_running == 1
    assert src.read_bytes()[image.stream_offset:] == stream
    dest = tmp_path / "restore.save"
    lv.write_restore_image(src, image, "<domain><name>a-much-longer-new-name</name></domain>", dest)
    again = lv.read_save_image(dest)
    assert again.xml == "<domain><name>a-much-longer-new-name</name></domain>"
    assert again.cookie == image.cookie and again.was_running == 1 and again.version == 2
    assert dest.read_bytes()[again.stream_offset:] == stream
    # libvirt's layout: 92-byte header, cookie right after the XML's NUL, 64 KiB of slack.
    assert lv.SAVE_HEADER.size == 92
    assert again.stream_offset - lv.SAVE_HEADER.size >= lv.SAVE_PAD


def test_save_image_without_cookie(tmp_path: Path) -> None:
    src = tmp_path / "memory"
    xml_b = b"<domain/>\0"
    head = lv.SAVE_HEADER.pack(lv.SAVE_MAGIC, 2, len(xml_b) + 8, 0, 0, 0)
    src.write_bytes(head + xml_b + b"\0" * 8 + b"QEVM")
    image = lv.read_save_image(src)
    assert (image.xml, image.cookie, image.was_running) == ("<domain/>", b"", 0)
    assert src.read_bytes()[image.stream_offset:] == b"QEVM"
    header = lv.save_image_header(image, "<domain/>")
    assert lv.SAVE_HEADER.unpack(header[:92])[5] == 0  # no cookie offset


@pytest.mark.parametrize("content, message", [
    (b"QEVM\0\0\0\3" + b"\0" * 100, "not a complete libvirt save image"),
    (b"LibvirtQemudPart" + b"\0" * 100, "not a complete libvirt save image"),
    (b"short", "too short"),
])
def test_save_image_rejects_other_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "memory"
    path.write_bytes(content)
    with pytest.raises(MachineError, match=message):
        lv.read_save_image(path)


def test_save_image_rejects_compressed(tmp_path: Path) -> None:
    path = tmp_path / "memory"
    path.write_bytes(lv.SAVE_HEADER.pack(lv.SAVE_MAGIC, 2, 10, 1, 1, 0) + b"\0" * 10)
    with pytest.raises(MachineError, match="compression 1"):
        lv.read_save_image(path)


def test_restore_refuses_a_qemu_backend_snapshot(spec: MachineSpec, tmp_path: Path, monkeypatch) -> None:
    m = lv.LibvirtMachine(spec)
    files = SnapshotFiles(tmp_path / "memory", tmp_path / "disk.qcow2", stream="stream")
    with pytest.raises(MachineStartError, match="not a libvirt one"):
        m._restore(files, paths_for(spec))


# ------------------------------------------------------------------ reaping


class FakeDomain:
    def __init__(self, name: str, xml: str, vanish: bool = False) -> None:
        self._name, self._xml, self.vanish = name, xml, vanish
        self.destroyed = False

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 - libvirt's name
        if self.vanish:
            raise RuntimeError("Domain not found")
        return self._xml

    def destroy(self) -> None:
        self.destroyed = True


class FakeVolume:
    def __init__(self, pool: FakePool, name: str) -> None:
        self.pool, self.name = pool, name

    def delete(self, flags: int) -> None:
        self.pool.deleted.append(self.name)


class FakePool:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def storageVolLookupByName(self, name: str) -> FakeVolume:  # noqa: N802
        return FakeVolume(self, name)


class FakeConn:
    def __init__(self, domains: list[FakeDomain]) -> None:
        self.domains = domains
        self.pool = FakePool()

    def listAllDomains(self, flags: int) -> list[FakeDomain]:  # noqa: N802
        return self.domains

    def storagePoolLookupByName(self, name: str) -> FakePool:  # noqa: N802
        assert name == lv.POOL_NAME
        return self.pool


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def owned(name: str, owner: lv.Owner, volumes: tuple[str, ...] = ()) -> FakeDomain:
    meta = ET.tostring(owner.element(volumes), encoding="unicode")
    return FakeDomain(name, f"<domain><name>{name}</name><metadata>{meta}</metadata></domain>")


def test_reap_destroys_domains_of_dead_owners_only(tmp_path: Path) -> None:
    host = "this-host"
    me = lv.Owner(host, os.getpid(), lv.process_start(os.getpid()))
    gone = owned("nx-a-1", lv.Owner(host, dead_pid()), ("nx-a-1.qcow2",))
    mine = owned("nx-b-2", me)
    reused = owned("nx-c-3", lv.Owner(host, os.getpid(), "1"))  # our pid, another process's start
    elsewhere = owned("nx-d-4", lv.Owner("other-host", dead_pid()))
    foreign = FakeDomain("webserver", "<domain><name>webserver</name></domain>")
    untagged = FakeDomain("nx-e-5", "<domain><name>nx-e-5</name></domain>")
    vanished = owned("nx-f-6", lv.Owner(host, dead_pid()))
    vanished.vanish = True
    conn = FakeConn([gone, mine, reused, elsewhere, foreign, untagged, vanished])
    assert lv.reap_domains(conn, hostname=host) == ["nx-a-1", "nx-c-3"]
    assert gone.destroyed and reused.destroyed
    assert not any(d.destroyed for d in (mine, elsewhere, foreign, untagged, vanished))
    assert conn.pool.deleted == ["nx-a-1.qcow2"]


def test_owner_of_this_process_is_alive() -> None:
    me = lv.Owner.me()
    assert me.pid == os.getpid() and me.start
    assert me.alive() is True
    assert lv.Owner(me.host, dead_pid()).alive() is False
    assert lv.Owner("somewhere-else", os.getpid()).alive() is None


def test_parse_owner_of_garbage() -> None:
    assert lv.parse_owner("not xml") == (None, ())
    assert lv.parse_owner("<domain/>") == (None, ())
    bad = f'<domain><metadata><nx:owner xmlns:nx="{lv.OWNER_NS}" host="h" pid="x"/></metadata></domain>'
    assert lv.parse_owner(bad) == (None, ())


# ------------------------------------------------------------------ URIs, SSH, remote storage


def test_uri_local_and_remote() -> None:
    assert not lv.LibvirtUri.parse("qemu:///system").remote
    assert not lv.LibvirtUri.parse("qemu+unix:///system").remote
    uri = lv.LibvirtUri.parse("qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k/id&no_verify=1")
    assert uri.remote and uri.transport == "ssh"
    assert (uri.user, uri.host, uri.port) == ("root", "127.0.0.1", 2222)
    ssh = uri.ssh_base()
    assert ssh[:3] == ["ssh", "-o", "BatchMode=yes"]
    assert ssh[3:5] == ["-p", "2222"] and "-l" in ssh and "/k/id" in ssh
    assert "StrictHostKeyChecking=no" in ssh


def test_tunnel_command(tmp_path: Path) -> None:
    uri = lv.LibvirtUri.parse("qemu+ssh://admin@virt.example.org/system?known_hosts=/kh")
    tunnel = lv.SshTunnel(uri, 45000, tmp_path / "t.log")
    tunnel.local_port = 50000
    cmd = tunnel.command()
    assert cmd[-1] == "virt.example.org"
    assert "127.0.0.1:50000:127.0.0.1:45000" in cmd and "-N" in cmd
    assert "ExitOnForwardFailure=yes" in cmd and "UserKnownHostsFile=/kh" in cmd
    assert "StrictHostKeyChecking=no" not in cmd


FAKE_SSH = """#!/usr/bin/env python3
# A stand-in for ssh -L: refuses the first time as a taken port does, then listens.
import socket, sys, time
from pathlib import Path
tries = Path(sys.argv[0]).with_suffix(".tries")
n = int(tries.read_text()) if tries.exists() else 0
tries.write_text(str(n + 1))
if n == 0:
    print("bind [127.0.0.1]:1: Address already in use", file=sys.stderr)
    print("Could not request local forwarding.", file=sys.stderr)
    sys.exit(255)
spec = sys.argv[sys.argv.index("-L") + 1]
sock = socket.socket()
sock.bind(("127.0.0.1", int(spec.split(":")[1])))
sock.listen()
time.sleep(30)
"""


def test_tunnel_whose_port_was_taken_opens_on_another(tmp_path: Path) -> None:
    ssh = tmp_path / "fake-ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    uri = lv.LibvirtUri.parse(f"qemu+ssh://root@127.0.0.1/system?command={ssh}")
    tunnel = lv.SshTunnel(uri, 45000, tmp_path / "t.log")
    try:
        tunnel.open(timeout=20)
        assert (tmp_path / "fake-ssh.tries").read_text() == "2"
        assert tunnel.proc is not None and tunnel.proc.poll() is None
    finally:
        tunnel.close()


def test_tunnel_that_exits_otherwise_says_why(tmp_path: Path) -> None:
    ssh = tmp_path / "fake-ssh"
    ssh.write_text("#!/bin/sh\necho 'Permission denied (publickey).' >&2\nexit 255\n")
    ssh.chmod(0o755)
    uri = lv.LibvirtUri.parse(f"qemu+ssh://root@127.0.0.1/system?command={ssh}")
    with pytest.raises(MachineStartError, match="exited: Permission denied"):
        lv.SshTunnel(uri, 45000, tmp_path / "t.log").open(timeout=20)


def test_remote_without_ssh_is_refused() -> None:
    with pytest.raises(MachineStartError, match="qemu\\+ssh://"):
        lv.LibvirtUri.parse("qemu+tcp://virt.example.org/system").ssh_base()


def test_not_a_uri() -> None:
    with pytest.raises(MachineStartError, match="not a libvirt URI"):
        lv.LibvirtUri.parse("/var/run/libvirt")


CAPS = """<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>
<secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+108</baselabel>
<baselabel type='qemu'>+64055:+64055</baselabel></secmodel></host></capabilities>"""


def test_remote_qemu_user_from_capabilities() -> None:
    assert lv.dac_baselabel(CAPS, "qemu") == "+64055:+64055"
    assert lv.dac_baselabel(CAPS, "kvm") == "+64055:+108"
    assert lv.dac_baselabel("<capabilities><host/></capabilities>", "qemu") is None
    assert lv.parse_dac_label("+64055:+108") == (64055, 108)
    with pytest.raises(MachineStartError, match="not numeric"):
        lv.parse_dac_label("libvirt-qemu:kvm")


def test_volumes_belong_to_the_remote_qemu_user() -> None:
    vol = ET.fromstring(lv.volume_xml("img-xen", 1, "raw", owner=(64055, 108)))
    perms = vol.find("target/permissions")
    got = (perms.findtext("owner"), perms.findtext("group"), perms.findtext("mode"))
    assert got == ("64055", "108", "0644")
    ov = ET.fromstring(lv.volume_xml("o.qcow2", 1, "qcow2", ("/b", "raw"), owner=(1, 2), mode="0600"))
    assert ov.findtext("target/permissions/mode") == "0600"
    assert ET.fromstring(lv.volume_xml("x", 1, "raw")).find("target/permissions") is None


def test_volume_xml() -> None:
    raw = ET.fromstring(lv.volume_xml("img-xen", 4096, "raw"))
    assert raw.findtext("name") == "img-xen" and raw.findtext("capacity") == "4096"
    assert raw.find("target/format").get("type") == "raw" and raw.find("backingStore") is None
    ov = ET.fromstring(lv.volume_xml("nx-h-1.qcow2", 8192, "qcow2", ("/pool/img-rootfs.ext4", "raw")))
    assert ov.find("target/format").get("type") == "qcow2"
    assert ov.findtext("backingStore/path") == "/pool/img-rootfs.ext4"
    assert ov.find("backingStore/format").get("type") == "raw"


def test_sparse_send_reports_holes_and_data(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.seek(1 << 20)
        f.write(b"A" * 4096)
        f.truncate(3 << 20)
    size = path.stat().st_size

    class Stream:
        def sparseSendAll(self, read, hole, skip, fd):  # noqa: N802 - libvirt's loop, simplified
            out = bytearray()
            while len(out) < size:
                in_data, length = hole(self, fd)
                if in_data:
                    out += read(self, length, fd)
                else:
                    skip(self, length, fd)
                    out += b"\0" * length
            self.received = bytes(out)

    stream = Stream()
    fd = os.open(path, os.O_RDONLY)
    try:
        lv._send_sparse(stream, fd, size)
    finally:
        os.close(fd)
    assert stream.received == path.read_bytes()


# ------------------------------------------------------------------ errors the user can fix


def test_missing_libvirt_python(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import fails as if not installed
    with pytest.raises(MachineStartError, match=r"pip install 'nested-xen\[libvirt\]'"):
        lv.import_libvirt()


def fake_libvirt(open_fn) -> types.ModuleType:
    mod = types.ModuleType("libvirt")

    class libvirtError(Exception):  # noqa: N801, N818 - libvirt's name
        pass

    mod.libvirtError = libvirtError
    mod.registerErrorHandler = lambda fn, ctx: None
    mod.open = lambda uri: open_fn(mod, uri)
    return mod


def test_unreachable_daemon(monkeypatch) -> None:
    def refuse(mod, uri):
        raise mod.libvirtError("Failed to connect socket to '/var/run/libvirt/libvirt-sock': "
                               "No such file or directory")

    monkeypatch.setitem(sys.modules, "libvirt", fake_libvirt(refuse))
    with pytest.raises(MachineStartError) as info:
        lv.connect("qemu:///system")
    msg = str(info.value)
    assert msg.startswith("cannot connect to libvirt at qemu:///system: Failed to connect socket")
    assert "start libvirtd (libvirtd -d) or pass --libvirt-uri" in msg


def test_machine_start_reports_unreachable_daemon(spec: MachineSpec, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", fake_libvirt(lambda mod, uri: None))
    m = lv.LibvirtMachine(spec, "qemu+ssh://root@virt.example.org/system")
    with pytest.raises(MachineStartError, match="cannot connect to libvirt at qemu\\+ssh://"):
        m.start()
    assert m.alive() == "not started"
    m.stop()  # idempotent


def test_machine_before_start(spec: MachineSpec) -> None:
    m = lv.LibvirtMachine(spec)
    assert m.alive() == "not started"
    assert m.ssh_address == ("127.0.0.1", 0)
    assert m.serial_log == spec.run_dir / "serial.log"
    assert m.name == f"nx-h1-{os.getpid()}"
    m.stop()


# ------------------------------------------------------------------ configuration


def test_config_libvirt_uri_validated() -> None:
    cfg = RunConfig().with_overrides(backend="libvirt", libvirt_uri="qemu+ssh://root@h/system")
    assert cfg.libvirt_uri == "qemu+ssh://root@h/system"
    with pytest.raises(ConfigError, match="libvirt_uri: 'localhost' is not a libvirt URI"):
        RunConfig().with_overrides(libvirt_uri="localhost")


def test_config_file_libvirt_keys(tmp_path: Path) -> None:
    from harness.config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("backend: libvirt\nlibvirt_uri: qemu+ssh://root@127.0.0.1/system\n")
    cfg = load_run_config(path)
    assert (cfg.backend, cfg.libvirt_uri) == ("libvirt", "qemu+ssh://root@127.0.0.1/system")
    path.write_text("backend: virtualbox\n")
    with pytest.raises(ConfigError, match="backend: 'virtualbox' is not valid; choose one of: qemu, libvirt"):
        load_run_config(path)


def test_provisioner_picks_the_machine_class(tmp_path: Path, monkeypatch) -> None:
    from harness import provision
    from harness.machines.qemu import QemuMachine

    made = {}

    def fake_create(label, machine, image, recipe, timeouts):
        made[label] = machine
        return types.SimpleNamespace()

    monkeypatch.setattr(provision.XenHost, "create", staticmethod(fake_create))
    for backend in ("qemu", "libvirt"):
        cfg = RunConfig(cache_dir=tmp_path, backend=backend, accel="tcg")
        prov = provision.Provisioner(cfg)
        spec_ = MachineSpec(name=backend, kernel=tmp_path / "xen", append="", modules=(), disk=tmp_path / "d",
                            memory_mb=1024, cpus=1, accel=prov.accel, run_dir=tmp_path / backend)
        prov._new_host(backend, spec_, None, None)  # type: ignore[arg-type]
    assert type(made["qemu"]) is QemuMachine
    assert type(made["libvirt"]) is lv.LibvirtMachine
    assert made["libvirt"].uri.uri == "qemu:///system"


# ---------------------------------------------------------------------- uploads


class UploadPool:
    """A libvirt storage pool at the API boundary: volumes by name, each with its bytes."""

    def __init__(self) -> None:
        self.volumes: dict[str, bytearray] = {}
        self.uploads = 0

    def storageVolLookupByName(self, name: str):  # noqa: N802
        if name not in self.volumes:
            raise UploadLibvirt.libvirtError(name)
        pool = self

        class Vol:
            def info(self):
                return [0, len(pool.volumes[name]), 0]

            def path(self):
                return f"/pool/{name}"

            def delete(self, flags):
                del pool.volumes[name]

            def upload(self, stream, offset, length, flags):
                stream.target = pool.volumes[name]
                pool.uploads += 1

        return Vol()

    def listVolumes(self):  # noqa: N802
        return list(self.volumes)

    def createXML(self, xml: str, flags: int):  # noqa: N802
        root = ET.fromstring(xml)
        self.volumes[root.findtext("name")] = bytearray()
        return self.storageVolLookupByName(root.findtext("name"))


class UploadStream:
    target: bytearray

    def sparseSendAll(self, read, hole, skip, fd):  # noqa: N802
        self.target += os.read(fd, 1 << 20)

    def finish(self):
        pass


class UploadLibvirt:
    class libvirtError(Exception):  # noqa: N801 - libvirt's name
        pass

    VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM = 1


def test_a_rebuilt_file_of_the_same_name_and_size_is_uploaded_again(tmp_path: Path) -> None:
    """CI saw a remote-URI boot whose dom0 never answered SSH: the pool still held an
    earlier build's rootfs of the same name and size (another SSH key inside)."""
    pool = UploadPool()
    conn = types.SimpleNamespace(getURI=lambda: "qemu+ssh://h/system", newStream=lambda f: UploadStream(),
                                 storagePoolLookupByName=lambda name: pool)
    store = lv.RemoteStore(conn, UploadLibvirt)
    store._pool = pool
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"old key")
    store.upload(image, "img-rootfs.ext4")
    store.upload(image, "img-rootfs.ext4")  # the same build: reused
    assert pool.uploads == 1 and bytes(pool.volumes["img-rootfs.ext4"]) == b"old key"
    image.write_bytes(b"new key")  # rebuilt: same name, same size, new content
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    store.upload(image, "img-rootfs.ext4")
    assert pool.uploads == 2 and bytes(pool.volumes["img-rootfs.ext4"]) == b"new key"
    assert len([v for v in pool.volumes if v.startswith("img-rootfs.ext4.ok")]) == 1  # the old marker went
