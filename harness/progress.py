"""Stage lines on the terminal while a run works (the pytest side of harness/stages.py).

A :class:`StagePlugin` is registered from ``pytest_configure``. Once collection
holds checks that boot Xen, a logging handler on the harness's loggers turns
stage records into lines: written at once through the terminal reporter (not the
captured log) and to ``artifacts/stages.log`` / ``stages.jsonl``. While a test's
setup or call goes on without a line for ``HEARTBEAT_S``, a heartbeat says what
is still going and for how long, so a long build, boot or migration shows that
it is alive.

Under xdist a worker's terminal output never reaches the user: each worker
writes ``stages-<worker>.jsonl`` and the controller tails those files, printing
each line with the worker's name (and writing them all to ``stages.log``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from .stages import DETAIL, StageEvent, StageHandler, StageLog, heartbeat, shown
from .timeouts import THREAD_STOP_S

HEARTBEAT_S = 20.0  # a line at least this often while a test's setup or call runs
POLL_S = 1.0
LOGGERS = ("harness", "nested_xen")


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


class StagePlugin:
    """Stage lines to the terminal and artifacts/stages.log; heartbeats; xdist tailing."""

    def __init__(self, config: pytest.Config, artifacts: Path) -> None:
        self.config = config
        self.artifacts = artifacts
        self.started = time.time()
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        self.controller = _is_controller(config)
        self.verbosity = config.getoption("verbose", 0) or 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handler: StageHandler | None = None
        self._log: StageLog | None = None
        self._last_shown = time.time()
        self._doing: tuple[str, str, float] | None = None  # (subject, what, since)
        self._phase: tuple[str, str, float] | None = None  # (nodeid, when, since)
        self._tail_lock = threading.Lock()
        self._offsets: dict[Path, int] = {}

    # ------------------------------------------------------------ lifecycle
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.controller:
            self._open(self.artifacts, "stages")
            for stale in self.artifacts.glob("stages-gw*.jsonl"):
                stale.unlink()
            self._spawn(self._tail_workers, "nx-stages-tail")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Only a session that boots Xen gets stage lines (unit tests keep their quiet)."""
        if self._handler is not None or not any(i.get_closest_marker("e2e") for i in items):
            return
        self._open(self.artifacts, f"stages-{self.worker}" if self.worker else "stages")
        self._handler = StageHandler(self.add, self.worker)
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self._handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        self._spawn(self._beat, "nx-stages-heartbeat")

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=THREAD_STOP_S)
        if self.controller:
            self._drain_workers()
        if self._handler is not None:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(self._handler)

    @property
    def active(self) -> bool:
        """Did this session record stages (it boots Xen, or tails workers that do)?"""
        return self._log is not None and self._log.json_path.stat().st_size > 0

    def _open(self, directory: Path, name: str) -> None:
        if self._log is None:
            self._log = StageLog(directory, self.started, name)

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------ events
    def add(self, event: StageEvent) -> None:
        """Record ``event``; show it on this process's terminal when the verbosity asks."""
        with self._lock:
            if self._log is None:
                return
            line = self._log.write(event)
            if event.kind not in ("alive", "check"):
                self._doing = (event.subject, event.text, event.t)
            if not shown(event, self.verbosity):
                return
            self._last_shown = time.time()
            if not self.worker:  # a worker's terminal goes nowhere: the controller tails its file
                self._write(line)

    def _write(self, line: str) -> None:
        """Through the terminal reporter, with pytest's output capture suspended (as its
        live logging does): during a test, the terminal's file descriptor is captured."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            # -q's dots leave the line open without the reporter knowing: end it first.
            if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 0):
                reporter.write("\n")
            reporter.write_line(line)

    # ------------------------------------------------------------ test phases
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._phase = (nodeid, "setup", time.time())

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        self._phase = (item.nodeid, "call", time.time())
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item):
        self._phase = (item.nodeid, "teardown", time.time())
        return (yield)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._phase = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Each check's phases, timed, for the report's timeline (not shown: pytest shows them)."""
        if self.worker or self._log is None or not hasattr(report, "start"):
            return
        if report.when != "call" and report.duration < 1.0:
            return
        self.add(StageEvent(report.nodeid, f"{report.when} {report.outcome}", "check", DETAIL,
                            round(report.duration, 2), report.stop, _worker_of(report)))

    # ------------------------------------------------------------ threads
    def _beat(self) -> None:
        while not self._stop.wait(POLL_S):
            event = self._heartbeat(time.time())
            if event is not None:
                self.add(event)
                self._last_shown = max(self._last_shown, time.time())

    def _heartbeat(self, now: float) -> StageEvent | None:
        """A heartbeat when a test phase has gone ``HEARTBEAT_S`` without a line."""
        phase = self._phase
        if phase is None or now - self._last_shown < HEARTBEAT_S:
            return None
        nodeid, when, since = phase
        doing = self._doing
        self._last_shown = now
        if doing is not None and doing[2] >= since:
            return heartbeat(doing[0], doing[1], doing[2], now, self.worker)
        return heartbeat(nodeid.rsplit("/", 1)[-1], f"{when} began", since, now, self.worker)

    def _tail_workers(self) -> None:
        while not self._stop.wait(POLL_S / 2):
            self._drain_workers()

    def _drain_workers(self) -> None:
        """Show the workers' new whole lines (the tail thread, and once more at the end)."""
        with self._tail_lock:
            for path in sorted(self.artifacts.glob("stages-gw*.jsonl")):
                with open(path, "rb") as stream:
                    stream.seek(self._offsets.get(path, 0))
                    chunk = stream.read()
                whole = chunk[: chunk.rfind(b"\n") + 1]
                self._offsets[path] = self._offsets.get(path, 0) + len(whole)
                for line in whole.decode(errors="replace").splitlines():
                    if line.strip():
                        self.add(StageEvent.from_json(line))


def _worker_of(report: pytest.TestReport) -> str:
    """The xdist worker that ran ``report``'s test ("" without xdist)."""
    gateway = getattr(getattr(report, "node", None), "gateway", None)
    return getattr(gateway, "id", "") or ""
