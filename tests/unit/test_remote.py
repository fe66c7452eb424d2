"""Unit tests for harness.remote against a real SSH server run in-process.

The server is the fake at the SSH boundary: paramiko on 127.0.0.1, accepting
only the client's Ed25519 key, running each exec request with ``sh -c`` on
this machine (stdin forwarded, stdout/stderr and the exit status sent back).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from harness.imaging import generate_ssh_key
from harness.machines.qemu import free_port
from harness.remote import CommandFailed, CommandResult, Remote, RemoteError, RemoteTimeout


class _Server(paramiko.ServerInterface):
    def __init__(self, owner: FakeSSHServer) -> None:
        self.owner = owner

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == "root" and key == self.owner.client_key:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self.owner.execute, args=(channel, command.decode()), daemon=True).start()
        return True


class FakeSSHServer:
    """A listening socket and one paramiko Transport per connection.

    RFC 4254 leaves the order of a command's last output, EOF and exit status
    open. By default this server sends all output, then EOF, then the exit
    status 50 ms later. With ``openssh_order`` it behaves like OpenSSH's sshd:
    exit-status as soon as the command exits, then the remaining output, EOF
    and close (`ssh -vvv` shows "rtype exit-status" before "rcvd eof").
    """

    def __init__(self, host_key: paramiko.PKey, client_key: paramiko.PKey) -> None:
        self.host_key, self.client_key = host_key, client_key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.transports: list[paramiko.Transport] = []
        self.procs: list[subprocess.Popen] = []
        self.commands: list[str] = []
        self.openssh_order = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            with self.lock:
                self.transports.append(transport)
            try:
                transport.start_server(server=_Server(self))
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()

    def execute(self, chan: paramiko.Channel, command: str) -> None:
        with self.lock:
            self.commands.append(command)
        proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        with self.lock:
            self.procs.append(proc)

        def feed_stdin() -> None:
            assert proc.stdin is not None
            try:
                while True:
                    data = chan.recv(65536)
                    if not data:
                        break
                    proc.stdin.write(data)
                    proc.stdin.flush()
            except (OSError, EOFError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()

        def pump(stream, send) -> None:
            try:
                for data in iter(lambda: stream.read1(65536), b""):
                    send(data)
            except (OSError, EOFError, paramiko.SSHException):
                pass

        threads = [
            threading.Thread(target=feed_stdin, daemon=True),
            threading.Thread(target=pump, args=(proc.stdout, chan.sendall), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, chan.sendall_stderr), daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            if self.openssh_order:
                # Like sshd: exit-status as soon as the command exits, output and EOF after.
                chan.send_exit_status(_status(proc.wait()))
                threads[1].join()
                threads[2].join()
                chan.shutdown_write()
            else:
                # All output, EOF, then (a little later) the exit status.
                threads[1].join()
                threads[2].join()
                rc = proc.wait()
                chan.shutdown_write()
                time.sleep(0.05)
                chan.send_exit_status(_status(rc))
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the client went away (e.g. after its timeout)

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            for proc in self.procs:
                # Each command leads its own process group: take its children (sleep) too.
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for transport in self.transports:
                transport.close()


def _status(rc: int) -> int:
    """Popen's -N (killed by signal N) as a shell would report it."""
    return rc if rc >= 0 else 128 - rc


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    generate_ssh_key(d / "host_key")
    generate_ssh_key(d / "id_ed25519")
    generate_ssh_key(d / "stranger")
    return d


@pytest.fixture(scope="module")
def server(keys: Path) -> Iterator[FakeSSHServer]:
    srv = FakeSSHServer(paramiko.Ed25519Key.from_private_key_file(str(keys / "host_key")),
                        paramiko.Ed25519Key.from_private_key_file(str(keys / "id_ed25519")))
    yield srv
    srv.close()


@pytest.fixture
def remote(server: FakeSSHServer, keys: Path) -> Iterator[Remote]:
    r = Remote("127.0.0.1", server.port, keys / "id_ed25519", label="testdom0", default_timeout=20)
    yield r
    r.close()


# ------------------------------------------------------------------ run


def test_run_returns_rc_stdout_stderr(remote: Remote) -> None:
    result = remote.run("echo out; echo err >&2; exit 3")
    assert isinstance(result, CommandResult)
    assert result.rc == 3
    assert result.stdout == "out\n" and result.stderr == "err\n"
    assert result.command == "echo out; echo err >&2; exit 3"
    assert result.host == "testdom0" and result.seconds >= 0


def test_run_success_and_reuse_of_connection(remote: Remote, server: FakeSSHServer) -> None:
    assert remote.run("true").rc == 0
    connections = len(server.transports)
    assert remote.run("printf '%s' hello").stdout == "hello"
    assert len(server.transports) == connections  # one transport, many channels


def test_run_large_output(remote: Remote) -> None:
    result = remote.run("head -c 300000 /dev/zero | tr '\\0' x; echo; echo tail >&2")
    assert result.rc == 0
    assert len(result.stdout) == 300001 and set(result.stdout.strip()) == {"x"}
    assert result.stderr == "tail\n"


def test_run_stdin(remote: Remote) -> None:
    assert remote.run("tr a-z A-Z", stdin="hello dom0\n").stdout == "HELLO DOM0\n"
    assert remote.run("wc -c", stdin=b"\x00\x01\x02").stdout.strip() == "3"


def test_run_expect_raises_with_command_and_output(remote: Remote) -> None:
    with pytest.raises(CommandFailed) as info:
        remote.run_expect("echo some-output; echo some-error >&2; exit 4")
    msg = str(info.value)
    assert "expected exit status in [0]" in msg
    assert "`echo some-output; echo some-error >&2; exit 4` exited 4" in msg
    assert "some-output" in msg and "some-error" in msg
    assert info.value.result.rc == 4


def test_run_expect_other_codes(remote: Remote) -> None:
    assert remote.run_expect("exit 1", codes=(0, 1)).rc == 1


def test_check_output(remote: Remote) -> None:
    assert remote.check_output("echo 4.17.5") == "4.17.5\n"
    with pytest.raises(CommandFailed):
        remote.check_output("false")


def test_timeout_raises_quickly(remote: Remote) -> None:
    started = time.monotonic()
    with pytest.raises(RemoteTimeout) as info:
        remote.run("echo partial; sleep 30", timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    msg = str(info.value)
    assert "did not finish in time" in msg and "sleep 30" in msg
    assert "partial" in msg
    # The connection is still usable afterwards.
    assert remote.run("echo again", timeout=10).stdout == "again\n"


# ------------------------------------------------------------------ connecting


def test_try_connect_true(remote: Remote) -> None:
    assert remote.try_connect(timeout=5) is True


def test_try_connect_false_on_closed_port(keys: Path) -> None:
    port = free_port()  # nothing listens there once the probe socket is closed
    r = Remote("127.0.0.1", port, keys / "id_ed25519")
    started = time.monotonic()
    assert r.try_connect(timeout=2) is False
    assert time.monotonic() - started < 5


def test_connect_error_names_host_and_port(keys: Path) -> None:
    port = free_port()
    r = Remote("127.0.0.1", port, keys / "id_ed25519", label="lab")
    with pytest.raises(RemoteError, match=f"\\[lab\\] cannot connect to 127.0.0.1:{port}"):
        r.run("true")


def test_wrong_key_is_refused(server: FakeSSHServer, keys: Path) -> None:
    r = Remote("127.0.0.1", server.port, keys / "stranger")
    assert r.try_connect(timeout=5) is False
    with pytest.raises(RemoteError, match="cannot connect"):
        r.connect(timeout=5)


def test_reconnects_after_close(remote: Remote) -> None:
    assert remote.run("true").rc == 0
    remote.close()
    assert remote.run("echo back").stdout == "back\n"


# ------------------------------------------------------------------ files


def test_put_text_round_trip(remote: Remote, tmp_path: Path) -> None:
    target = tmp_path / "deep/er/file.cfg"
    text = "name = 'g'\nmemory = 256\n# ünïcode\n"
    remote.put_text(text, str(target), mode=0o640)
    assert target.read_text() == text
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert remote.check_output(f"cat {target}") == text


def test_put_text_with_space_in_path(remote: Remote, tmp_path: Path) -> None:
    target = tmp_path / "with space/x y.txt"
    remote.put_text("ok\n", str(target))
    assert target.read_text() == "ok\n"


# ------------------------------------------------------------------ sshd's message order


@pytest.fixture
def openssh_order(server: FakeSSHServer) -> Iterator[None]:
    server.openssh_order = True
    yield
    server.openssh_order = False


def test_openssh_order_plain_command(remote: Remote, openssh_order: None) -> None:
    result = remote.run("echo out; exit 5")
    assert (result.rc, result.stdout) == (5, "out\n")


def test_openssh_order_late_stderr_is_kept(remote: Remote, openssh_order: None) -> None:
    # A little stdout, a pause, then the error on stderr (like a slow, failing `xl create`).
    result = remote.run("echo Parsing config; sleep 0.3; echo 'libxl: error: boom' >&2; exit 3")
    assert result.rc == 3
    assert result.stderr == "libxl: error: boom\n"


def test_openssh_order_output_after_exit_status_is_kept(remote: Remote, openssh_order: None) -> None:
    # The shell exits at once; output that follows on the channel (after a pause longer
    # than the client's 1 s poll) must not be cut off.
    result = remote.run("(sleep 1.3; echo late) & echo early")
    assert result.stdout == "early\nlate\n"


class _Dom0:
    """dom0 at the SSH boundary: `answers` says, try by try, whether `xl list` works."""

    def __init__(self, answers: list[object]) -> None:
        self.answers, self.tries = answers, 0

    def run(self, command: str, timeout: float | None = None):
        from types import SimpleNamespace

        answer = self.answers[min(self.tries, len(self.answers) - 1)]
        self.tries += 1
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(rc=answer)


def _host(answers: list[object], ended: str | None = None):
    from types import SimpleNamespace

    return SimpleNamespace(name="h", remote=_Dom0(answers), machine=SimpleNamespace(alive=lambda: ended))


def test_a_slow_dom0_is_not_lost_at_its_first_failed_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI, stop 23: one 10 s channel-open timeout under an HVM guest's boot errored a check;
    a dom0 that answers within the patience is healthy. Control: one that never does is lost."""
    from harness.fixtures import hosts
    from harness.remote import RemoteError

    monkeypatch.setattr(hosts.time, "sleep", lambda s: None)
    slow = _host([RemoteError("Timeout opening channel."), 255, 0])
    assert hosts.healthy(slow, patience=60) and slow.remote.tries == 3
    assert not hosts.healthy(_host([RemoteError("No existing session")]), patience=0)


def test_a_machine_whose_emulator_exited_is_lost_at_once() -> None:
    from harness.fixtures import hosts
    from harness.remote import RemoteError

    gone = _host([RemoteError("cannot connect")], ended="exit status 1")
    assert not hosts.healthy(gone, patience=600) and gone.remote.tries == 1
