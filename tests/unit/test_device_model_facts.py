"""The device model as a host fact (harness/host.py): its version from the binary itself,
the package that installed it, read by DEVICE_MODEL_PROBE in the one round trip it was.

The probe runs in a local bash standing in for dom0, with the few commands it asks of a
Debian dom0 (ldconfig, dpkg, dpkg-query) answering as there."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from harness.host import DEVICE_MODEL_PROBE, HostFacts, device_model_version, parse_device_model_probe


@pytest.mark.parametrize(("line", "version"), [
    # bookworm's qemu-system-xen
    ("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)", "7.2.15"),
    # trixie's
    ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", "10.0.2"),
    # testing's: the one that refuses `-incoming fd:` on a file
    ("QEMU emulator version 11.1.2 (Debian 1:11.1.2+ds-3)", "11.1.2"),
    ("QEMU emulator version 9.2", "9.2.0"),
    ("xen-qemu-system-i386: error while loading shared libraries: libxenctrl.so.4.20", ""),
    ("", ""),
])
def test_device_model_version_from_its_version_line(line: str, version: str) -> None:
    assert device_model_version(line) == version


def fake_dom0(tmp_path: Path, package: bool = True, executable: bool = True) -> tuple[dict[str, str], str]:
    """A PATH whose ldconfig names a libxenlight with the device model's path compiled in."""
    bin_dir, dm = tmp_path / "bin", tmp_path / "usr" / "libexec" / "xen-qemu-system-i386"
    bin_dir.mkdir()
    dm.parent.mkdir(parents=True)
    dm.write_text("#!/bin/sh\necho 'QEMU emulator version 11.1.2 (Debian 1:11.1.2+ds-3)'\n"
                  "echo 'Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers'\n")
    dm.chmod(0o755 if executable else 0o644)
    lib = tmp_path / "libxenlight.so.4.20"
    lib.write_bytes(b"\x7fELF\x00junk\x00" + str(dm).encode() + b"\x00more")
    scripts = {
        "ldconfig": f"echo '\tlibxenlight.so.4.20 (libc6,x86-64) => {lib}'",
        "dpkg": (f'[ "$2" = "{dm}" ] && echo "qemu-system-xen:amd64: {dm}" && exit 0; exit 1' if package
                 else "echo \"dpkg-query: no path found matching pattern $2\" >&2; exit 1"),
        "dpkg-query": '[ "$3" = qemu-system-xen ] && printf "1:11.1.2+ds-3"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, str(dm)


def probe(env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", DEVICE_MODEL_PROBE], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    return done.stdout


def test_the_probe_reads_path_version_and_package_in_one_command(tmp_path: Path) -> None:
    env, dm = fake_dom0(tmp_path)
    found = parse_device_model_probe(probe(env))
    assert (found.path, found.version, found.package) == (dm, "11.1.2", "qemu-system-xen 1:11.1.2+ds-3")


def test_a_device_model_from_no_package(tmp_path: Path) -> None:
    """An own build's QEMU (inputs.device_model) is no package's: "" says so."""
    env, dm = fake_dom0(tmp_path, package=False)
    found = parse_device_model_probe(probe(env))
    assert (found.path, found.version, found.package) == (dm, "11.1.2", "")


def test_no_device_model(tmp_path: Path) -> None:
    env, _ = fake_dom0(tmp_path, executable=False)
    found = parse_device_model_probe(probe(env))
    assert (found.origin, found.path, found.version, found.package) == ("debian", "", "", "")


def test_the_facts_carry_the_device_model() -> None:
    facts = HostFacts(xen_version="4.20.4", kernel_release="7.2.12", dom0_mode="pv", virt_caps=frozenset(),
                      xen_caps=frozenset(), accel="tcg", device_model="/usr/libexec/xen-qemu-system-i386",
                      device_model_version="11.1.2", device_model_package="qemu-system-xen 1:11.1.2+ds-3")
    data = facts.as_dict()
    assert data["device_model_version"] == "11.1.2"
    assert data["device_model_package"] == "qemu-system-xen 1:11.1.2+ds-3"
    assert set(data) == {f.name for f in dataclasses.fields(HostFacts)}  # as_dict in step with the fields


# ------------------------------------------------------------------ results.json, summary.md, report.html

TESTING_DM = {"device_model": "/usr/libexec/xen-qemu-system-i386", "device_model_version": "11.1.2",
              "device_model_package": "qemu-system-xen 1:11.1.2+ds-3"}


def result_on_testing(**dm: str):
    from harness.results import CheckResult

    return CheckResult("plugins/translation.py::test_translation_survives_save_restore[hvm]", "translation",
                       "test_translation_survives_save_restore", "testing", "hvm", "pv", "4.20.4", "7.2.12",
                       "tcg", "failed", 12.0, "device model spawn failed", **dm)


def test_the_device_model_reaches_results_summary_and_report(tmp_path: Path) -> None:
    from harness.html_report import results_section
    from harness.results import Results, host_properties, markdown, write_json

    facts = HostFacts(xen_version="4.20.4", kernel_release="7.2.12", dom0_mode="pv", virt_caps=frozenset(),
                      xen_caps=frozenset(), accel="tcg", **TESTING_DM)
    props = dict(host_properties(facts))
    assert {k: props[k] for k in TESTING_DM} == TESTING_DM  # JUnit properties from the facts
    report = pytest.TestReport(result_on_testing().nodeid, ("plugins/translation.py", 0, "x"), {}, "passed",
                               None, "call", user_properties=[("plugin", "translation"), *props.items()])
    results = Results()
    results.add(report)
    assert {k: getattr(results.results[0], k) for k in TESTING_DM} == TESTING_DM
    label = "11.1.2 (qemu-system-xen 1:11.1.2+ds-3) /usr/libexec/xen-qemu-system-i386"
    summary = markdown([result_on_testing(**TESTING_DM)])
    assert "| image | dom0 | Xen | dom0 kernel | device model | accel | tests | time |" in summary
    assert f"| testing | pv | 4.20.4 | 7.2.12 | {label} | tcg | 1 | 12 s |" in summary
    write_json([result_on_testing(**TESTING_DM)], tmp_path / "results.json")
    assert label in results_section(tmp_path)
    # a run whose hosts named no device model (an older results.json) has no such column
    assert "| device model |" not in markdown([result_on_testing()])
    own_build = result_on_testing(device_model="/usr/lib/xen/bin/qemu-system-i386")  # version unknown
    write_json([own_build], tmp_path / "results.json")
    assert "? /usr/lib/xen/bin/qemu-system-i386" in results_section(tmp_path)
