"""The virtio-serial channel: dom0's nxchannel.py and the host's Channel client.

The dom0 end is exercised as a function (one line in, one line out); the host end
against a fake dom0 on a UNIX socket that behaves like QEMU's port: it drops what
arrives before the port is "open", and may answer late."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from harness.agent import nxchannel
from harness.agent.channel import Channel, ChannelError


def answer(request: object) -> dict:
    return json.loads(nxchannel.answer_line(json.dumps(request).encode()))


def test_ping_reports_uptime_and_clock_with_the_request_id():
    got = answer({"id": 7, "op": "ping"})
    assert got["ok"] is True and got["id"] == 7
    assert got["uptime_s"] > 0 and abs(got["realtime"] - time.time()) < 5


def test_run_returns_status_and_output():
    got = answer({"id": 1, "op": "run", "argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    assert (got["ok"], got["rc"], got["stdout"], got["stderr"]) == (True, 3, "out\n", "err\n")


@pytest.mark.parametrize("request_, error", [
    ({"id": 1, "op": "run", "argv": []}, "non-empty list"),
    ({"id": 1, "op": "run", "argv": ["/nonexistent/nx"]}, "not found"),
    ({"id": 1, "op": "run", "argv": ["sleep", "5"], "timeout": 0.2}, "timed out"),
    ({"id": 1, "op": "set_clock", "epoch": "noon"}, "numeric epoch"),
    ({"id": 1, "op": "reboot"}, "unknown op"),
])
def test_bad_requests_are_answered_not_fatal(request_, error):
    got = answer(request_)
    assert got["ok"] is False and error in got["error"] and got["id"] == 1


def test_a_line_that_is_not_json_gets_an_error_answer():
    got = json.loads(nxchannel.answer_line(b"{half"))
    assert got["ok"] is False and "bad request" in got["error"]


def test_set_clock_sets_the_realtime_clock(monkeypatch):
    calls = []
    monkeypatch.setattr(nxchannel.time, "clock_settime", lambda clock, value: calls.append((clock, value)))
    got = answer({"id": 2, "op": "set_clock", "epoch": 1_800_000_000.5})
    assert got["ok"] and calls == [(nxchannel.time.CLOCK_REALTIME, 1_800_000_000.5)]


class FakeDom0:
    """A UNIX socket server that answers like nxchannel.py behind QEMU's port."""

    def __init__(self, path: Path, drop_first: int = 0, stale: bytes = b"") -> None:
        self.path, self.drop_first, self.stale = path, drop_first, stale
        self.requests: list[dict] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        if self.stale:
            conn.sendall(self.stale)  # an answer written before the snapshot, to a request nobody waits for
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                self.requests.append(request)
                if len(self.requests) <= self.drop_first:
                    continue  # the port was not open yet: QEMU drops it
                conn.sendall(nxchannel.answer_line(line))

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "chan.sock"


def test_client_resends_idempotent_requests_until_answered(sock_path, monkeypatch):
    monkeypatch.setattr("harness.agent.channel.RESEND_S", 0.05)
    dom0 = FakeDom0(sock_path, drop_first=2, stale=b'{"id": 99, "ok": true}\n')
    chan = Channel(sock_path)
    got = chan.request("ping", timeout=5)
    assert got["ok"] and got["id"] == 3 and len(dom0.requests) == 3
    chan.close()
    dom0.close()


def test_set_clock_sends_the_clock_of_each_send(sock_path, monkeypatch):
    monkeypatch.setattr("harness.agent.channel.RESEND_S", 0.05)
    monkeypatch.setattr(nxchannel.time, "clock_settime", lambda clock, value: None)
    dom0 = FakeDom0(sock_path, drop_first=1)
    ticks = iter([100.0, 200.0])
    Channel(sock_path).request("set_clock", timeout=5, epoch=lambda: next(ticks))
    assert [r["epoch"] for r in dom0.requests] == [100.0, 200.0]
    dom0.close()


def test_run_is_sent_once_and_times_out_if_dropped(sock_path):
    dom0 = FakeDom0(sock_path, drop_first=1)
    with pytest.raises(ChannelError, match="no answer to 'run'"):
        Channel(sock_path).request("run", timeout=0.5, argv=["true"])
    assert len(dom0.requests) == 1
    dom0.close()


def test_failure_in_dom0_raises_with_its_reason(sock_path):
    dom0 = FakeDom0(sock_path)
    with pytest.raises(ChannelError, match="unknown op"):
        Channel(sock_path).request("reboot", timeout=2)
    dom0.close()


def test_missing_socket_is_a_channel_error(sock_path):
    with pytest.raises(ChannelError, match="chan.sock"):
        Channel(sock_path).connect(timeout=0.1)
