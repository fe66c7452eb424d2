"""Helpers both L1 backends use (machines/qemu.py, machines/libvirt/): free local
ports, a private link's port pair, qcow2 overlays, and a child that dies with
the harness."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
from pathlib import Path

from .. import timeouts as t
from .base import LinkPorts, MachineStartError

PR_SET_PDEATHSIG = 1
LINK_SLOT = 0x6  # PCI slot of the private link NIC (dom0 names it ens6)


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A TCP (or, with SOCK_DGRAM, UDP) port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_link() -> LinkPorts:
    """Two distinct free UDP ports for a private link."""
    local = free_port(socket.SOCK_DGRAM)
    while (peer := free_port(socket.SOCK_DGRAM)) == local:
        pass
    return LinkPorts(local, peer)


def create_overlay(path: Path, backing: Path, backing_fmt: str) -> None:
    """A qcow2 file whose reads fall through to ``backing``."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_fmt,
           "-b", str(backing.resolve()), str(path)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=t.HOST_TOOL_S)
    except FileNotFoundError:
        raise MachineStartError("qemu-img is not installed: run `apt-get install qemu-utils`") from None
    except subprocess.CalledProcessError as exc:
        raise MachineStartError(f"qemu-img failed: {exc.stderr.strip()}") from None
