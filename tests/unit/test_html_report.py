"""artifacts/report.html from a fixture run's artifacts."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest

from harness import html_report, incidents, results
from harness.incidents import Incident
from harness.stages import DETAIL, DONE, STEP, StageEvent

T0 = 1_700_000_000.0
# The smallest valid PNG: a 1x1 pixel.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
                       "hKmMIQAAAABJRU5ErkJggg==")


SMOKE = "plugins/smoke.py::test_boot[img=bookworm]"


def _events() -> list[StageEvent]:
    return [
        StageEvent("bookworm", "built in 48 s: /c/x", "image", DONE, 48.0, T0 + 48),
        StageEvent("bookworm-main-0", "xen stage passed in 0.2 s", "boot", STEP, 0.2, T0 + 60),
        StageEvent("bookworm-main-0", "Xen + dom0 ready in 44.0 s", "boot", DONE, 44.0, T0 + 95),
        StageEvent("bookworm-main-0", "shared guests pv ready in 30.0 s", "guest", DONE, 30.0, T0 + 130),
        StageEvent("bookworm-main-0", "saved L1 snapshot k in 2.4 s", "snapshot", DONE, 2.4, T0 + 133),
        StageEvent("", "... still working, 20 s after: x", "alive", STEP, None, T0 + 70),
        StageEvent(SMOKE, "setup passed", "check", DETAIL, 140.0, T0 + 140),
        StageEvent(SMOKE, "call passed", "check", DETAIL, 3.0, T0 + 143),
        StageEvent("plugins/migration.py::test_mig[img=bookworm-guest=pv]", "call failed", "check", DETAIL,
                   70.0, T0 + 215),
    ]


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    results = [
        {"nodeid": SMOKE, "plugin": "smoke", "check": "test_boot",
         "image": "bookworm", "guest_type": "", "outcome": "passed", "duration": 143.0},
        {"nodeid": "plugins/migration.py::test_mig[img=bookworm-guest=pv]", "plugin": "migration",
         "check": "test_mig", "image": "bookworm", "guest_type": "pv", "outcome": "failed", "duration": 70.0,
         "reason": "AssertionError: <pages differ>"},
    ]
    (tmp_path / "results.json").write_text(json.dumps({"version": 1, "results": results}))
    (tmp_path / "stages.jsonl").write_text("".join(e.to_json() + "\n" for e in _events()))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "migration_total.png").write_bytes(PNG)
    fail = tmp_path / "failures" / "plugins_migration.py__test_mig"
    fail.mkdir(parents=True)
    (fail / "serial.log").write_text("".join(f"serial line {i}\n" for i in range(100)))
    (fail / "console-nx-mig.log").write_text("guest console: Kernel panic\n")
    incidents.write(tmp_path / "incidents.json", [
        Incident("host", "bookworm-main-0", "during-check", image="bookworm", nodeid="test_mig",
                 signature="x2apic-eoi", action="expected-failure", evidence={"serial": "xl dmesg"}),
        Incident("guest", "nx-shared-pvh", "between-checks", guest_type="pvh", image="bookworm",
                 detail="gone from `xl list`", evidence={"console": "Triple fault"}, action="recreated")])
    return tmp_path


def test_report_holds_every_section(artifacts: Path) -> None:
    page = html_report.write(artifacts).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 1
    assert "1 failed, 1 passed" in page and "&lt;pages differ&gt;" in page  # escaped
    assert "data:image/png;base64," + base64.b64encode(PNG).decode() in page
    assert "serial line 99" in page and "serial line 59" not in page  # the last 40
    assert "guest console: Kernel panic" in page
    assert "x2apic-eoi" in page and "nx-shared-pvh" in page and "Triple fault" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no network


def test_timeline_bars_and_top_costs(artifacts: Path) -> None:
    events = html_report.timeline_bars(artifacts)
    assert [e.kind for e in events].count("alive") == 0 and len(events) == 8
    top = html_report.costs(events)[:3]
    assert top[0] == (70.0, "call migration.py::test_mig[img=bookworm-guest=pv]")
    assert top[1][1].startswith("image: [bookworm] built in 48 s")
    # The first test's 140 s setup holds the image, boot, guests and snapshot: its own time is the rest.
    own = dict((label, s) for s, label in html_report.costs(events))
    own_setup = own["setup smoke.py::test_boot[img=bookworm] (own time)"]
    assert own_setup == pytest.approx(140 - 48 - 44 - 30 - 2.4)
    svg = html_report.timeline_svg(events)
    assert len(re.findall(r"<rect ", svg)) == 8


def test_empty_artifacts_say_so(tmp_path: Path) -> None:
    page = html_report.render(tmp_path)
    for text in ("no check ran", "no plots", "no failures", "no incidents", "no timed stages"):
        assert text in page


def test_checks_from_junit_when_no_stage_records(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" timestamp="2026-12-05T23:00:00">'
        '<testcase classname="plugins.smoke" name="test_boot" time="120.5"/>'
        '<testcase classname="plugins.smoke" name="test_xl" time="2.0"/></testsuite></testsuites>')
    events = html_report.timeline_bars(tmp_path)
    assert [(e.subject, e.seconds) for e in events] == [("plugins.smoke::test_boot", 120.5),
                                                         ("plugins.smoke::test_xl", 2.0)]
    assert events[1].start == pytest.approx(events[0].t)


def test_cli_writes_the_page_again(artifacts: Path, capsys) -> None:
    from harness.cli import main

    assert main(["report", str(artifacts), "--html"]) == 0
    assert "report: " in capsys.readouterr().out and (artifacts / "report.html").is_file()
    assert main(["report", str(artifacts / "results.json"), "--html"]) == 2


def test_under_xdist_the_page_counts_the_incidents_results_json_holds(tmp_path: Path) -> None:
    """-n 2: each worker wrote incidents-gwN.json, the controller merged this run's into
    incidents.json (and results.json from the same list); report.html reads that one file
    only: not the workers' again, not an earlier run's worker file the merge left out."""
    def death(name: str, worker: str) -> Incident:
        return Incident("guest", name, "during-check", guest_type="pv", image="bookworm", worker=worker,
                        evidence={"dmesg": f"d{name} triple fault"})

    stale = tmp_path / "incidents-gw2.json"  # an earlier run's third worker
    incidents.write(stale, [death("old", "gw2")])
    started = stale.stat().st_mtime + 1
    incidents.write(tmp_path / "incidents-gw0.json", [death("a", "gw0")])
    incidents.write(tmp_path / "incidents-gw1.json", [death("b", "gw1"), death("c", "gw1")])
    for worker in ("gw0", "gw1"):
        path = tmp_path / f"incidents-{worker}.json"
        os.utime(path, (started + 1, started + 1))
    merged = incidents.merge(tmp_path, since=started)
    check = results.CheckResult("plugins/x.py::test_x", "x", "test_x", outcome="passed")
    results.write_json([check], tmp_path / "results.json", merged)

    in_results = len(json.loads((tmp_path / "results.json").read_text())["incidents"])
    page = html_report.write(tmp_path).read_text()
    shown = re.search(r"<p class=incidents>(\d+) incident\(s\)</p>", page)
    assert in_results == 3 and shown is not None and int(shown.group(1)) == in_results
    assert len(html_report.incidents(tmp_path)) == in_results
    assert "dold triple fault" not in page
