"""nxstream.py for cross-version migration (issue 29): serve hangs up when its command
exits though a child of it still holds the connection (xl migrate-receive's
libxl-save-helper, measured: the sender waited out the 1800 s migration timeout), connect
stops at once when the receiver hangs up, and --truncate-after feeds the receiver a
truncated stream (the negative control). Each runs the real tool as local processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

from harness.agent import nxstream

TOOL = nxstream.__file__


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(tmp_path, command: list[str]):
    """nxstream serve in a process group of its own (its command's children go with it)."""
    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, TOOL, "serve", "127.0.0.1", str(port), str(log), "--", *command],
                            start_new_session=True, stderr=subprocess.PIPE)
    try:
        yield proc, port, log
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group this test started, the orphan included
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# The receiver dies, its child keeps the connection (stdin, stdout) and the stderr pipe:
# what killing xl migrate-receive left (libxl-save-helper holding the stream).
DIES_LEAVING_A_CHILD = ["sh", "-c", "sleep 60 & sleep 0.5; echo 'receiver: dying' >&2; exit 7"]


COUNTING_RECEIVER = "import sys\ndata = sys.stdin.buffer.read()\nsys.stdout.write(f'got {len(data)}\\n')\n"


def connect_when_listening(port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_serve_hangs_up_when_its_command_dies_though_a_child_holds_the_stream(tmp_path) -> None:
    """The sender's end reads EOF at once (nxstream connect then stops the stream: the
    next test), and serve ends with its command, not with the orphan."""
    with serving(tmp_path, DIES_LEAVING_A_CHILD) as (serve, port, log):
        sender = connect_when_listening(port)
        sender.settimeout(10)
        started = time.monotonic()
        sender.sendall(b"\0" * 65536)
        try:
            answer = sender.recv(100)
        except TimeoutError:
            answer = None
        took = time.monotonic() - started
        assert answer == b"" and took < 5, f"no end of the connection within {took:.1f} s ({answer!r})"
        assert serve.wait(timeout=5) == 7
        assert "receiver: dying" in log.read_text()
        sender.close()


def connect_from_writer(out, port: int, writer_code: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``nxstream connect`` to ``port`` fed by a Python writer (``writer_code``) standing
    in for xl's stream; the writer is killed afterwards. Returns the result and its seconds."""
    writer = subprocess.Popen([sys.executable, "-c", writer_code], stdout=subprocess.PIPE)
    try:
        started = time.monotonic()
        sent = subprocess.run([sys.executable, TOOL, "connect", str(out), "127.0.0.1", str(port)],
                              stdin=writer.stdout, capture_output=True, timeout=30)
        return sent, time.monotonic() - started
    finally:
        writer.kill()
        writer.wait()


def test_connect_stops_at_once_when_the_receiver_hangs_up(tmp_path) -> None:
    """xl's stream never ends here (an endless writer): connect must end with an error
    soon after the receiver died, so xl migrate fails instead of waiting out its timeout."""
    with serving(tmp_path, DIES_LEAVING_A_CHILD) as (serve, port, _):
        endless = "import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)"
        sent, took = connect_from_writer(tmp_path / "stats.json", port, endless)
        assert sent.returncode == 1 and b"the receiver hung up after" in sent.stderr, sent.stderr
        assert took < 10, f"connect took {took:.1f} s to notice"
        assert serve.wait(timeout=10) == 7


def test_truncate_after_feeds_the_receiver_that_many_bytes(tmp_path) -> None:
    receiver = tmp_path / "receiver.py"
    receiver.write_text(COUNTING_RECEIVER)
    with serving(tmp_path, [sys.executable, str(receiver)]) as (serve, port, _):
        out = tmp_path / "stats.json"
        data = b"\xab" * 300_000
        sent = subprocess.run([sys.executable, TOOL, "connect", str(out), "127.0.0.1", str(port),
                               "--truncate-after", "4096"], input=data, capture_output=True, timeout=30)
        assert serve.wait(timeout=10) == 0
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == b"got 4096\n"
    assert b"truncated the stream after 4096 bytes" in sent.stderr
    stats = json.loads(out.read_text())
    assert stats["stream_bytes"] == 4096 and stats["truncated_after"] == 4096
    assert stats["dropped_bytes"] <= len(data) - 4096


def test_negative_control_without_truncation_the_receiver_gets_it_all(tmp_path) -> None:
    receiver = tmp_path / "receiver.py"
    receiver.write_text(COUNTING_RECEIVER)
    with serving(tmp_path, [sys.executable, str(receiver)]) as (serve, port, _):
        out = tmp_path / "stats.json"
        sent = subprocess.run([sys.executable, TOOL, "connect", str(out), "127.0.0.1", str(port)],
                              input=b"\xab" * 300_000, capture_output=True, timeout=30)
        assert serve.wait(timeout=10) == 0
    assert sent.returncode == 0 and sent.stdout == b"got 300000\n", sent.stderr
    assert "truncated_after" not in json.loads(out.read_text())


def test_connect_ends_when_the_receiver_refuses_after_the_whole_stream(tmp_path) -> None:
    """Measured 4.22 -> 4.17 PVH: the receiver read the whole stream, refused the restore and
    exited, while xl migrate held its end of the stream open waiting for an answer. connect
    must end (so xl reads EOF and resumes the guest), not wait with it: the sender waited
    more than five minutes before this. The writer here sends a stream, then holds it open."""
    receiver = tmp_path / "receiver.py"
    receiver.write_text("import sys\nsys.stdin.buffer.read(4096)\n"
                        "sys.stderr.write('refused\\n')\nsys.exit(3)\n")
    with serving(tmp_path, [sys.executable, str(receiver)]) as (serve, port, _):
        out = tmp_path / "stats.json"
        holds = "import sys,time\nsys.stdout.buffer.write(b'x' * 4096)\nsys.stdout.flush()\ntime.sleep(60)"
        sent, took = connect_from_writer(out, port, holds)
        assert serve.wait(timeout=10) == 3
    assert sent.returncode == 1 and b"while the sender still held it open" in sent.stderr, sent.stderr
    assert took < nxstream.HANG_UP_GRACE_S + 5, f"connect took {took:.1f} s to end"
    assert json.loads(out.read_text())["stream_bytes"] == 4096
