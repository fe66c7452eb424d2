"""dom0's layout is declared once (harness/dom0_layout.py): no dom0 path literal elsewhere in
harness/ or plugins/ unless the allow-list below says why, and the copies kept by the
tools that run in dom0 on their own agree with it."""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import pytest

from harness import dom0_layout as layout

ROOT = Path(__file__).resolve().parents[2]
LEAF = "harness/dom0_layout.py"
# An absolute path under one of these roots, where a path can start: at the start of a
# string piece, after a separator a shell command or config puts before one, or after
# "$1" (an image build's hook: the new root). "#!" lines are interpreters, not layout.
TOP = r"(?:var|usr|tmp|etc|run|dev|proc|sys|boot|root|opt|lib|lib64|sbin|bin|srv|home|mnt)"
START = r"(?:^|(?<=[\s\"'=(:,;|>{])|(?<=\$1))"
PATH = re.compile(START + r"(/" + TOP + r"(?:/[^\s\"'`;|)&>]*)?)(?=$|[\s\"'`;|)&>/])")
# Paths that name nothing in particular (the null device) and are not layout.
UBIQUITOUS = {"/dev/null"}

# (file, path prefix) -> why that path is spelled there and not taken from dom0_layout.
ALLOWED = {
    # Host side: paths on the machine that runs the harness, never dom0's.
    ("harness/accel.py", "/dev/kvm"): "the harness host's KVM device",
    ("harness/cli.py", "/proc/sys/kernel/unprivileged_userns_clone"): "the harness host's sysctl",
    ("harness/debian_inputs.py", "/usr/share/keyrings/"): "the harness host's Debian keyring",
    ("harness/imaging.py", "/etc/apt/"): "the harness host's apt sources (the mirror's default)",
    ("harness/imaging.py", "/usr/sbin/debootstrap"): "the harness host's debootstrap",
    ("harness/input_image.py", "/usr/share/mmdebstrap/"): "the harness host's mmdebstrap hooks",
    ("harness/ownbuild.py", "/usr/include/"): "the build host's headers build-xen looks for",
    ("harness/ownbuild.py", "/usr/share/seabios/"): "the build host's SeaBIOS build-xen links in",
    ("harness/machines/qemu.py", "/proc/"): "the harness host's QEMU processes",
    ("harness/machines/qemu.py", "/tmp"): "the harness host's QMP and channel sockets",
    ("harness/machines/libvirt/ownership.py", "/proc/"): "the harness host's processes",
    ("harness/machines/libvirt/storage.py", "/var/lib/libvirt/"): "libvirt's storage pool on its host",
    ("harness/machines/libvirt/storage.py", "/tmp"): "the libvirt host's scratch",
    ("harness/machines/libvirt/machine.py", "/var/log/libvirt/"): "libvirt's QEMU log on its host",
    ("harness/provision.py", "/proc/"): "the harness host's processes (a restore's holder)",
    # Inside the L2 guests, not dom0: the guest initramfs's init script.
    ("harness/guest_payload.py", "/"): "the L2 guest's own root (its init script), not dom0's",
    # The tools that run in dom0 alone cannot import the harness (see test_dom0_tools_agree).
    ("harness/agent/nxchannel.py", "/proc/uptime"): "runs in dom0 alone; agrees with PROC_UPTIME (test)",
}
# The dom0 agent's package keeps its own copies (it cannot import the harness).
AGENT_PACKAGE = "harness/agent/nxagent/"


def _sources() -> list[Path]:
    return sorted(p for d in ("harness", "plugins") for p in (ROOT / d).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring constants (documentation, not layout)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _after_a_value(tree: ast.AST) -> set[int]:
    """The ids of f-string pieces that follow a {value}: a path at their start is below
    that value (f"{layout.XEN_LIB}/bin"), not spelled from the root."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            pairs = zip(node.values, node.values[1:], strict=False)
            out |= {id(b) for a, b in pairs if isinstance(a, ast.FormattedValue)}
    return out


def path_literals(source: str) -> list[tuple[int, str]]:
    """(line, path) of each absolute path spelled in a string literal of ``source``
    (f-string pieces included; docstrings, "#!" lines and UBIQUITOUS left out)."""
    tree = ast.parse(source)
    skip, relative = _docstrings(tree), _after_a_value(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = "\n".join(line for line in node.value.split("\n") if not line.startswith("#!"))
            found += [(node.lineno, m.group(1)) for m in PATH.finditer(text)
                      if m.group(1) not in UBIQUITOUS and not (m.start(1) == 0 and id(node) in relative)]
    return found


def _allowed(rel: str, path: str) -> bool:
    return any(rel == f and path.startswith(prefix) for f, prefix in ALLOWED)


def test_no_dom0_path_literal_outside_the_leaf():
    stray = []
    for src in _sources():
        rel = src.relative_to(ROOT).as_posix()
        if rel == LEAF or rel.startswith(AGENT_PACKAGE):
            continue
        stray += [f"{rel}:{line}: {path}" for line, path in path_literals(src.read_text())
                  if not _allowed(rel, path)]
    assert not stray, ("dom0 paths spelled outside harness/dom0_layout.py (import its name, or add "
                       "the path there; a host-side path goes in ALLOWED with its reason):\n"
                       + "\n".join(stray))


def test_every_allowance_has_a_reason_and_is_still_needed():
    used = set()
    for src in _sources():
        rel = src.relative_to(ROOT).as_posix()
        for _, path in path_literals(src.read_text()):
            used |= {(f, p) for f, p in ALLOWED if f == rel and path.startswith(p)}
    assert all(reason.strip() for reason in ALLOWED.values())
    assert set(ALLOWED) == used, f"allowances nothing needs any more: {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize("source, expected", [
    ('x = "/var/log/xen/console"', ["/var/log/xen/console"]),
    ("x = 'mkdir -p \"$1/etc/nested-xen\"'", ["/etc/nested-xen"]),
    ('x = f"cat {d}/etc/sources.list; ls /tmp/nx-{n}.log"', ["/tmp/nx-"]),
    ('x = "cmd 2>/dev/null; test -c /dev/xen/privcmd"', ["/dev/xen/privcmd"]),
    ('x = "#!/bin/sh\\necho hi"', []),
    ('"""A docstring about /var/lib/nested-xen."""', []),
    ('x = "a/var/b and usr/lib and http://host/etc"', []),
])
def test_the_scan_finds_dom0_paths_and_only_them(source, expected):
    assert [p for _, p in path_literals(source)] == expected


def test_the_scan_catches_a_literal_put_back(tmp_path):
    """Negative control: the guests' console directory spelled again in a module is caught."""
    module = (ROOT / "harness/guests.py").read_text()
    assert "/var/log/xen/console" not in [p for _, p in path_literals(module)]
    again = module + '\nCONSOLE_AGAIN = "/var/log/xen/console"\n'
    assert ("/var/log/xen/console" in [p for _, p in path_literals(again)]
            and not _allowed("harness/guests.py", "/var/log/xen/console"))


def test_the_leaf_imports_nothing_of_the_harness():
    tree = ast.parse((ROOT / LEAF).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_dom0_tools_agree_with_the_leaf(monkeypatch):
    from harness.agent.nxagent import abi, commands
    from harness.machines.common import LINK_SLOT

    assert (abi.PRIVCMD_PATH, abi.DEVMEM_PATH, abi.SYS_HYPERVISOR) == (
        layout.PRIVCMD_DEVICE, layout.DEVMEM, layout.SYS_HYPERVISOR)
    assert f'open("{layout.PROC_UPTIME}")' in (ROOT / "harness/agent/nxchannel.py").read_text()
    assert f"0000:00:{LINK_SLOT:02x}.0" in layout.LINK_NIC_NET_DIRS
    # Where the agent looks for xen-mfndump: each a Xen tool directory the leaf declares.
    looked: list[str] = []
    monkeypatch.setattr(commands.shutil, "which", lambda name: None)
    monkeypatch.setattr(commands.glob, "glob", lambda pattern: looked.append(pattern) or [])
    monkeypatch.setattr(commands.os, "access", lambda path, mode: looked.append(path) and False)
    assert commands.find_mfndump(None) is None
    dirs = {f"{d}/bin" for d in (layout.DEBIAN_XEN_LIB_ANY, layout.OWN_XEN_LIB, layout.XEN_LIB)}
    dirs |= {layout.SBIN, layout.LOCAL_SBIN}
    assert looked and {os.path.dirname(p) for p in looked} <= dirs, looked


def test_the_harness_names_come_from_the_leaf():
    from harness import dom0_files, guests, imaging, xen
    from harness.agent import build
    from harness.machines import qemu

    assert dom0_files.AGENT.remote == layout.AGENT_PATH and build.FILE_NAME == layout.AGENT_NAME
    assert (dom0_files.WATCHER.remote, dom0_files.CHANNEL.remote, dom0_files.STREAM.remote) == (
        layout.WATCH_PATH, layout.CHANNEL_TOOL_PATH, layout.STREAM_TOOL_PATH)
    assert qemu.CHANNEL_NAME == layout.CHANNEL_NAME and xen.XEN_LOG_DIR == layout.XEN_LOG_DIR
    assert imaging.REMOTE_PAYLOAD_DIR == layout.PAYLOAD_DIR
    assert guests.GuestSpec(type="hvm", name="g").console_log == f"{layout.CONSOLE_DIR}/hvm-g.log"
    assert guests.GuestSpec(type="pvh", name="g").console_log == f"{layout.CONSOLE_DIR}/guest-g.log"


def test_the_agent_client_and_the_migration_transport_take_their_paths_from_the_leaf():
    import inspect

    from harness.agent import client
    from plugins import _migration_stream as stream

    assert client.REMOTE_AGENT_PATH == layout.AGENT_PATH
    assert inspect.signature(client.Agent).parameters["remote_path"].default == layout.AGENT_PATH
    assert f"$(ls {layout.LINK_NIC_NET_DIRS})" == stream.LINK_DEV
