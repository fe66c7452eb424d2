"""The migration-stream reader: iterations and pages counted from a synthetic
libxc stream fed in arbitrary pieces, as the relay sees it."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys

import pytest

from harness.agent import nxstream
from harness.agent.nxstream import StreamStats

PAGE = 4096
XTAB = 0xF


def record(rtype: int, body: bytes) -> bytes:
    pad = (-len(body)) % 8
    return struct.pack("<II", rtype, len(body)) + body + b"\0" * pad


def page_data(pfns: list[int], kind: int = 0) -> bytes:
    body = struct.pack("<II", len(pfns), 0) + b"".join(struct.pack("<Q", p | (kind << 60)) for p in pfns)
    if kind not in nxstream.NO_DATA_TYPES:
        body += b"\xab" * (PAGE * len(pfns))
    return record(1, body)


def stream(iterations: list[list[int]], tail: bytes = b"") -> bytes:
    header = nxstream.MARKER + struct.pack(">IH", 3, 0) + b"\0" * 6
    domain = struct.pack("<IHHII", 3, 12, 0, 4, 17)
    out = b"xl preamble: config\n" + header + domain + record(8, b"\0" * 24)  # TSC_INFO
    for pfns in iterations:
        for i in range(0, len(pfns), 1024):  # libxc's MAX_BATCH_SIZE
            out += page_data(pfns[i:i + 1024])
    return out + tail + record(0, b"") + b"libxl records after the libxc part"


def feed_in_pieces(data: bytes, seed: int) -> dict:
    rng = random.Random(seed)
    stats, at = StreamStats(), 0
    while at < len(data):
        n = rng.choice([1, 7, 8, 13, 4096, 70000])
        stats.feed(data[at:at + n])
        at += n
    return stats.as_dict()


@pytest.mark.parametrize("seed", range(4))
def test_iterations_and_pages_whatever_the_chunking(seed: int) -> None:
    data = stream([list(range(3000)), [5, 17, 2999], [4]], tail=page_data([9], kind=XTAB))
    got = feed_in_pieces(data, seed)
    assert got["complete"] and got["format_version"] == 3 and got["domain_type"] == 3
    # The XTAB pfn 9 (no contents) comes after pfn 4 in the last iteration.
    assert got["pages_per_iteration"] == [3000, 3, 1]
    assert got["iterations"] == 3
    assert got["stream_bytes"] == len(data)


def test_negative_control_a_stream_without_header_counts_nothing() -> None:
    got = feed_in_pieces(b"\0" * 100000, 1)
    assert got["pages_per_iteration"] == [] and not got["complete"]


def test_file_and_relay_modes(tmp_path) -> None:
    data = stream([list(range(10)), [1, 2]])
    image = tmp_path / "saved.chkpt"
    image.write_bytes(data)
    assert nxstream.parse_file(str(image))["pages_per_iteration"] == [10, 2]
    out, copy = tmp_path / "stats.json", tmp_path / "copy"
    proc = subprocess.run([sys.executable, nxstream.__file__, "relay", str(out), "--",
                           "sh", "-c", f"cat > {copy}"], input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert copy.read_bytes() == data, "the relay must pass the stream through unchanged"
    assert json.loads(out.read_text())["pages_per_iteration"] == [10, 2]


def test_need_and_passed_see_only_headers_and_pfns() -> None:
    """The relay reads what need() asks for and lets the rest go by unseen (splice):
    the counts equal those of a full read, and page contents are never looked at."""
    data = stream([list(range(3000)), [5, 17, 2999], [4]], tail=page_data([9], kind=XTAB))
    stats, at, seen = StreamStats(), 0, 0
    while at < len(data):
        want = stats.need()
        if want == 0:
            n = min(stats.skip, 65536) if stats.skip else 65536
            stats.passed(len(data[at:at + n]))
            at += n
            continue
        chunk = data[at:at + want]
        stats.feed(chunk)
        seen += len(chunk)
        at += len(chunk)
    got = stats.as_dict()
    assert got["pages_per_iteration"] == [3000, 3, 1] and got["complete"]
    assert got["stream_bytes"] == len(data)
    assert seen < len(data) // 50, f"read {seen} of {len(data)} bytes: page contents were read"


def test_relay_of_a_large_stream_is_byte_exact(tmp_path) -> None:
    data = stream([list(range(5000)), list(range(0, 5000, 7))])
    out, copy = tmp_path / "stats.json", tmp_path / "copy"
    proc = subprocess.run([sys.executable, nxstream.__file__, "relay", str(out), "--",
                           "sh", "-c", f"cat > {copy}"], input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert copy.read_bytes() == data
    assert json.loads(out.read_text())["pages_per_iteration"] == [5000, 715]


def test_tcp_transport_serve_and_connect(tmp_path) -> None:
    """serve runs its command on the accepted connection (stderr timestamped into the
    log); connect carries stdin there, counted, and the command's answers back."""
    import socket as socketlib
    import time

    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = tmp_path / "receiver.py"
    receiver.write_text(
        "import sys\n"
        "data = sys.stdin.buffer.read()\n"
        "print('receiver: got', len(data), 'bytes', file=sys.stderr)\n"
        "sys.stdout.write(f'ack {len(data)}\\n')\n")
    log, out = tmp_path / "receiver.log", tmp_path / "stats.json"
    serve = subprocess.Popen([sys.executable, nxstream.__file__, "serve", "127.0.0.1", str(port), str(log),
                              "--", sys.executable, str(receiver)])
    data = stream([list(range(2000)), [3, 4]])
    started = time.time()
    sent = subprocess.run([sys.executable, nxstream.__file__, "connect", str(out), "127.0.0.1", str(port)],
                          input=data, capture_output=True, timeout=60)
    assert serve.wait(timeout=30) == 0
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == f"ack {len(data)}\n".encode()
    stamp, _, line = log.read_text().partition(" ")
    assert line == f"receiver: got {len(data)} bytes\n" and abs(float(stamp) - started) < 30
    assert json.loads(out.read_text())["pages_per_iteration"] == [2000, 2]


def test_connect_gives_up_when_nobody_listens(tmp_path) -> None:
    import socket as socketlib

    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert nxstream.connect(str(tmp_path / "o.json"), "127.0.0.1", port, timeout=0.5) == 1
