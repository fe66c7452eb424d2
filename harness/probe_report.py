"""Parse the console output of the L2 guest memory probe (images/guests/probe.c).

The probe writes one record per line, ``NXPROBE <json> *<crc32>``, where the
CRC-32/IEEE (as ``zlib.crc32``) covers the JSON text exactly and is printed as
8 lowercase hex digits. Events, in order::

    {"ev":"hello","v":1,"nonce":"<32hex>","pages":N,"page_size":4096,"tick_ms":T,
     "dirty_mb":M,"dirty_pct":P}
    {"ev":"page","i":<index>,"pfn":<decimal>,"sha256":"<64hex>"}      (N times)
    {"ev":"dirty","pages":D,"pct":P,"cursor_pfn":<decimal>}       (version 2 only)
    {"ev":"druns","line":L,"first":F,"runs":[[pfn,len],...]}     (version 2, L = 0, 1, ...)
    {"ev":"ready","pages":N,"digest":"<sha256 of the page sha256 hex strings>"}
    {"ev":"error","msg":"..."}                                   (fatal, instead)

Version 2 is a probe with a dirty buffer (``nxprobe.dirty_mb`` and ``dirty_pct``
both set): after the pages it reports the buffer of D pages it keeps rewriting
and the pfn of its cursor page, then the buffer's pfns as runs, at most 32 a
line: ``[pfn, len]`` is pfn, pfn+1, ... (len > 0) or pfn, pfn-1, ... (len < 0);
line L covers buffer pages F .. F+sum(|len|)-1. Version 1 (no dirty buffer) is
the same report without those lines, byte for byte as before version 2.
The dirty pages' layout: harness/agent/nxagent/dirty.py.

followed, if ticking, by plain ``NXTICK <seq> <mono_ns> <real_ns>`` lines.
``/init`` prints ``NXPROBE-INIT up`` before starting the probe.

A console interleaves these lines with kernel messages. A record whose CRC
does not match is rejected -- except that a record cut by a kernel message
that ended in a newline (``<record head><printk>\\n<record tail>``) is
stitched back together when head plus tail match the CRC.

Each page is filled by the probe as :func:`expected_page_bytes` computes, so
the harness can check the hashes, and later the frames it maps, on its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

PAGE_SIZE = 4096
MARKER_SIZE = 64
PROTOCOL_VERSION = 2  # the probe's newest: with a dirty buffer
PLAIN_PROTOCOL_VERSION = 1  # without one (the report as it was before version 2)
RECORD_TAG = "NXPROBE {"
INIT_MARKER = "NXPROBE-INIT up"

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CRC_TAIL = re.compile(r"\} \*([0-9a-f]{8})")
_TICK = re.compile(r"NXTICK (\d+) (\d+) (\d+)\s*$")
_LINE_SPLIT = re.compile(r"[\r\n]+")
# How many following lines may hold the tail of a record cut by kernel output.
_STITCH_LOOKAHEAD = 4
# probe.c caps the JSON at 1023 characters; bounds the stitching work.
_MAX_RECORD = 1100


@dataclass(frozen=True)
class ProbePage:
    index: int
    pfn: int
    sha256: str


@dataclass(frozen=True)
class DirtyBuffer:
    """The probe's dirty buffer: its size, rate, cursor page's pfn and every page's pfn."""

    pages: int
    pct: int
    cursor_pfn: int
    pfns: tuple[int, ...]


@dataclass(frozen=True)
class ProbeReport:
    """One complete, verified probe cycle (hello, every page, [dirty frames,] ready)."""

    nonce: str
    page_size: int
    pages: list[ProbePage]
    digest: str
    tick_ms: int
    dirty: DirtyBuffer | None = None

    @property
    def pfns(self) -> list[int]:
        return [page.pfn for page in self.pages]


@dataclass(frozen=True)
class Tick:
    seq: int
    mono_ns: int
    real_ns: int


@dataclass
class ProbeState:
    """What a console log says about the probe.

    ``report`` is the last complete cycle; ``nonce`` is the nonce of the latest
    hello, so ``report_is_current`` tells whether a newer boot is still
    reporting. ``error`` is sticky: the latest probe error or verification
    failure anywhere in the log (all of them are in ``errors``). ``ticks``
    holds the NXTICK lines since the latest hello.
    """

    hello: bool = False
    hello_count: int = 0
    nonce: str | None = None
    init_seen: bool = False
    report: ProbeReport | None = None
    error: str | None = None
    errors: list[str] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    rejected: int = 0
    repaired: int = 0

    @property
    def report_is_current(self) -> bool:
        return self.report is not None and self.report.nonce == self.nonce

    def fail(self, message: str) -> None:
        self.error = message
        self.errors.append(message)


@dataclass
class _Cycle:
    """The probe run started by the latest hello."""

    nonce: str
    pages: int
    page_size: int
    tick_ms: int
    version: int = PLAIN_PROTOCOL_VERSION
    seen: dict[int, ProbePage] = field(default_factory=dict)
    dirty: dict[str, int] | None = None  # the "dirty" record's numbers
    druns: dict[int, tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)  # line -> first, runs


# ------------------------------------------------------------------ records


def crc32_hex(text: str) -> str:
    """CRC-32/IEEE of text's UTF-8 as 8 hex digits (unencodable characters never match)."""
    return f"{zlib.crc32(text.encode('utf-8', 'replace')) & 0xFFFFFFFF:08x}"


def format_probe_line(payload: dict[str, Any]) -> str:
    """Format a record the way probe.c does (for fakes and tests)."""
    text = json.dumps(payload, separators=(",", ":"))
    return f"NXPROBE {text} *{crc32_hex(text)}"


def _decode(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("ev"), str):
        return obj
    return None


def _checked_record(fragment: str) -> dict[str, Any] | None:
    """The record at the start of fragment (which starts at '{'), if a CRC matches."""
    for match in _CRC_TAIL.finditer(fragment):
        text = fragment[: match.start() + 1]
        if crc32_hex(text) == match.group(1):
            return _decode(text)
    return None


def _stitched_record(head: str, tail: str) -> dict[str, Any] | None:
    """Try head[:cut] + tail for every cut: the kernel text sat at head[cut:]."""
    tail = tail[:_MAX_RECORD]
    if not _CRC_TAIL.search(tail):
        return None
    for cut in range(min(len(head), _MAX_RECORD), 0, -1):
        record = _checked_record(head[:cut] + tail)
        if record is not None:
            return record
    return None


def _records_in_line(line: str) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(fragment, record or None) for each ``NXPROBE {`` in the line."""
    start = line.find(RECORD_TAG)
    while start >= 0:
        fragment = line[start + len(RECORD_TAG) - 1 :]
        yield fragment, _checked_record(fragment)
        start = line.find(RECORD_TAG, start + 1)


# ------------------------------------------------------------------ fields


def _int(obj: dict[str, Any], key: str, minimum: int = 0) -> int | None:
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    return None


def _hex(obj: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str | None:
    value = obj.get(key)
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    return None


def page_digest(pages: list[ProbePage]) -> str:
    """The probe's "ready" digest: sha256 over the page hashes' hex, in order."""
    return hashlib.sha256("".join(page.sha256 for page in pages).encode()).hexdigest()


# ------------------------------------------------------------------ parser


class _Parser:
    def __init__(self) -> None:
        self.state = ProbeState()
        self.cycle: _Cycle | None = None

    def feed(self, lines: list[str]) -> ProbeState:
        consumed: set[int] = set()
        for number, line in enumerate(lines):
            if number in consumed:
                continue
            if INIT_MARKER in line:
                self.state.init_seen = True
            self._records(lines, number, consumed)
            self._tick(line)
        return self.state

    def _records(self, lines: list[str], number: int, consumed: set[int]) -> None:
        for fragment, record in _records_in_line(lines[number]):
            if record is None:
                record = self._stitch(fragment, lines, number, consumed)
            if record is None or not self._event(record):
                self.state.rejected += 1

    def _stitch(
        self, head: str, lines: list[str], number: int, consumed: set[int]
    ) -> dict[str, Any] | None:
        for ahead in range(number + 1, min(number + 1 + _STITCH_LOOKAHEAD, len(lines))):
            if RECORD_TAG in lines[ahead]:
                return None
            record = _stitched_record(head, lines[ahead])
            if record is not None:
                consumed.add(ahead)
                self.state.repaired += 1
                return record
        return None

    def _event(self, record: dict[str, Any]) -> bool:
        """Apply one CRC-checked record; False if its fields are malformed."""
        handler = {
            "hello": self._hello,
            "page": self._page,
            "ready": self._ready,
            "error": self._error,
            "dirty": self._dirty,
            "druns": self._druns,
        }.get(record["ev"])
        return handler(record) if handler else False

    def _hello(self, record: dict[str, Any]) -> bool:
        nonce = _hex(record, "nonce", _HEX32)
        pages = _int(record, "pages", 1)
        page_size = _int(record, "page_size", 1)
        tick_ms = _int(record, "tick_ms")
        version = _int(record, "v")
        if nonce is None or pages is None or page_size is None or tick_ms is None:
            return False
        if version not in (PLAIN_PROTOCOL_VERSION, PROTOCOL_VERSION):
            self.state.fail(f"probe protocol version {version}, expected {PROTOCOL_VERSION} "
                            f"(or {PLAIN_PROTOCOL_VERSION} without a dirty buffer)")
        self.cycle = _Cycle(nonce, pages, page_size, tick_ms, version or PLAIN_PROTOCOL_VERSION)
        self.state.hello = True
        self.state.hello_count += 1
        self.state.nonce = nonce
        self.state.ticks = []
        return True

    def _page(self, record: dict[str, Any]) -> bool:
        index = _int(record, "i")
        pfn = _int(record, "pfn")
        sha = _hex(record, "sha256", _HEX64)
        if index is None or pfn is None or sha is None:
            return False
        if self.cycle is None:
            return True  # the log starts mid-cycle: nothing to attach it to
        if index >= self.cycle.pages:
            return False
        self.cycle.seen[index] = ProbePage(index, pfn, sha)
        return True

    def _ready(self, record: dict[str, Any]) -> bool:
        pages = _int(record, "pages", 1)
        digest = _hex(record, "digest", _HEX64)
        if pages is None or digest is None:
            return False
        cycle = self.cycle
        if cycle is None:
            return True
        if pages != cycle.pages:
            self.state.fail(f"probe ready with {pages} pages, hello said {cycle.pages}")
            return True
        missing = [i for i in range(pages) if i not in cycle.seen]
        if missing:
            self.state.fail(f"probe ready but page lines missing or garbled: {missing[:16]}")
            return True
        ordered = [cycle.seen[i] for i in range(pages)]
        if page_digest(ordered) != digest:
            self.state.fail(f"probe digest mismatch for nonce {cycle.nonce}")
            return True
        dirty = None
        if cycle.version == PROTOCOL_VERSION or cycle.dirty is not None:
            dirty, problem = _dirty_buffer(cycle)
            if problem:
                self.state.fail(f"probe ready but its dirty buffer report is not whole: {problem}")
                return True
        self.state.report = ProbeReport(
            cycle.nonce, cycle.page_size, ordered, digest, cycle.tick_ms, dirty
        )
        return True

    def _dirty(self, record: dict[str, Any]) -> bool:
        numbers = {key: _int(record, key, 1 if key != "cursor_pfn" else 0)
                   for key in ("pages", "pct", "cursor_pfn")}
        if None in numbers.values():
            return False
        if self.cycle is not None:
            self.cycle.dirty = numbers  # type: ignore[assignment]
        return True

    def _druns(self, record: dict[str, Any]) -> bool:
        line, first, runs = _int(record, "line"), _int(record, "first"), _runs(record.get("runs"))
        if line is None or first is None or runs is None:
            return False
        if self.cycle is not None:
            self.cycle.druns[line] = (first, runs)
        return True

    def _error(self, record: dict[str, Any]) -> bool:
        message = record.get("msg")
        if not isinstance(message, str):
            return False
        self.state.fail(f"probe error: {message}")
        return True

    def _tick(self, line: str) -> None:
        start = line.find("NXTICK ")
        if start < 0:
            return
        match = _TICK.match(line, start)
        if match:
            seq, mono, real = (int(group) for group in match.groups())
            self.state.ticks.append(Tick(seq, mono, real))


def _runs(value: Any) -> list[tuple[int, int]] | None:
    """A "druns" record's runs, if every one is [pfn >= 0, len != 0] (pfns stay >= 0)."""
    if not isinstance(value, list) or not value:
        return None
    runs = []
    for run in value:
        if not (isinstance(run, list) and len(run) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in run)):
            return None
        pfn, length = run
        if pfn < 0 or length == 0 or pfn + length + 1 < 0:
            return None
        runs.append((pfn, length))
    return runs


def expand_runs(runs: list[tuple[int, int]]) -> list[int]:
    """The pfns of ``[pfn, len]`` runs (len < 0: descending)."""
    out: list[int] = []
    for pfn, length in runs:
        step = 1 if length > 0 else -1
        out.extend(range(pfn, pfn + length, step))
    return out


def _dirty_buffer(cycle: _Cycle) -> tuple[DirtyBuffer | None, str]:
    """The dirty buffer a version-2 cycle reported, or why it is not whole."""
    if cycle.version != PROTOCOL_VERSION:
        return None, f"dirty lines from a version {cycle.version} probe"
    if cycle.dirty is None:
        return None, "no \"dirty\" line"
    pfns: list[int] = []
    for line in range(len(cycle.druns)):
        if line not in cycle.druns:
            return None, f"run line {line} missing or garbled (have {sorted(cycle.druns)[:16]})"
        first, runs = cycle.druns[line]
        if first != len(pfns):
            return None, f"run line {line} starts at page {first}, expected {len(pfns)}"
        pfns.extend(expand_runs(runs))
    if len(pfns) != cycle.dirty["pages"]:
        return None, (f"runs cover {len(pfns)} pages, the buffer has {cycle.dirty['pages']} "
                      "(a run line is missing or garbled)")
    return DirtyBuffer(cycle.dirty["pages"], cycle.dirty["pct"], cycle.dirty["cursor_pfn"], tuple(pfns)), ""


def parse_probe_log(text: str) -> ProbeState:
    """Scan console text for probe records; never raises on bad input."""
    return _Parser().feed(_LINE_SPLIT.split(text))


# ------------------------------------------------------------------ page content


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def page_seed(nonce: bytes, index: int) -> int:
    """splitmix64(n0 ^ splitmix64(n1 ^ index)); n0, n1 = the nonce's LE halves."""
    n0, n1 = struct.unpack("<QQ", nonce)
    seed = _splitmix64(n0 ^ _splitmix64(n1 ^ index))
    return seed or _GOLDEN


def _xorshift64star_words(seed: int, count: int) -> list[int]:
    words = []
    x = seed
    for _ in range(count):
        x ^= x >> 12
        x ^= (x << 25) & _MASK64
        x ^= x >> 27
        words.append((x * 0x2545F4914F6CDD1D) & _MASK64)
    return words


def expected_page_bytes(nonce_hex: str, index: int) -> bytes:
    """The exact 4096 bytes the probe writes to page ``index`` for this nonce."""
    nonce = bytes.fromhex(nonce_hex)
    if len(nonce) != 16:
        raise ValueError(f"nonce must be 32 hex digits, got {nonce_hex!r}")
    if index < 0:
        raise ValueError(f"page index must be >= 0, got {index}")
    marker = f"NXPROBE-PAGE nonce={nonce.hex()} idx={index}".encode()
    head = marker[: MARKER_SIZE - 1].ljust(MARKER_SIZE, b"\0")
    count = (PAGE_SIZE - MARKER_SIZE) // 8
    return head + struct.pack(f"<{count}Q", *_xorshift64star_words(page_seed(nonce, index), count))
