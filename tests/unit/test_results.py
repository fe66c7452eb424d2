"""The results matrix, its Markdown, results.json, and `nested-xen report` on a run's artifacts.

How results are gathered from a real pytest run is in tests/unit/test_plugin_runs.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from harness import cli
from harness.metrics import MetricsSink, Record
from harness.results import (
    NO_GUEST,
    CheckResult,
    cell,
    load,
    markdown,
    matrix,
    matrix_table,
    plugin_name,
    totals,
    write_json,
)

pytestmark = pytest.mark.usefixtures("restore_process_state")


def result(plugin: str, image: str, guest: str, outcome: str, dom0: str = "pv", reason: str = "",
           check: str = "test_x") -> CheckResult:
    ids = "-".join(p for p in (f"img={image}", guest and f"guest={guest}") if p)
    return CheckResult(f"plugins/{plugin}.py::{check}[{ids}]", plugin, check, image, guest, dom0,
                       "4.17.5", "6.1.0-50-amd64", "tcg", outcome, 1.5, reason)


RUN = [
    result("smoke", "bookworm", "", "passed"),
    result("smoke", "bookworm", "", "passed", check="test_y"),
    result("translation", "bookworm", "pv", "passed"),
    result("translation", "bookworm", "pvh", "failed", reason="AssertionError: 1 of 64 pages | differ"),
    result("translation", "bookworm", "pvh", "xfailed", reason="known issue: triple fault", check="test_y"),
    result("translation", "trixie", "hvm", "skipped", dom0="pvh", reason="needs Xen >=4.20"),
]


@pytest.mark.parametrize(("nodeid", "plugin"), [
    ("plugins/smoke.py::test_x[img=bookworm]", "smoke"),
    ("acme_xen_checks/grants.py::test_x", "acme_xen_checks.grants"),
    ("README.md::test_first_and_last_probe_pages_map[img=bookworm-guest=pvh]", "README.md"),
])
def test_plugin_name(nodeid: str, plugin: str) -> None:
    assert plugin_name(nodeid) == plugin


def test_matrix_counts_per_plugin_image_dom0_and_guest() -> None:
    columns, rows = matrix(RUN)
    assert columns == [NO_GUEST, "pv", "pvh", "hvm"]
    assert list(rows) == [("smoke", "bookworm", "pv"), ("translation", "bookworm", "pv"),
                          ("translation", "trixie", "pvh")]
    assert rows[("smoke", "bookworm", "pv")] == {NO_GUEST: Counter(passed=2)}
    assert rows[("translation", "bookworm", "pv")]["pvh"] == Counter(failed=1, xfailed=1)


def test_skip_before_boot_joins_the_row_of_its_images_dom0_mode() -> None:
    skipped = result("migration", "bookworm", "hvm", "skipped", dom0="")
    _, rows = matrix([result("migration", "bookworm", "pv", "passed"), skipped])
    assert list(rows) == [("migration", "bookworm", "pv")]
    # Two modes seen for the image: nothing to infer, the row says so.
    _, rows = matrix([result("migration", "trixie", "pv", "passed"),
                      result("migration", "trixie", "pv", "passed", dom0="pvh"),
                      result("migration", "trixie", "hvm", "skipped", dom0="")])
    assert ("migration", "trixie", "") in rows


def test_cell() -> None:
    assert cell(None) == "-"
    assert cell(Counter(passed=3, xfailed=1, failed=2)) == "2F 3P 1x"


def test_columns_only_for_guest_types_that_ran() -> None:
    columns, _ = matrix([result("translation", "bookworm", "hvm", "passed")])
    assert columns == ["hvm"]


def test_matrix_table() -> None:
    lines = matrix_table(RUN).splitlines()
    assert lines[0].split() == ["plugin", "image", "dom0", "no", "guest", "pv", "pvh", "hvm"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["smoke", "bookworm", "pv", "2P", "-", "-", "-"]
    assert lines[3].split() == ["translation", "bookworm", "pv", "-", "1P", "1F", "1x", "-"]
    assert lines[4].split() == ["translation", "trixie", "pvh", "-", "-", "-", "1s"]
    assert lines[5].startswith("P passed, R passed only when run again after an emulator fault, F failed")


def test_totals() -> None:
    assert totals(RUN) == "1 failed, 3 passed, 1 skipped, 1 xfailed"
    assert totals([]) == "no checks ran"


def test_markdown_summary() -> None:
    records = [Record(kind="save_restore", guest_type="pv", memory_mb=256, image="bookworm",
                      total_s=10.0, downtime_s=1.0)]
    text = markdown(RUN, records)
    assert text.startswith("## nested-xen results\n\n"
                           "**1 failed, 3 passed, 1 skipped, 1 xfailed** (6 tests)\n")
    # the host table says how many tests each image ran and how long they took
    assert "| bookworm | pv | 4.17.5 | 6.1.0-50-amd64 | tcg | 5 | 8 s |" in text
    assert "| translation | bookworm | pv | - | 1P | 1F 1x | - |" in text
    # failures first, and a `|` in a reason does not break the table
    not_passed = text[text.index("### Not passed"):text.index("### Measurements")].splitlines()
    assert [line.split(" | ")[1] for line in not_passed[4:7]] == ["failed", "skipped", "xfailed"]
    assert r"1 of 64 pages \| differ" in not_passed[4]
    assert "| bookworm | save_restore | pv | 256 | idle | 1 | 0 | 10.00 [10.00-10.00] |" in text


def test_image_times_sum_the_durations_per_image() -> None:
    from harness.results import image_times

    assert image_times(RUN) == {"bookworm": (5, 7.5), "trixie": (1, 1.5)}


def test_markdown_without_checks() -> None:
    assert markdown([]) == "## nested-xen results\n\nNo check ran.\n"


def test_results_json_round_trip(tmp_path: Path) -> None:
    write_json(RUN, tmp_path / "results.json")
    assert load(tmp_path / "results.json") == RUN
    assert set(json.loads((tmp_path / "results.json").read_text())["results"][0]) == {
        "nodeid", "plugin", "check", "image", "guest_type", "dom0_mode", "xen_version", "kernel_release",
        "accel", "outcome", "duration", "reason", "verdict", "incidents", "finding", "properties", "origin",
        "xen_changeset", "device_model", "device_model_version", "device_model_package", "paging"}


def test_a_checks_own_properties_are_kept() -> None:
    """record_property values beyond the standard ones (an exit status, an output tail)
    reach results.json; the standard ones stay in their fields."""
    from types import SimpleNamespace

    from harness.results import Results

    results = Results()
    props = [("plugin", "xen_tools_tests"), ("check", "test_tsx"), ("image", "bookworm"),
             ("exit_status", 1), ("output", "Host reports no RTM"), ("timed_out", False)]
    results.add(SimpleNamespace(nodeid="plugins/xen_tools_tests.py::test_tsx[img=bookworm]", when="call",
                                user_properties=props, duration=2.5, passed=False, failed=True,
                                skipped=False, longrepr=None, longreprtext="exit 1"))
    (result,) = results.results
    assert result.properties == {"exit_status": 1, "output": "Host reports no RTM", "timed_out": False}
    assert result.image == "bookworm" and result.outcome == "failed"


# ---------------------------------------------------------------------- nested-xen report


MIGRATION = Record(kind="localhost_migrate", guest_type="pvh", memory_mb=256, image="bookworm", total_s=30.0)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    write_json(RUN, tmp_path / "results.json")
    MetricsSink(tmp_path / "metrics.json").add(MIGRATION)
    return tmp_path


def test_report_markdown_of_an_artifacts_dir(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(artifacts), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == markdown(RUN, [MIGRATION]) + "\n"
    assert "### Measurements" in out and "| translation | trixie | pvh |" in out


def test_report_on_results_json_prints_the_matrix(artifacts: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(artifacts / "results.json")]) == 0
    assert capsys.readouterr().out == matrix_table(RUN) + "\n"


def test_report_on_a_dir_prints_matrix_and_measurements(artifacts: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(artifacts)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(matrix_table(RUN)) and "localhost_migrate" in out


def test_report_baseline_needs_metrics(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = str(artifacts / "results.json")
    assert cli.main(["report", results, "--baseline", results]) == 2
    err = capsys.readouterr().err
    assert err == f"nested-xen: error: {results}: --plots and --baseline need a metrics.json\n"


@pytest.mark.parametrize(("content", "error"), [
    (None, "has neither results.json nor metrics.json"),
    ('{"other": 1}', "neither a results.json nor a metrics.json"),
    ("{", "not JSON"),
])
def test_report_refuses_what_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            content: str | None, error: str) -> None:
    target = tmp_path
    if content is not None:
        target = tmp_path / "run.json"
        target.write_text(content)
    assert cli.main(["report", str(target), "--markdown"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err
