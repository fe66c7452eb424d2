"""Stage lines reach the terminal of a real pytest run (and, under xdist, the controller's)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import harness.progress
harness.progress.HEARTBEAT_S = 0.6
harness.progress.POLL_S = 0.2
"""
CHECKS = """
import logging, time
import pytest

@pytest.mark.e2e
@pytest.mark.parametrize("n", [1, 2])
def test_boots(n):
    logging.getLogger("harness.host").info("%s: Xen + dom0 ready in %.1f s (xen 0.2 s)", f"host{n}", 40.0 + n)
    logging.getLogger("nested_xen").info("[image bookworm] I: downloading packages with apt...")
    time.sleep(1.5)
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_checks=CHECKS)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--artifacts-dir={pytester.path / 'a'}",
                                         *args)


def test_stage_lines_steps_and_heartbeats(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.re_match_lines([r"nx 0:0\d \[host1\] Xen \+ dom0 ready in 41.0 s \(xen 0.2 s\)",
                                  r"nx 0:0\d \[bookworm\] I: downloading packages with apt...",
                                  r"nx 0:0\d \[bookworm\] \.\.\. still working, \d s after: "
                                  r"I: downloading packages with apt\.\.\."])
    log = (pytester.path / "a" / "stages.log").read_text()
    assert "[host2] Xen + dom0 ready in 42.0 s" in log and "still working" in log
    assert (pytester.path / "a" / "report.html").is_file()
    result.stdout.fnmatch_lines(["report: */a/report.html"])


def test_quiet_shows_one_line_per_stage(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "-q")
    text = result.stdout.str()
    assert "[host1] Xen + dom0 ready in 41.0 s" in text
    assert "] I: downloading packages" not in text  # a step: not with -q
    assert "still working" in text  # a heartbeat shows the run is alive even with -q


def test_xdist_lines_name_their_worker(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    result = _run(pytester, "-n", "2", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.re_match_lines_random([r"nx 0:0\d gw[01] \[host1\] Xen \+ dom0 ready in 41.0 s.*",
                                         r"nx 0:0\d gw[01] \[host2\] Xen \+ dom0 ready in 42.0 s.*"])
    log = (pytester.path / "a" / "stages.log").read_text()
    assert " gw0 " in log and " gw1 " in log
