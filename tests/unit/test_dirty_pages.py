"""The dirty-buffer check without a VM: the probe itself (compiled here) for the report and
the page layout, the agent's dirty_scan/write_page with privcmd faked at the ioctl, and the
invariant (harness/dirty_pages.py) on snapshots shaped as the agent returns them."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import struct
import subprocess
from pathlib import Path

import pytest

from harness.agent import nxagent
from harness.agent.client import Agent, DirtyScan, PageStamp
from harness.agent.nxagent.dirty import page_bytes, parse_cursor, parse_page
from harness.dirty_pages import DirtyFrames, check_dirty, position, stale_target
from harness.metrics import Record, excise_pause
from harness.probe_report import (
    ProbePage,
    expand_runs,
    expected_page_bytes,
    format_probe_line,
    page_digest,
    parse_probe_log,
)
from plugins import migration

PAGE = 4096
NONCE = "00112233445566778899aabbccddeeff"
N = 64  # buffer pages in the synthetic snapshots


# ------------------------------------------------------------------ the probe




def run_probe(probe: Path, *args: str) -> tuple[str, bytes]:
    """The probe's report text and, with --dump, the raw cursor page + buffer after it."""
    out = subprocess.run([str(probe), "--once", *args], capture_output=True, timeout=60, check=True).stdout
    text, _, dump = out.partition(b"NXDUMP ")
    raw = b""
    if dump:
        size, _, raw = dump.partition(b"\n")
        assert len(raw) == int(size)
    return text.decode(), raw


def test_probe_reports_its_dirty_buffer_as_runs(probe_bin: Path) -> None:
    text, _ = run_probe(probe_bin, "nxprobe.pages=2", "nxprobe.dirty_mb=1", "nxprobe.dirty_pct=20")
    state = parse_probe_log(text)
    assert state.error is None and state.rejected == 0, text
    report = state.report
    assert report is not None and report.dirty is not None, text
    assert (report.dirty.pages, report.dirty.pct, len(report.dirty.pfns)) == (256, 20, 256)
    assert '"v":2' in text and text.count('"ev":"druns"') <= 256 // 1
    if os.geteuid() == 0:  # pagemap hides pfns (reads 0) from a process without CAP_SYS_ADMIN
        assert all(p > 0 for p in report.dirty.pfns) and report.dirty.cursor_pfn > 0
        assert len(set(report.dirty.pfns)) == 256 and report.dirty.cursor_pfn not in report.dirty.pfns
    frames = DirtyFrames.from_report(report)
    assert frames is not None and frames.nonce == report.nonce and frames.gfns == list(report.dirty.pfns)


def test_probe_without_dirty_buffer_reports_version_1_as_before(probe_bin: Path) -> None:
    text, _ = run_probe(probe_bin, "nxprobe.pages=2")
    assert '"v":1,' in text and '"ev":"dirty"' not in text and '"ev":"druns"' not in text
    state = parse_probe_log(text)
    assert state.report is not None and state.report.dirty is None
    assert DirtyFrames.from_report(state.report) is None


@pytest.mark.parametrize("writes", [0, 1, 100, 255, 256, 300, 3 * 256])
def test_probe_pages_match_the_model_and_the_invariant(probe_bin: Path, writes: int) -> None:
    text, raw = run_probe(probe_bin, "nxprobe.pages=1", "nxprobe.dirty_mb=1", "nxprobe.dirty_pct=5",
                          f"--dump={writes}")
    nonce = parse_probe_log(text).nonce
    cursor = dict(parse_cursor(raw[:PAGE]), error=0)
    g, c = position(writes, 256)
    assert (cursor["generation"], cursor["cursor"], cursor["writes"], cursor["pages"]) == (g, c, writes, 256)
    buffer = [raw[PAGE * (i + 1):PAGE * (i + 2)] for i in range(256)]
    for i, page in enumerate(buffer):  # byte for byte what the harness's model says
        assert page == page_bytes(bytes.fromhex(nonce), g if i < c else g - 1, i), i
    verdict = check_dirty(nonce, cursor, [stamp_of(p) for p in buffer], list(range(256)))
    assert verdict.ok and verdict.verified == 256 and verdict.generation == g, verdict.message(None)


# ------------------------------------------------------------------ the invariant


def stamp_of(data: bytes, frame: int = 0) -> PageStamp:
    """A page as the agent reports it (dirty.parse_page on the bytes)."""
    magic_ok, nonce, generation, index, body_ok = parse_page(data)
    return PageStamp(frame, 0, magic_ok, nonce.hex(), generation, index, body_ok)


def snapshot(writes: int, nonce: str = NONCE, pages: int = N) -> tuple[dict, list[bytes]]:
    g, c = position(writes, pages)
    cursor = {"error": 0, "magic_ok": True, "nonce": nonce, "generation": g, "cursor": c, "writes": writes,
              "pages": pages}
    return cursor, [page_bytes(bytes.fromhex(nonce), g if i < c else g - 1, i) for i in range(pages)]


def judge(cursor: dict, buffer: list[bytes], nonce: str = NONCE):
    gfns = [0x1000 + i for i in range(len(buffer))]
    return check_dirty(nonce, cursor, [stamp_of(b, f) for b, f in zip(buffer, gfns, strict=True)], gfns)


def test_clean_snapshot_passes() -> None:
    verdict = judge(*snapshot(5 * N + 17))
    assert verdict.ok and (verdict.generation, verdict.cursor, verdict.verified) == (6, 17, N)


def test_one_stale_page_is_named_with_gfn_and_generations() -> None:
    cursor, buffer = snapshot(2 * N + 40)  # g = 3, cursor 40
    buffer[10] = page_bytes(bytes.fromhex(NONCE), 2, 10)  # not re-sent: still the previous generation
    verdict = judge(cursor, buffer)
    assert [(m.index, m.gfn, m.expected) for m in verdict.misses] == [(10, 0x100A, 3)]
    text = verdict.message(6)
    assert "1 of 64 dirty pages did not arrive" in text and "iterations: 6" in text
    assert "page    10 gfn 0x100a: generation 2, expected generation 3" in text


def torn_page(nonce: bytes, index: int) -> bytes:
    """Generation 1's header over a body half rewritten to generation 2 (the probe paused mid-write)."""
    old, new = page_bytes(nonce, 1, index), page_bytes(nonce, 2, index)
    return old[:40] + new[40:2048] + old[2048:]


def test_page_at_the_cursor_may_be_mid_write_but_not_elsewhere() -> None:
    cursor, buffer = snapshot(N + 20)  # g = 2, cursor 20
    nonce = bytes.fromhex(NONCE)
    torn = torn_page(nonce, 20)
    for at_cursor in (page_bytes(nonce, 1, 20), page_bytes(nonce, 2, 20), torn):
        assert judge(cursor, [*buffer[:20], at_cursor, *buffer[21:]]).ok
    elsewhere = torn_page(nonce, 30)
    verdict = judge(cursor, [*buffer[:30], elsewhere, *buffer[31:]])
    assert [m.index for m in verdict.misses] == [30] and "torn" in verdict.misses[0].found
    # at the cursor, a generation-g header over a body that is not all g is no mid-write state
    bad = page_bytes(nonce, 2, 20)[:40] + page_bytes(nonce, 1, 20)[40:]
    assert [m.index for m in judge(cursor, [*buffer[:20], bad, *buffer[21:]]).misses] == [20]


def test_wrong_nonce_is_caught_on_pages_and_cursor() -> None:
    cursor, buffer = snapshot(N + 5)
    other = "ff" * 16
    buffer[40] = page_bytes(bytes.fromhex(other), 1, 40)  # another probe's page, whole
    verdict = judge(cursor, buffer)
    assert [m.index for m in verdict.misses] == [40] and f"nonce {other}" in verdict.misses[0].found
    cursor, buffer = snapshot(N + 5, nonce=other)
    verdict = judge(cursor, buffer)
    assert not verdict.ok and verdict.verified == 0 and "nonce" in verdict.problems[0]


@pytest.mark.parametrize("writes", [N - 1, N, N + 1, 7 * N])
def test_generation_wrap_at_the_end_of_the_buffer(writes: int) -> None:
    cursor, buffer = snapshot(writes)
    verdict = judge(cursor, buffer)
    assert verdict.ok, verdict.message(None)
    assert (verdict.generation, verdict.cursor) == (1 + writes // N, writes % N)
    if writes % N == 0:  # just wrapped: every page holds g - 1; page N-1 holding g - 2 is stale
        buffer[N - 1] = page_bytes(bytes.fromhex(NONCE), verdict.generation - 2, N - 1)
        assert [m.index for m in judge(cursor, buffer).misses] == [N - 1]


def test_cursor_page_one_write_ahead_of_its_writes_count() -> None:
    cursor, buffer = snapshot(N - 1)  # paused between storing generation/cursor and writes
    buffer[N - 1] = page_bytes(bytes.fromhex(NONCE), 1, N - 1)
    cursor.update(generation=2, cursor=0)
    assert judge(cursor, buffer).ok
    cursor.update(generation=5)
    assert "cursor page says generation 5" in judge(cursor, buffer).problems[0]


def test_unmapped_and_foreign_pages_and_a_missing_cursor() -> None:
    cursor, buffer = snapshot(N + 3)
    pages = [stamp_of(b, i) for i, b in enumerate(buffer)]
    pages[50] = PageStamp(50, -errno.EINVAL)
    pages[51] = stamp_of(bytes(PAGE), 51)
    verdict = check_dirty(NONCE, cursor, pages, list(range(N)))
    assert [(m.index, m.found) for m in verdict.misses] == [(50, "not mapped (error -22)"),
                                                           (51, "no NXDIRTY1 magic")]
    assert check_dirty(NONCE, None, pages, list(range(N))).problems
    assert check_dirty(NONCE, dict(cursor, error=-1), pages, list(range(N))).verified == 0


def test_failure_lists_twenty_pages_and_counts_the_rest() -> None:
    cursor, buffer = snapshot(3 * N + 60)  # g = 4: pages 0..59 must hold 4
    nonce = bytes.fromhex(NONCE)
    for i in range(30):
        buffer[i] = page_bytes(nonce, 3, i)
    text = judge(cursor, buffer).message(5)
    assert "30 of 64 dirty pages did not arrive" in text and "... and 10 more" in text
    assert text.count("\npage ") == 20


def test_stale_target_picks_a_page_away_from_the_cursor() -> None:
    for writes in (N + 40, 2 * N + 1, 2 * N):
        cursor, buffer = snapshot(writes)
        verdict = judge(cursor, buffer)
        index, holds, older = stale_target(verdict)
        assert index != verdict.cursor and older == holds - 1
        buffer[index] = page_bytes(bytes.fromhex(NONCE), older, index)
        assert [m.index for m in judge(cursor, buffer).misses] == [index]
    with pytest.raises(AssertionError, match="wrote too little"):
        stale_target(judge(*snapshot(1)))


def test_apply_dirty_and_the_assertion_name_the_iterations() -> None:
    cursor, buffer = snapshot(N + 10)
    buffer[3] = page_bytes(bytes.fromhex(NONCE), 1, 3)
    rec = Record(kind="localhost_migrate", iterations=6, ok=True, memory_intact=True, downtime_s=0.5)
    migration.apply_dirty(rec, judge(cursor, buffer))
    assert (rec.dirty_pages_verified, rec.dirty_generation) == (N, 2)
    with pytest.raises(AssertionError, match=r"(?s)iterations: 6.*page     3 gfn 0x1003"):
        migration._assert_good(rec, "", type("Mig", (), {"max_total_s": None, "max_downtime_s": None})())


def test_excise_pause_takes_the_harness_pause_out_of_the_downtime() -> None:
    s = 10**9
    ticks = [(1 * s, 0), (2 * s, 1), (30 * s, 2), (31 * s, 3)]  # suspended at 2 s, xl done at 3 s
    moved = excise_pause(ticks, 3 * s, 29 * s)  # the harness unpaused at 29 s
    assert moved == [(1 * s, 0), (2 * s, 1), (4 * s, 2), (5 * s, 3)]
    assert excise_pause(ticks, 5 * s, 4 * s) == ticks  # no pause: nothing moves


def test_druns_lines_must_cover_the_buffer() -> None:
    assert expand_runs([(10, 3), (20, -2), (5, 1)]) == [10, 11, 12, 20, 19, 5]
    hello = {"ev": "hello", "v": 2, "nonce": NONCE, "pages": 1, "page_size": 4096, "tick_ms": 0,
             "dirty_mb": 1, "dirty_pct": 5}
    sha = hashlib.sha256(expected_page_bytes(NONCE, 0)).hexdigest()
    lines = [format_probe_line(hello), format_probe_line({"ev": "page", "i": 0, "pfn": 7, "sha256": sha}),
             format_probe_line({"ev": "dirty", "pages": 5, "pct": 5, "cursor_pfn": 99}),
             format_probe_line({"ev": "druns", "line": 0, "first": 0, "runs": [[10, 3]]}),
             format_probe_line({"ev": "druns", "line": 1, "first": 3, "runs": [[40, -2]]}),
             format_probe_line({"ev": "ready", "pages": 1, "digest": page_digest([ProbePage(0, 7, sha)])})]
    report = parse_probe_log("\n".join(lines)).report
    assert report is not None and report.dirty is not None
    assert report.dirty.pfns == (10, 11, 12, 40, 39) and report.dirty.cursor_pfn == 99
    state = parse_probe_log("\n".join(lines[:4] + lines[5:]))  # line 1 lost
    assert state.report is None and "cover 3 pages, the buffer has 5" in state.error


# ------------------------------------------------------------------ the agent, privcmd faked


class FakeDomain:
    """privcmd at the ioctl boundary: MMAPBATCH_V2 puts each frame's bytes (a dict) into the VMA."""

    def __init__(self, frames: dict[int, bytes], errors: dict[int, int] | None = None) -> None:
        self.frames, self.errors = frames, errors or {}

    def install(self, monkeypatch) -> FakeDomain:
        priv = nxagent.privcmd
        monkeypatch.setattr(priv, "open_privcmd", lambda: os.open(os.devnull, os.O_RDWR))
        monkeypatch.setattr(priv, "map_vma", lambda fd, npages, prot: priv.mmap_raw(
            npages * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1))
        monkeypatch.setattr(priv, "privcmd_ioctl", self.ioctl)
        return self

    def ioctl(self, fd, request, arg):
        assert request == nxagent.abi.IOCTL["MMAPBATCH_V2"]
        frames = list((ctypes.c_uint64 * arg.num).from_address(arg.arr))
        errs = (ctypes.c_int * arg.num).from_address(arg.err)
        for i, frame in enumerate(frames):
            errs[i] = self.errors.get(frame, 0)
            if not errs[i]:
                ctypes.memmove(arg.addr + i * PAGE, self.frames[frame], PAGE)
        return 0, 0


def agent_runner(monkeypatch):
    """An Agent whose `run` executes the request in this process (fork isolation included)."""

    def run(cmd, stdin, timeout):
        answer = nxagent.commands.run_command(cmd.split()[-1], json.loads(stdin))
        return 0, json.dumps(answer), ""

    return Agent(run)


def test_dirty_scan_against_a_fake_privcmd(monkeypatch) -> None:
    cursor, buffer = snapshot(N + 20)
    gfns = [0x5000 + 3 * i for i in range(N)]
    frames = dict(zip(gfns, buffer, strict=True))
    frames[0x9999] = cursor_bytes(cursor)
    frames[gfns[7]] = page_bytes(bytes.fromhex(NONCE), 1, 7)  # stale
    frames[gfns[47]] = page_bytes(bytes.fromhex(NONCE), 0, 47)  # stale, in the third batch
    FakeDomain(frames, {gfns[9]: -errno.EFAULT}).install(monkeypatch)
    monkeypatch.setattr(nxagent.dirty, "SCAN_BATCH", 16)  # 4 batches (the ioctls run in the child)
    scan = agent_runner(monkeypatch).dirty_scan(4, gfns, 0x9999)
    assert not scan.crashed and not scan.timed_out
    assert len(scan.raw["runs"]) <= 8  # compact: runs, not one entry per frame
    assert scan.cursor["generation"] == 2 and scan.cursor["writes"] == N + 20 and scan.cursor["error"] == 0
    assert [p.frame for p in scan.pages] == gfns
    verdict = check_dirty(NONCE, scan.cursor, scan.pages, gfns)
    assert [(m.index, m.gfn) for m in verdict.misses] == [(7, gfns[7]), (9, gfns[9]), (47, gfns[47])]


def test_dirty_scan_expands_runs_and_never_reads_an_uncovered_frame_as_fine() -> None:
    answer = {"ok": True, "nonces": [NONCE], "cursor": None,
              "runs": [[0, 3, 0, True, 0, 5, 10, True], [4, 1, -14, None, None, None, None, None]]}
    scan = DirtyScan.from_json(answer, [100, 101, 102, 103, 104])
    assert [p.index for p in scan.pages[:3]] == [10, 11, 12] and scan.pages[2].generation == 5
    assert scan.pages[3] == PageStamp(103, None) and scan.pages[4].error == -14


def test_write_page_through_a_fake_privcmd(monkeypatch) -> None:
    old = page_bytes(bytes.fromhex(NONCE), 3, 5)
    FakeDomain({0x77: old}).install(monkeypatch)
    new = page_bytes(bytes.fromhex(NONCE), 2, 5)
    answer = agent_runner(monkeypatch).write_page(4, 0x77, new)
    assert answer["written"] is True and answer["old"] == old and answer["frame_error"] == 0


def test_write_page_rejects_a_short_page() -> None:
    with pytest.raises(nxagent.errors.RequestError, match="exactly 4096 bytes"):
        nxagent.commands.run_command("write_page", {"domid": 1, "frame": 2, "bytes_b64": "AAAA"})


def cursor_bytes(cursor: dict) -> bytes:
    head = struct.pack("<8s16sQQQQ", b"NXCURSR1", bytes.fromhex(cursor["nonce"]), cursor["generation"],
                       cursor["cursor"], cursor["writes"], cursor["pages"])
    return head + bytes(PAGE - len(head))


def test_the_stage_line_says_how_many_dirty_pages_were_verified() -> None:
    from harness.metrics import describe

    rec = Record(kind="localhost_migrate", guest_type="pvh", memory_mb=256, iterations=6,
                 dirty_pages_verified=16384, dirty_generation=3)
    assert describe(rec).endswith("6 iterations, 16384 dirty pages verified (generation 3)")
