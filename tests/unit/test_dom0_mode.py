"""The dom0 mode (PV or PVH) from recipe and run config to the QEMU command line,
the snapshot key and the gating; known boot issues as expected failures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import provision
from harness.accel import AccelChoice
from harness.config import RunConfig, load_recipe
from harness.fixtures.hosts import HostLease, expected_boot_failure
from harness.host import image_facts, machine_spec
from harness.imaging import HostImage
from harness.known_issues import boot_issue, load_known_issues
from harness.machines.base import MachineCrashed, MachineSpec
from harness.machines.qemu import (
    IOMMU_DEVICE,
    VIRTIO_BEHIND_IOMMU,
    QemuMachine,
    iommu_device,
    qemu_version_label,
    with_iommu,
)
from harness.plugins import make_spec

TCG = AccelChoice("tcg", "qemu64,+svm,+npt", "test")
PANIC = """\
(XEN) Xen version 4.17.5 (Debian 4.17.5+23-ga4e5191b1c-1) (pkg-xen-devel@lists.alioth.debian.org)
(XEN) ****************************************
(XEN) Panic on CPU 0:
(XEN) Presently, iommu must be enabled for PVH hardware domain
(XEN) ****************************************
"""


def image(tmp_path: Path, xen_file: str = "xen-4.17-amd64.gz",
          kernel_file: str = "vmlinuz-6.1.0-50-amd64") -> HostImage:
    d = tmp_path / "image"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"xen_file": xen_file, "kernel_file": kernel_file}))
    return HostImage("bookworm", "0123456789abcdef", d)


def spec_for(tmp_path: Path, dom0: str) -> MachineSpec:
    recipe = dataclasses.replace(load_recipe("bookworm"), dom0=dom0)
    return machine_spec("h1", recipe, image(tmp_path), RunConfig(), TCG, tmp_path / "run")


def devices(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]


# ------------------------------------------------------------------ machine spec and QEMU


def test_pv_dom0_has_no_iommu_and_no_dom0_option(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "pv")
    assert not spec.iommu
    assert "dom0=pvh" not in spec.append.split()
    cmd = QemuMachine(spec).command_line()
    assert cmd[cmd.index("-machine") + 1] == "pc"
    assert IOMMU_DEVICE not in devices(cmd)
    assert not any("iommu_platform" in d for d in devices(cmd))


def test_pvh_dom0_gets_dom0_pvh_and_an_iommu(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "pvh")
    assert spec.iommu
    assert spec.append.split()[-1] == "dom0=pvh"
    assert spec.append.startswith(load_recipe("bookworm").xen_cmdline)
    cmd = QemuMachine(spec).command_line()
    assert cmd[cmd.index("-machine") + 1] == "q35", "QEMU plugs amd-iommu into q35 only"
    devs = devices(cmd)
    assert devs[0] == IOMMU_DEVICE, "the IOMMU must come before the PCI devices it translates"
    virtio = [d for d in devs if d.startswith("virtio-")]
    assert len(virtio) >= 2  # disk and NIC at least
    assert all(d.endswith("," + VIRTIO_BEHIND_IOMMU) for d in virtio), virtio


def test_with_iommu_keeps_everything_else() -> None:
    cmd = ["qemu", "-machine", "pc", "-m", "3072", "-device", "virtio-blk-pci,drive=d0",
           "-netdev", "user,id=n", "-device", "virtio-net-pci,netdev=n", "-device", "isa-debugcon,chardev=c"]
    out = with_iommu(cmd)
    assert out == ["qemu", "-machine", "q35", "-m", "3072", "-device", IOMMU_DEVICE,
                   "-device", f"virtio-blk-pci,drive=d0,{VIRTIO_BEHIND_IOMMU}", "-netdev", "user,id=n",
                   "-device", f"virtio-net-pci,netdev=n,{VIRTIO_BEHIND_IOMMU}",
                   "-device", "isa-debugcon,chardev=c"]
    assert with_iommu(["qemu", "-m", "1"]) == ["qemu", "-m", "1", "-device", IOMMU_DEVICE]


def test_run_config_dom0_overrides_the_recipe(tmp_path: Path) -> None:
    prov = object.__new__(provision.Provisioner)
    prov.cfg = RunConfig(dom0="pvh")
    assert load_recipe("bookworm").dom0 == "pv"
    recipe = prov.recipe("bookworm")
    assert recipe.dom0 == "pvh"
    assert machine_spec("h", recipe, image(tmp_path), prov.cfg, TCG, tmp_path).iommu
    prov.cfg = RunConfig()
    assert prov.recipe("bookworm").dom0 == "pv"


def test_snapshot_key_includes_the_iommu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision, "qemu_version", lambda binary: "QEMU emulator version 7.2")
    prov = object.__new__(provision.Provisioner)
    prov.cfg, prov.setup_guests = RunConfig(), None
    img = image(tmp_path)
    pv, pvh = spec_for(tmp_path, "pv"), spec_for(tmp_path, "pvh")
    assert prov.snapshot_key(img, pv, None) == prov.snapshot_key(img, pv, None)
    assert prov.snapshot_key(img, pv, None) != prov.snapshot_key(img, pvh, None)
    # The IOMMU alone (same command lines) makes another snapshot.
    assert prov.snapshot_key(img, pv, None) != prov.snapshot_key(
        img, dataclasses.replace(pv, iommu=True), None)


# ------------------------------------------------------------------ facts and gating


def test_image_facts_from_the_file_names(tmp_path: Path) -> None:
    recipe = dataclasses.replace(load_recipe("bookworm"), dom0="pvh")
    facts = image_facts(recipe, image(tmp_path, "xen-4.20-amd64.gz", "vmlinuz-6.12.117+deb13-amd64"), "tcg")
    assert (facts.xen_version, facts.kernel_release, facts.dom0_mode, facts.accel) == \
        ("4.20", "6.12.117+deb13-amd64", "pvh", "tcg")


def test_dom0_mode_gates_like_a_version() -> None:
    facts = SimpleNamespace(xen_version="4.20.4", kernel_release="6.12.117+deb13-amd64",
                            virt_caps=frozenset({"hvm", "hap"}), dom0_mode="pvh")
    assert make_spec(dom0=["pv"]).skip_reason(facts) == "needs a pv dom0, host has pvh"
    assert make_spec(dom0=["pvh"]).skip_reason(facts) is None
    assert make_spec().skip_reason(facts) is None


# ------------------------------------------------------------------ known boot issues


BOOT_ENTRY = """
- check: boot
  xen: ">=4.17,<4.18"
  dom0: [pvh]
  console: "iommu must be enabled for PVH hardware domain"
  evidence: [failure, serial]
  reason: "Xen 4.17 panics: iommu must be enabled for PVH hardware domain"
"""


def facts(xen: str = "4.17", dom0: str = "pvh") -> SimpleNamespace:
    return SimpleNamespace(xen_version=xen, kernel_release="6.1.0-50-amd64", dom0_mode=dom0, accel="tcg")


def test_boot_issue_needs_versions_mode_and_the_console_line(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(BOOT_ENTRY)
    issues = load_known_issues(path)
    assert boot_issue(issues, facts(), {"serial": PANIC}).reason.startswith("Xen 4.17 panics")
    assert boot_issue(issues, facts(), {"failure": "stage 'dom0-ssh' not reached within 420 s"}) is None
    assert boot_issue(issues, facts(dom0="pv"), {"serial": PANIC}) is None
    assert boot_issue(issues, facts(xen="4.20.4"), {"serial": PANIC}) is None
    assert boot_issue(issues, facts()) is not None  # no failure text: "would it apply?"


def test_bad_console_pattern_is_a_config_error(tmp_path: Path) -> None:
    from harness.config import ConfigError

    path = tmp_path / "k.yaml"
    path.write_text("- check: boot\n  reason: r\n  console: '(unclosed'\n  evidence: [serial]\n")
    with pytest.raises(ConfigError, match="signature: not a regular expression"):
        load_known_issues(path)


def boot_entries(tmp_path: Path) -> list:
    path = tmp_path / "k.yaml"
    path.write_text(BOOT_ENTRY)
    return load_known_issues(path)


def test_image_facts_match_a_boot_entry(tmp_path: Path) -> None:
    issues = boot_entries(tmp_path)
    recipe = dataclasses.replace(load_recipe("bookworm"), dom0="pvh")
    predicted = image_facts(recipe, image(tmp_path), "tcg")
    assert boot_issue(issues, predicted, {"serial": PANIC}) is not None
    assert boot_issue(issues, dataclasses.replace(predicted, dom0_mode="pv"), {"serial": PANIC}) is None
    assert boot_issue(issues, dataclasses.replace(predicted, xen_version="4.20"), {"serial": PANIC}) is None


class FakeProvisioner:
    def __init__(self, tmp_path: Path, dom0: str) -> None:
        self.recipe = dataclasses.replace(load_recipe("bookworm"), dom0=dom0)
        self.img = image(tmp_path)
        self.accel = TCG

    def image(self, name: str):
        return self.recipe, self.img


def crash(tmp_path: Path, log: str) -> MachineCrashed:
    path = tmp_path / "serial.log"
    path.write_text(log)
    # The console tail in the message may end at the "Panic on CPU" line: the log has the rest.
    return MachineCrashed("xen", "Panic on CPU 0", "(XEN) Panic on CPU 0:", path)


def test_expected_boot_failure_reads_the_serial_log(tmp_path: Path) -> None:
    issues = boot_entries(tmp_path)
    reason = expected_boot_failure(FakeProvisioner(tmp_path, "pvh"), "bookworm", crash(tmp_path, PANIC),
                                   issues)
    assert reason and reason.startswith("expected failure (Xen 4.17, PVH dom0, tcg): Xen 4.17 panics")
    assert expected_boot_failure(FakeProvisioner(tmp_path, "pv"), "bookworm",
                                 crash(tmp_path, PANIC), issues) is None
    other = crash(tmp_path, "(XEN) Panic on CPU 0:\n(XEN) something else\n")
    assert expected_boot_failure(FakeProvisioner(tmp_path, "pvh"), "bookworm", other, issues) is None


def test_host_lease_turns_a_known_boot_failure_into_xfail_for_every_user() -> None:
    calls = []

    def make():
        calls.append(1)
        raise RuntimeError("Panic on CPU 0: iommu must be enabled for PVH hardware domain")

    lease = HostLease(make, lambda exc: "expected failure: Xen 4.17 panics" if "iommu" in str(exc) else None)
    for _ in range(2):
        with pytest.raises(pytest.xfail.Exception, match="expected failure: Xen 4.17 panics"):
            lease.get()
    assert len(calls) == 1, "a host that cannot boot is booted once"


def test_host_lease_unknown_failure_stays_an_error() -> None:
    lease = HostLease(lambda: (_ for _ in ()).throw(RuntimeError("disk full")), lambda exc: None)
    with pytest.raises(RuntimeError, match="disk full"):
        lease.get()
    with pytest.raises(pytest.fail.Exception, match="could not be provided earlier.*disk full"):
        lease.get()


# ------------------------------------------------------------------ command lines of the harness


def test_cli_dom0_option_reaches_the_run_config() -> None:
    from harness import cli

    args = cli.build_parser().parse_args(["boot", "--image", "bookworm", "--dom0", "pvh"])
    assert cli._config(args).dom0 == "pvh"
    assert cli._config(cli.build_parser().parse_args(["boot"])).dom0 is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["boot", "--dom0", "hvm"])


# ------------------------------------------------------------------ the privcmd table's dom0 dimension


def _guest(kind: str) -> SimpleNamespace:
    pages = [SimpleNamespace(gfn=0x100 + i, mfn=0x5000 + i, sha256=f"{i:064x}") for i in range(2)]
    return SimpleNamespace(type=kind, domid=5, spec=SimpleNamespace(memory_mb=256), pages=pages)


def _answer(errors: list[int], rc: int = 0) -> SimpleNamespace:
    frames = [SimpleNamespace(error=e, sha256=None) for e in errors]
    return SimpleNamespace(crashed=None, timed_out=False, ok=True, rc=rc, errno=None, error=None,
                           frames=frames)


@pytest.mark.parametrize("kind", ["pv", "pvh", "hvm"])
def test_every_class_has_one_row_per_dom0_mode(kind: str) -> None:
    from plugins._privcmd_table import rows_for

    pv, pvh = rows_for(kind, "pv"), rows_for(kind, "pvh")
    assert [r.cls for r in pv] == [r.cls for r in pvh]
    assert len({r.cls for r in pv}) == len(pv), "one row per class and mode"


def test_rows_that_differ_by_dom0_mode_cite_their_source() -> None:
    from plugins._privcmd_table import differing

    pairs = {(kind, pv.cls): (pv, pvh) for kind in ("pv", "pvh", "hvm") for pv, pvh in differing(kind)}
    assert ("pvh", "dom0_itself") in pairs and ("pv", "foreign_ram") in pairs
    for pv, pvh in pairs.values():
        assert pv.dom0 == ("pv",) and pvh.dom0 == ("pvh",)
        assert pv.why.startswith(("X ", "L ")) and pvh.why.startswith(("X ", "L ")) or \
            pv.cls == "mixed", (pv.cls, pv.why, pvh.why)


def test_mismatch_under_pvh_dom0_shows_the_pv_expectation_beside_it() -> None:
    from plugins._privcmd_table import row_for
    from plugins.privcmd_mmapbatch import compare, format_table, mode_table

    guest = _guest("pvh")
    row = row_for("dom0_itself", "pvh", "pvh")
    asked = row.frames(guest, {})
    # A PVH dom0 answering like a PV one (-ESRCH) is a mismatch; the PV expectation shows.
    answers = [(row, asked, _answer([-3]))]
    mismatches = compare(guest, answers, "pvh")
    assert [(m.cls, m.expected, m.got, m.other) for m in mismatches] == [
        ("dom0_itself", "-EPERM", "-ESRCH", "pv: -ESRCH")]
    text = format_table(mismatches, "pvh")
    assert "pv dom0 expects" in text.splitlines()[0] and "pv: -ESRCH" in text
    side = mode_table(guest, answers, "pvh")
    assert side.splitlines()[0].split()[:5] == ["class", "frame", "pv", "dom0", "pvh"]
    assert "-ESRCH" in side and "-EPERM" in side
    assert compare(guest, [(row, asked, _answer([-1]))], "pvh") == []


def test_classes_that_agree_across_modes_are_not_in_the_side_by_side_table() -> None:
    from plugins._privcmd_table import row_for
    from plugins.privcmd_mmapbatch import compare, mode_table

    guest = _guest("pvh")  # an HVM guest under a PVH dom0 was never run: not asserted (NEVER_RUN)
    row = row_for("valid", "pvh", "pvh")
    asked = row.frames(guest, {})
    answers = [(row, asked, _answer([0]))]
    assert compare(guest, answers, "pvh") == [] and mode_table(guest, answers, "pvh") == ""
    bad = compare(guest, [(row, asked, _answer([-22]))], "pvh")
    assert [m.other for m in bad] == [""]


@pytest.mark.parametrize("line, device", [
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", IOMMU_DEVICE),
    ("QEMU emulator version 9.1.3", IOMMU_DEVICE),
    ("QEMU emulator version 9.2.0", IOMMU_DEVICE + ",pt=off"),
    ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", IOMMU_DEVICE + ",pt=off"),
    ("QEMU emulator version 10.0.3", IOMMU_DEVICE),
    ("QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)", IOMMU_DEVICE),
    ("QEMU emulator version 10.1.0", IOMMU_DEVICE),
    ("QEMU emulator version 10.2.0", IOMMU_DEVICE + ",dma-remap=on"),
    ("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-2~bpo13+1)", IOMMU_DEVICE + ",dma-remap=on"),
    ("unknown", IOMMU_DEVICE),
])
def test_pt_off_where_pass_through_is_unfixed_dma_remap_where_a_property(line: str, device: str) -> None:
    assert iommu_device(line) == device


def test_the_pvh_dom0_l1_gets_pt_off_under_qemu_10_0_2(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-10.0.2"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 10.0.2 (fake)'\n")
    fake.chmod(0o755)
    spec = dataclasses.replace(spec_for(tmp_path, "pvh"), qemu_binary=str(fake))
    devs = devices(QemuMachine(spec).command_line())
    assert devs[0] == IOMMU_DEVICE + ",pt=off"
    assert qemu_version_label(str(fake)) == "10.0.2"
    from harness.machines.qemu import l1_iommu

    assert l1_iommu(spec) == devs[0]  # the host facts' l1_iommu is the device on the command line
    assert l1_iommu(spec_for(tmp_path, "pv")) == ""
