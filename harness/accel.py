"""Can this host give QEMU nested virtualization? Picks the accelerator and -cpu.

KVM is used only when /dev/kvm can run a nested hypervisor: the CPU shows
svm or vmx, the kvm_amd/kvm_intel module has nesting on, and the KVM in use is
not a paravirtual one (kvm_pvm cannot run Xen). Otherwise TCG with an AMD
model that has SVM and nested paging, which gives Xen HVM guests with HAP.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# `-cpu max` crashes a PV dom0 under TCG; qemu64 + svm + npt boots and gives HAP.
TCG_CPU = "qemu64,+svm,+npt"
KVM_CPU = "host"


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    cpu: str
    reason: str

    def qemu_args(self) -> list[str]:
        accel = "kvm" if self.accel == "kvm" else "tcg,thread=multi"
        return ["-accel", accel, "-cpu", self.cpu]


@dataclass(frozen=True)
class HostFacts:
    """What the decision depends on, read from /proc and /sys (injectable for tests)."""

    kvm_device: bool
    kvm_writable: bool
    cpu_flags: frozenset[str]
    modules: frozenset[str]
    nested: dict[str, str]

    @classmethod
    def read(cls, root: Path = Path("/")) -> HostFacts:
        kvm = root / "dev/kvm"
        flags: set[str] = set()
        try:
            for line in (root / "proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
        modules = {p.name for p in (root / "sys/module").glob("kvm*")}
        nested = {}
        for mod in ("kvm_amd", "kvm_intel"):
            path = root / "sys/module" / mod / "parameters/nested"
            if path.exists():
                nested[mod] = path.read_text().strip()
        return cls(
            kvm_device=kvm.exists(),
            kvm_writable=kvm.exists() and os.access(kvm, os.R_OK | os.W_OK),
            cpu_flags=frozenset(flags),
            modules=frozenset(modules),
            nested=nested,
        )


def nested_kvm_problem(facts: HostFacts) -> str | None:
    """None when KVM can run Xen nested; else a sentence saying why not."""
    if not facts.kvm_device:
        return "/dev/kvm does not exist"
    if not facts.kvm_writable:
        return "/dev/kvm is not readable and writable by this user (add yourself to group kvm)"
    if "kvm_pvm" in facts.modules:
        return "/dev/kvm is kvm_pvm (paravirtual KVM), which cannot run a nested hypervisor"
    if not ({"svm", "vmx"} & facts.cpu_flags):
        return "the CPU shows neither svm nor vmx"
    if not any(v in ("1", "Y", "y") for v in facts.nested.values()):
        shown = ", ".join(f"{k}={v}" for k, v in facts.nested.items()) or "no kvm_amd/kvm_intel"
        return f"nested virtualization is off ({shown}); enable it with the module's nested=1"
    return None


def choose_accel(requested: str = "auto", facts: HostFacts | None = None) -> AccelChoice:
    """Pick KVM or TCG for ``requested`` in auto/kvm/tcg, logging which and why."""
    facts = facts or HostFacts.read()
    problem = nested_kvm_problem(facts)
    if requested == "tcg":
        choice = AccelChoice("tcg", TCG_CPU, "TCG requested")
    elif requested == "kvm":
        if problem:
            log.warning("KVM requested although %s; Xen may not boot", problem)
        choice = AccelChoice("kvm", KVM_CPU, "KVM requested")
    elif problem is None:
        choice = AccelChoice("kvm", KVM_CPU, "KVM with nested virtualization is available")
    else:
        choice = AccelChoice("tcg", TCG_CPU, f"TCG because {problem}")
    log.info("accelerator: %s (-cpu %s): %s", choice.accel, choice.cpu, choice.reason)
    return choice
