"""SSH to dom0 with paramiko: commands with deadlines, file copy, a testinfra host.

Three verbs: ``run()`` returns a :class:`CommandResult` whatever the exit
status; ``run_expect()`` and ``check_output()`` raise :class:`CommandFailed`.
A transport failure always raises :class:`RemoteError`. Every command has a
timeout and is logged as ``[dom0] cmd`` with its exit status and output.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from . import timeouts as t

log = logging.getLogger(__name__)
# paramiko logs every refused connection of a readiness probe as an ERROR with a
# traceback; the harness reports transport failures itself, as exceptions.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


class RemoteError(RuntimeError):
    """The SSH transport failed (not the command)."""


class RemoteTimeout(RemoteError):
    """A command did not finish within its timeout."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    rc: int
    stdout: str
    stderr: str
    host: str
    seconds: float

    def describe(self, limit: int = 4000) -> str:
        out = self.stdout[-limit:].rstrip()
        err = self.stderr[-limit:].rstrip()
        return (
            f"[{self.host}] `{self.command}` exited {self.rc} after {self.seconds:.1f} s"
            + (f"\n--- stdout ---\n{out}" if out else "")
            + (f"\n--- stderr ---\n{err}" if err else "")
        )


class CommandFailed(RuntimeError):
    def __init__(self, result: CommandResult, expected: Iterable[int]) -> None:
        self.result = result
        super().__init__(f"expected exit status in {sorted(expected)}: " + result.describe())


CHANNEL_OPEN_S = t.CHANNEL_OPEN_S  # why: harness/timeouts.py


class Remote:
    """An SSH connection to one host, reconnecting when the transport drops."""

    def __init__(self, host: str, port: int, key_path: Path, label: str = "dom0",
                 user: str = "root", default_timeout: float = t.COMMAND_S) -> None:
        self.host, self.port, self.key_path = host, port, key_path
        self.label, self.user = label, user
        self.default_timeout = default_timeout
        self._client: paramiko.SSHClient | None = None

    # ------------------------------------------------------------ connection
    def connect(self, timeout: float = CHANNEL_OPEN_S) -> None:
        client = paramiko.SSHClient()
        # Host keys are per image and ports are reused: the image key is the trust anchor.
        client.set_missing_host_key_policy(paramiko.MissingHostKeyPolicy())
        try:
            client.connect(
                self.host, port=self.port, username=self.user, key_filename=str(self.key_path),
                timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                allow_agent=False, look_for_keys=False,
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise RemoteError(f"[{self.label}] cannot connect to {self.host}:{self.port}: {exc}") from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        self._client = client

    def try_connect(self, timeout: float = t.SSH_PROBE_S) -> bool:
        """One readiness probe: connect and run `true`; False instead of raising."""
        try:
            self.close()
            self.connect(timeout=timeout)
            # connect, then `true` in twice the probe's time (timeouts.SSH_PROBE_S)
            return self.run("true", timeout=timeout * 2, log_level=logging.DEBUG).rc == 0
        except RemoteError as exc:
            log.debug("%s", exc)
            self.close()
            return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            self.connect()
            transport = self._client.get_transport() if self._client else None
        if transport is None:
            raise RemoteError(f"[{self.label}] no SSH transport")
        return transport

    # ------------------------------------------------------------ commands
    def run(self, command: str, timeout: float | None = None, stdin: str | bytes | None = None,
            log_level: int = logging.DEBUG) -> CommandResult:
        """Run ``command``; return its result whatever the exit status."""
        timeout = self.default_timeout if timeout is None else timeout
        log.log(log_level, "[%s] %s", self.label, command)
        started = time.monotonic()
        try:
            chan = self._transport().open_session(timeout=CHANNEL_OPEN_S)
            chan.settimeout(1.0)  # each read waits this long at most, so _collect sees its deadline
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
            chan.shutdown_write()
            out, err = self._collect(chan, command, started + timeout)
            rc = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise RemoteError(f"[{self.label}] transport failed during `{command}`: {exc}") from exc
        result = CommandResult(command, rc, out, err, self.label, time.monotonic() - started)
        log.log(log_level, "[%s] exit %d in %.1f s", self.label, rc, result.seconds)
        for line in (out + err).splitlines()[-200:]:
            log.log(log_level, "[%s]   %s", self.label, line)
        return result

    def _collect(self, chan: paramiko.Channel, command: str, deadline: float) -> tuple[str, str]:
        out, err = bytearray(), bytearray()
        while True:
            if time.monotonic() > deadline:
                chan.close()
                raise RemoteTimeout(f"[{self.label}] `{command}` did not finish in time; "
                                    f"partial output:\n{out[-2000:].decode(errors='replace')}")
            try:
                if chan.recv_ready():
                    out += chan.recv(65536)
                    continue
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    continue
                data = chan.recv(65536)
                if not data:  # EOF: all of stdout has arrived; drain what stderr holds
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                    break
                out += data
            except TimeoutError:
                continue
        return out.decode(errors="replace"), err.decode(errors="replace")

    def run_expect(self, command: str, codes: Iterable[int] = (0,), **kwargs: object) -> CommandResult:
        result = self.run(command, **kwargs)  # type: ignore[arg-type]
        if result.rc not in tuple(codes):
            raise CommandFailed(result, codes)
        return result

    def check_output(self, command: str, **kwargs: object) -> str:
        return self.run_expect(command, (0,), **kwargs).stdout

    def as_runner(self):
        """``run(cmd, stdin, timeout) -> (rc, stdout, stderr)``, the shape the dom0 agent client takes."""

        def run(cmd: str, stdin: str, timeout: float) -> tuple[int, str, str]:
            result = self.run(cmd, stdin=stdin, timeout=timeout)
            return result.rc, result.stdout, result.stderr

        return run

    # ------------------------------------------------------------ files
    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        log.debug("[%s] put %s -> %s", self.label, local, remote)
        self._transport()
        assert self._client is not None
        parent = str(Path(remote).parent)
        self.run_expect(f"mkdir -p {shlex.quote(parent)}", timeout=t.QUICK_COMMAND_S)
        with self._client.open_sftp() as sftp:
            sftp.put(str(local), remote)
            if mode is not None:
                sftp.chmod(remote, mode)

    def put_text(self, text: str, remote: str, mode: int | None = None) -> None:
        self.run_expect(f"mkdir -p {shlex.quote(str(Path(remote).parent))} && cat > {shlex.quote(remote)}",
                        stdin=text, timeout=t.SMALL_COMMAND_S)
        if mode is not None:
            self.run_expect(f"chmod {mode:o} {shlex.quote(remote)}", timeout=t.QUICK_COMMAND_S)

    def get(self, remote: str, local: Path) -> None:
        self._transport()
        assert self._client is not None
        local.parent.mkdir(parents=True, exist_ok=True)
        with self._client.open_sftp() as sftp:
            sftp.get(remote, str(local))

    # ------------------------------------------------------------ testinfra
    def testinfra_host(self):  # -> testinfra.host.Host
        """A testinfra host over the same key, for English-like assertions."""
        import testinfra

        return testinfra.get_host(
            f"paramiko://{self.user}@{self.host}:{self.port}",
            ssh_identity_file=str(self.key_path),
            timeout=int(self.default_timeout),
        )
