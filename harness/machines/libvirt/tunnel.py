"""The ``ssh -L`` tunnel to dom0's SSH, forwarded on a remote libvirt host's 127.0.0.1."""

from __future__ import annotations

import logging
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

from ... import timeouts as t
from ..base import MachineStartError
from ..common import die_with_parent, free_port
from .uri import LibvirtUri

log = logging.getLogger("harness.machines.libvirt")  # one logger for the backend


class SshTunnel:
    """``ssh -L`` from a local port to the forwarded dom0 SSH port on the libvirt host."""

    def __init__(self, uri: LibvirtUri, remote_port: int, log_path: Path) -> None:
        self.uri, self.remote_port, self.log_path = uri, remote_port, log_path
        self.local_port = 0
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [*self.uri.ssh_base(), "-N", "-o", "ExitOnForwardFailure=yes",
                "-o", "ServerAliveInterval=15",
                "-L", f"127.0.0.1:{self.local_port}:127.0.0.1:{self.remote_port}", str(self.uri.host)]

    def open(self, timeout: float = t.TUNNEL_OPEN_S, attempts: int = 3) -> None:
        self.local_port = free_port()
        cmd = self.command()
        log.info("SSH tunnel: %s", shlex.join(cmd))
        with open(self.log_path, "w") as out:
            on_main = threading.current_thread() is threading.main_thread()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True,
                                         preexec_fn=die_with_parent if on_main else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = self.log_path.read_text(errors="replace").strip()
                if "Address already in use" in said and attempts > 1:
                    # The free port was taken between free_port() and ssh's bind.
                    log.warning("SSH tunnel: local port %d was taken; another port", self.local_port)
                    return self.open(max(deadline - time.monotonic(), t.TUNNEL_RETRY_MIN_S), attempts - 1)
                raise MachineStartError(f"SSH tunnel to {self.uri.host} exited: {said[-1000:]}")
            with socket.socket() as sock:
                sock.settimeout(t.SOCKET_PROBE_S)
                if sock.connect_ex(("127.0.0.1", self.local_port)) == 0:
                    return
            time.sleep(0.2)
        self.close()
        raise MachineStartError(f"SSH tunnel to {self.uri.host} did not listen within {timeout:.0f} s")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=t.PROCESS_EXIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=t.PROCESS_EXIT_S)
        self.proc = None
