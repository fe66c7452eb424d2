"""Stage lines: what a run is doing while it does it (no pytest here).

The harness's layers already say what they did, in log records: the image
builder's progress ("[image bookworm] built in 48 s"), a machine's boot stages,
each shared guest ready, snapshot save and restore, the peer L1. :func:`classify`
turns such a record into a :class:`StageEvent` (kind, level, seconds); records it
does not know stay in the captured log only. :class:`StageLog` writes the events
as text lines (``stages.log``) and as JSON lines (``stages.jsonl``, which the HTML
report's timeline reads). The pytest side (harness/progress.py) puts the same
lines on the terminal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Levels: which lines the terminal shows at which verbosity.
DONE = 0  # a stage finished (usually with its time): shown even with -q
STEP = 1  # a step inside a stage, a heartbeat: shown by default and with -v
DETAIL = 2  # a tool's own output (mmdebstrap's apt lines): shown with -vv

KINDS = ("image", "boot", "guest", "snapshot", "peer", "measure", "check", "incident", "alive")
_SECONDS = re.compile(r"\bin (\d+(?:\.\d+)?) s\b")


@dataclass(frozen=True)
class StageEvent:
    """One stage line. ``t`` is when it was said (epoch seconds); a finished stage
    carries ``seconds``, so it ran from ``t - seconds`` to ``t``."""

    subject: str
    text: str
    kind: str
    level: int = STEP
    seconds: float | None = None
    t: float = 0.0
    worker: str = ""

    @property
    def start(self) -> float:
        return self.t - (self.seconds or 0.0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> StageEvent:
        data = json.loads(line)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


# (logger prefix, regex over the message, kind, level, bar: does its "in N s" time a stage)
# The first match wins; a message with "[subject] text" keeps the subject.
RULES: tuple[tuple[str, str, str, int, bool], ...] = (
    ("", r"^\[image [^]]+\] built in ", "image", DONE, True),
    ("", r"^\[image [^]]+\] cached: ", "image", DONE, False),
    ("", r"^\[image [^]]+\] (building |--rebuild|mkfs|apt will accept|.*building again)", "image", STEP,
     False),
    ("", r"^\[image [^]]+\] [IE]: ", "image", STEP, False),
    ("", r"^\[image ", "image", DETAIL, False),
    ("", r"\] cold boot of ", "boot", STEP, False),
    ("", r"\] preparing dom0", "boot", STEP, False),
    ("", r"\] starting the shared guests", "guest", STEP, False),
    ("", r"\] cold boot: ", "boot", DONE, False),
    ("", r"\] restored L1 snapshot ", "snapshot", DONE, True),
    ("", r"\] saved L1 snapshot ", "snapshot", DONE, True),
    ("", r"\] peer ready in ", "peer", DONE, True),
    ("harness.machines", r": \S+ stage passed in ", "boot", STEP, True),
    ("harness.host", r": Xen \+ dom0 ready in ", "boot", DONE, True),
    ("harness.guests", r": shared guests .* ready in ", "guest", DONE, True),
    ("harness.guests", r"\) ready in .* after xl create", "guest", STEP, True),
    ("harness.guests", r"(died|gone or crashed)", "incident", DONE, False),
    ("harness.incidents", r"^incident: ", "incident", DONE, False),
    ("harness.provision", r"(discarding L1 snapshot|could not save an L1 snapshot)", "snapshot", STEP, False),
    ("nested_xen", r"(stopped answering|is unhealthy after)", "incident", DONE, False),
    # a measured migration or save/restore (harness/metrics.py describe())
    ("harness.metrics", r": \w+ (done|FAILED)", "measure", STEP, True),
)
_SUBJECT = re.compile(r"^\[([^]]+)\] (.*)$", re.S)
_HOST_SUBJECT = re.compile(r"^([\w.=-]+): (.*)$", re.S)
_MEASURED = re.compile(r"^([^:]{1,60}): (.*)$", re.S)  # "bookworm pv 256 MiB: ..."
_GUEST_SUBJECT = re.compile(r"^([\w.=-]+) (\(\w+\) .*)$", re.S)


def classify(logger: str, message: str, now: float | None = None, worker: str = "") -> StageEvent | None:
    """The stage event a log record says, or None when it is not a stage line."""
    rule = next((r for r in RULES if logger.startswith(r[0]) and re.search(r[1], message)), None)
    if rule is None:
        return None
    _prefix, _pattern, kind, level, bar = rule
    first = message.splitlines()[0] if message else message
    subject, text = _split_subject(first, _MEASURED if kind == "measure" else None)
    if kind == "image" and subject.startswith("image "):
        subject = subject.removeprefix("image ")
    seconds = _seconds(text) if bar else None
    return StageEvent(subject, text, kind, level, seconds, time.time() if now is None else now, worker)


def _split_subject(line: str, extra: re.Pattern | None = None) -> tuple[str, str]:
    for pattern in (_SUBJECT, _HOST_SUBJECT, _GUEST_SUBJECT, *([extra] if extra else [])):
        match = pattern.match(line)
        if match:
            return match.group(1), match.group(2)
    return "", line


def _seconds(text: str) -> float | None:
    """The stage's time: the longest "in N s" of the line (a restore says VM running in
    0.8 s, dom0 answered in 1.1 s, SSH in 1.9 s: it took 1.9 s)."""
    found = [float(m) for m in _SECONDS.findall(text)]
    return max(found) if found else None


def clock(seconds: float) -> str:
    """Elapsed run time as m:ss (h:mm:ss past an hour)."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_line(event: StageEvent, run_started: float) -> str:
    """``nx 2:13 gw0 [bookworm-gw0-0] Xen + dom0 ready in 44.0 s``: run time, the xdist
    worker when there is one, the subject, what happened."""
    parts = ["nx", clock(event.t - run_started)]
    if event.worker:
        parts.append(event.worker)
    if event.kind == "incident":
        parts.append("INCIDENT")
    if event.subject:
        parts.append(f"[{event.subject}]")
    parts.append(event.text)
    return " ".join(parts)


def shown(event: StageEvent, verbosity: int) -> bool:
    """-q (verbosity < 0) shows one line per stage; the default and -v steps too; -vv all."""
    return event.level <= (DONE if verbosity < 0 else STEP if verbosity < 2 else DETAIL)


def heartbeat(subject: str, doing: str, since: float, now: float, worker: str = "") -> StageEvent:
    """A line saying the run is alive: how long the current stage has been going (shown
    even with -q: a quiet run must not look hung either)."""
    return StageEvent(subject, f"... still working, {now - since:.0f} s after: {doing}", "alive", DONE, None,
                      now, worker)


class StageLog:
    """Appends events to ``<dir>/<name>.log`` (the terminal's text) and ``<name>.jsonl``."""

    def __init__(self, directory: Path, run_started: float, name: str = "stages",
                 fresh: bool = True) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.text_path = directory / f"{name}.log"
        self.json_path = directory / f"{name}.jsonl"
        self.run_started = run_started
        self._lock = threading.Lock()
        if fresh:
            for path in (self.text_path, self.json_path):
                path.write_text("")

    def write(self, event: StageEvent) -> str:
        line = format_line(event, self.run_started)
        with self._lock, open(self.text_path, "a") as text, open(self.json_path, "a") as js:
            text.write(line + "\n")
            js.write(event.to_json() + "\n")
        return line


def load_events(path: Path) -> list[StageEvent]:
    """The events of a ``stages.jsonl`` (none when it does not exist)."""
    if not path.is_file():
        return []
    return [StageEvent.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def bars(events: Iterable[StageEvent]) -> list[StageEvent]:
    """The events that time a stage (they carry seconds), for a timeline."""
    return [e for e in events if e.seconds is not None and e.kind != "alive"]


class StageHandler(logging.Handler):
    """A logging handler that hands each stage record to ``sink`` as a StageEvent."""

    def __init__(self, sink, worker: str = "") -> None:
        super().__init__(logging.INFO)
        self.sink = sink
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = classify(record.name, record.getMessage(), record.created, self.worker)
            if event is not None:
                self.sink(event)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)
