"""Unit tests for harness.accel: KVM-or-TCG choice from injected host facts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from harness.accel import (
    KVM_CPU,
    TCG_CPU,
    AccelChoice,
    HostFacts,
    choose_accel,
    nested_kvm_problem,
)


def facts(
    *,
    kvm_device: bool = True,
    kvm_writable: bool = True,
    flags: tuple[str, ...] = ("fpu", "svm", "npt"),
    modules: tuple[str, ...] = ("kvm", "kvm_amd"),
    nested: dict[str, str] | None = None,
) -> HostFacts:
    return HostFacts(
        kvm_device=kvm_device,
        kvm_writable=kvm_writable,
        cpu_flags=frozenset(flags),
        modules=frozenset(modules),
        nested={"kvm_amd": "1"} if nested is None else nested,
    )


# ------------------------------------------------------------------ choose_accel


def test_svm_with_nested_amd_gives_kvm_host_cpu() -> None:
    choice = choose_accel("auto", facts())
    assert choice.accel == "kvm" and choice.cpu == KVM_CPU == "host"
    assert "nested" in choice.reason
    assert nested_kvm_problem(facts()) is None


def test_vmx_with_nested_intel_y_gives_kvm() -> None:
    f = facts(flags=("vmx",), modules=("kvm", "kvm_intel"), nested={"kvm_intel": "Y"})
    assert choose_accel("auto", f).accel == "kvm"


def test_kvm_pvm_falls_back_to_tcg() -> None:
    choice = choose_accel("auto", facts(modules=("kvm", "kvm_pvm", "kvm_amd")))
    assert choice.accel == "tcg" and choice.cpu == TCG_CPU
    assert "kvm_pvm" in choice.reason
    assert choice.reason.startswith("TCG because")


def test_no_dev_kvm_gives_tcg() -> None:
    choice = choose_accel("auto", facts(kvm_device=False, kvm_writable=False))
    assert choice.accel == "tcg" and choice.cpu == TCG_CPU
    assert "/dev/kvm does not exist" in choice.reason


def test_unwritable_dev_kvm_gives_tcg() -> None:
    choice = choose_accel("auto", facts(kvm_writable=False))
    assert choice.accel == "tcg"
    assert "group kvm" in choice.reason


def test_no_svm_or_vmx_gives_tcg() -> None:
    choice = choose_accel("auto", facts(flags=("fpu", "sse2")))
    assert choice.accel == "tcg"
    assert "neither svm nor vmx" in choice.reason


@pytest.mark.parametrize("value", ["0", "N", "n"])
def test_nested_off_gives_tcg(value: str) -> None:
    choice = choose_accel("auto", facts(nested={"kvm_amd": value}))
    assert choice.accel == "tcg" and choice.cpu == TCG_CPU
    assert f"kvm_amd={value}" in choice.reason
    assert "nested=1" in choice.reason


def test_no_kvm_vendor_module_gives_tcg() -> None:
    choice = choose_accel("auto", facts(modules=("kvm",), nested={}))
    assert choice.accel == "tcg"
    assert "no kvm_amd/kvm_intel" in choice.reason


def test_requested_tcg_is_honoured_even_when_kvm_works() -> None:
    choice = choose_accel("tcg", facts())
    assert choice == AccelChoice("tcg", TCG_CPU, "TCG requested")


def test_requested_kvm_is_honoured_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="harness.accel"):
        choice = choose_accel("kvm", facts(kvm_device=False, kvm_writable=False))
    assert choice.accel == "kvm" and choice.cpu == KVM_CPU
    assert any("/dev/kvm does not exist" in r.getMessage() for r in caplog.records)


def test_requested_kvm_without_problem_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="harness.accel"):
        assert choose_accel("kvm", facts()).accel == "kvm"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_choice_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="harness.accel"):
        choose_accel("auto", facts(kvm_device=False))
    assert any("accelerator: tcg" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ qemu_args


def test_tcg_qemu_args() -> None:
    args = choose_accel("tcg", facts()).qemu_args()
    assert args == ["-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm,+npt"]


def test_kvm_qemu_args() -> None:
    args = choose_accel("auto", facts()).qemu_args()
    assert args == ["-accel", "kvm", "-cpu", "host"]


# ------------------------------------------------------------------ HostFacts.read

CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme de pse svm npt nrip_save
bugs\t\t: sysret_ss_attrs

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu other-cpu-flag
"""


def fake_root(tmp_path: Path, *, kvm: bool = True, nested: dict[str, str] | None = None,
              extra_modules: tuple[str, ...] = ()) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(CPUINFO)
    (root / "dev").mkdir()
    if kvm:
        (root / "dev/kvm").write_text("")
        (root / "dev/kvm").chmod(0o666)
    (root / "sys/module/kvm/parameters").mkdir(parents=True)
    (root / "sys/module/snd").mkdir(parents=True)  # not kvm: ignored
    for mod, value in (nested or {}).items():
        (root / "sys/module" / mod / "parameters").mkdir(parents=True)
        (root / "sys/module" / mod / "parameters/nested").write_text(value + "\n")
    for mod in extra_modules:
        (root / "sys/module" / mod).mkdir(parents=True)
    return root


def test_read_fake_tree(tmp_path: Path) -> None:
    f = HostFacts.read(root=fake_root(tmp_path, nested={"kvm_amd": "1"}))
    assert f.kvm_device and f.kvm_writable
    # Only the first flags line is read.
    assert f.cpu_flags == frozenset({"fpu", "vme", "de", "pse", "svm", "npt", "nrip_save"})
    assert f.modules == frozenset({"kvm", "kvm_amd"})
    assert f.nested == {"kvm_amd": "1"}  # stripped of its newline
    assert choose_accel("auto", f).accel == "kvm"


def test_read_fake_tree_without_dev_kvm(tmp_path: Path) -> None:
    f = HostFacts.read(root=fake_root(tmp_path, kvm=False, nested={"kvm_amd": "1"}))
    assert not f.kvm_device and not f.kvm_writable
    assert choose_accel("auto", f).accel == "tcg"


def test_read_fake_tree_nested_off(tmp_path: Path) -> None:
    f = HostFacts.read(root=fake_root(tmp_path, nested={"kvm_amd": "0"}))
    assert f.nested == {"kvm_amd": "0"}
    choice = choose_accel("auto", f)
    assert choice.accel == "tcg" and "kvm_amd=0" in choice.reason


def test_read_fake_tree_kvm_pvm(tmp_path: Path) -> None:
    f = HostFacts.read(root=fake_root(tmp_path, nested={"kvm_amd": "1"}, extra_modules=("kvm_pvm",)))
    assert "kvm_pvm" in f.modules
    choice = choose_accel("auto", f)
    assert choice.accel == "tcg" and "kvm_pvm" in choice.reason


def test_read_empty_root(tmp_path: Path) -> None:
    f = HostFacts.read(root=tmp_path)
    assert f == HostFacts(False, False, frozenset(), frozenset(), {})
