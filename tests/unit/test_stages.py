"""Stage lines: which log records are stages, how they read, what -q shows, heartbeats."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from harness.stages import (
    DETAIL,
    DONE,
    STEP,
    StageEvent,
    StageHandler,
    StageLog,
    bars,
    classify,
    clock,
    format_line,
    heartbeat,
    load_events,
    shown,
)

T0 = 1_000_000.0

# (logger, message) as the harness's layers say them -> (kind, level, subject, seconds)
CASES = [
    ("nested_xen", "[image bookworm] built in 48 s: /c/images/bookworm-1",
     ("image", DONE, "bookworm", 48.0)),
    ("nested_xen", "[image bookworm] building bookworm-1 from file:/m (a few minutes)",
     ("image", STEP, "bookworm", None)),
    ("nested_xen", "[image testing] I: downloading packages with apt...", ("image", STEP, "testing", None)),
    ("nested_xen", "[image testing] Get:1 file:/m testing/main amd64 libc6",
     ("image", DETAIL, "testing", None)),
    ("harness.machines.base", "bookworm-main-0: dom0-ssh stage passed in 37.9 s",
     ("boot", STEP, "bookworm-main-0", 37.9)),
    ("harness.host", "bookworm-main-0: Xen + dom0 ready in 44.0 s (xen 0.2 s, dom0-kernel 5.8 s)",
     ("boot", DONE, "bookworm-main-0", 44.0)),
    ("nested_xen", "[bookworm-main-0] starting the shared guests (pv, pvh, hvm)",
     ("guest", STEP, "bookworm-main-0", None)),
    ("harness.guests", "nx-shared-pvh (pvh) ready in 12.5 s after xl create",
     ("guest", STEP, "nx-shared-pvh", 12.5)),
    ("harness.guests", "bookworm-main-0: shared guests pv, pvh, hvm ready in 40.1 s",
     ("guest", DONE, "bookworm-main-0", 40.1)),
    ("nested_xen", "[bookworm-main-0] saved L1 snapshot abc in 2.4 s (285 MiB of memory on disk; 1.0 s)",
     ("snapshot", DONE, "bookworm-main-0", 2.4)),
    ("nested_xen", "[bookworm-main-1] restored L1 snapshot abc: VM running in 0.80 s, dom0 answered over "
     "the channel (clock set) in 1.10 s, SSH in 1.90 s", ("snapshot", DONE, "bookworm-main-1", 1.9)),
    ("nested_xen", "[bookworm-main-peer] peer ready in 19.7 s (pause 0.1 s, host 15.0 s)",
     ("peer", DONE, "bookworm-main-peer", 19.7)),
    ("harness.metrics", "bookworm pv 256 MiB: localhost_migrate done in 5.2 s, downtime 0.41 s, 66000 pages",
     ("measure", STEP, "bookworm pv 256 MiB", 5.2)),
    ("harness.guests", "shared pvh guest died in early boot; creating it again: triple fault",
     ("incident", DONE, "", None)),
]


@pytest.mark.parametrize(("logger", "message", "expected"), CASES)
def test_classify(logger: str, message: str, expected: tuple) -> None:
    event = classify(logger, message, now=T0)
    assert event is not None
    assert (event.kind, event.level, event.subject, event.seconds) == expected
    assert event.start == T0 - (expected[3] or 0)


def test_other_records_are_not_stages() -> None:
    assert classify("harness.machines.qemu", "starting bookworm-main-0: qemu-system-x86_64 ...") is None
    assert classify("paramiko.transport", "Connected (version 2.0)") is None


def test_format_line_names_run_time_worker_and_subject() -> None:
    event = StageEvent("bookworm-gw1-0", "Xen + dom0 ready in 44.0 s", "boot", DONE, 44.0, T0 + 133, "gw1")
    assert format_line(event, T0) == "nx 2:13 gw1 [bookworm-gw1-0] Xen + dom0 ready in 44.0 s"
    incident = StageEvent("", "shared pvh guest died", "incident", DONE, None, T0 + 5)
    assert format_line(incident, T0) == "nx 0:05 INCIDENT shared pvh guest died"
    assert clock(3725) == "1:02:05"


def test_quiet_shows_one_line_per_stage() -> None:
    done, step, detail = (StageEvent("s", "t", "image", level) for level in (DONE, STEP, DETAIL))
    assert [shown(e, -1) for e in (done, step, detail)] == [True, False, False]
    assert [shown(e, 1) for e in (done, step, detail)] == [True, True, False]
    assert [shown(e, 2) for e in (done, step, detail)] == [True, True, True]


def test_heartbeat_says_what_is_going_and_for_how_long() -> None:
    event = heartbeat("image testing", "I: downloading packages with apt...", T0, T0 + 31, "gw0")
    assert format_line(event, T0) == ("nx 0:31 gw0 [image testing] ... still working, 31 s after: "
                                      "I: downloading packages with apt...")
    assert event.kind == "alive" and not bars([event])


def test_stage_log_and_handler(tmp_path: Path) -> None:
    log = StageLog(tmp_path, T0)
    logger = logging.getLogger("harness.host.test-stages")
    handler = StageHandler(log.write, "gw3")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("%s: Xen + dom0 ready in %.1f s (xen 0.2 s)", "trixie-gw3-0", 51.0)
        logger.info("not a stage")
    finally:
        logger.removeHandler(handler)
    text = (tmp_path / "stages.log").read_text().splitlines()
    assert len(text) == 1 and text[0].endswith("gw3 [trixie-gw3-0] Xen + dom0 ready in 51.0 s (xen 0.2 s)")
    (event,) = load_events(tmp_path / "stages.jsonl")
    assert (event.kind, event.seconds, event.worker) == ("boot", 51.0, "gw3")


def test_a_measured_migration_says_its_pages() -> None:
    from harness.metrics import Record, describe

    rec = Record(kind="localhost_migrate", guest_type="pv", memory_mb=256, image="bookworm", total_s=5.23,
                 downtime_s=0.414, iterations=3, pages_per_iteration=[65536, 400, 64], bytes_sent=270 * 2**20)
    line = describe(rec)
    assert line == ("bookworm pv 256 MiB: localhost_migrate done in 5.2 s, downtime 0.41 s, 3 iterations, "
                    "66000 pages, 270 MiB sent")
    event = classify("harness.metrics", line, now=T0)
    assert event is not None and (event.kind, event.seconds) == ("measure", 5.2)
    assert describe(Record(kind="save_restore", ok=False)) == "measured: save_restore FAILED"


def test_an_incident_is_a_stage_line():
    from harness.stages import DONE, classify

    event = classify("harness.incidents", "incident: early-boot: nx-shared-pvh (pvh) d2: gone; "
                     "emulator fault [x]; recreated")
    assert event is not None and event.kind == "incident" and event.level == DONE
