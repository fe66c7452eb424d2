"""The pytest plugin's hooks: options, configuration, collection, lost hosts, the
xdist merge of metrics and incidents, and the terminal summary.

Fixtures are a ladder, one guarantee per step::

    nx_config -> provisioner -> xen_host (Xen booted, dom0 answered) -> dom0 / xl / agent
              -> guest[pv|pvh|hvm] (probe ready)

They live in harness/fixtures/: ``hosts`` (config, provisioner, leases, ``xen_host``,
``peer_host``, facts, xl, dom0, agent and the range gate), ``guests`` (``guest``,
``own_guest``) and ``run`` (artifacts, metrics, ``defer``), registered below through
``pytest_plugins``. ``xen_host`` is parametrized over the run's host images (session
scope, one L1 per image). A module whose checks declare ``fresh_host=True`` gets its
own host, restored from the L1 snapshot. Markers ``e2e``, ``pv``, ``pvh``, ``hvm``
and one per image are derived from fixture names and parameters at collection.
On failure the serial log, `xl dmesg` and guest consoles are kept. ``plugins/``
also collects entry-point plugins and the README's example (harness/discovery.py);
each check's results go to results.json and summary.md (harness/results.py).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import incidents, options
from .config import ConfigError, RunConfig, check_host_images, run_config_from_options
from .discovery import SOURCES_KEY, Sources, collect_directory, entry_point_plugins, report_header
from .fixtures.hosts import FACTS_BY_IMAGE, HOST_FIXTURES, LOST_HOSTS, host_lost, lost_key
from .fixtures.run import (
    CFG_KEY,
    ISSUES_KEY,
    METRICS_KEY,
    OUTCOME_KEY,
    STARTED_KEY,
    VERDICTS_KEY,
    is_xdist_controller,
    measurements,
    run_config,
    run_incidents,
    worker,
)
from .known_issues import HOST_DEATH, emulator_fault, load_known_issues
from .plugins import GUEST_TYPES, MARKER, PluginError, spec_of
from .remote import RemoteError
from .results import ResultsPlugin, check_properties
from .selection import narrow
from .verdict import VerdictPlugin

log = logging.getLogger("nested_xen")

# The fixtures, registered in this order (their autouse fixtures run in it: the range
# gate, the guest liveness check, then the failure artifacts).
pytest_plugins = ["harness.fixtures.hosts", "harness.fixtures.guests", "harness.fixtures.run",
                  "harness.fixtures.pair"]


# ---------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nested-xen", "nested-xen: Xen in QEMU")
    options.add_pytest_options(group.addoption)  # every option, declared in harness/options.py


def _build_config(config: pytest.Config) -> RunConfig:
    return run_config_from_options(config.getoption)  # the YAML file, the options over it


def pytest_configure(config: pytest.Config) -> None:
    LOST_HOSTS.clear()  # one run's lost hosts (an in-process rerun starts afresh)
    incidents.clear()
    FACTS_BY_IMAGE.clear()
    config.stash[STARTED_KEY] = time.time()
    for name in ("e2e", *GUEST_TYPES):
        config.addinivalue_line("markers", f"{name}: derived by nested-xen from fixtures")
    config.addinivalue_line("markers", f"{MARKER}(spec): a nested-xen plugin check (use @check)")
    config.addinivalue_line("markers", "image(name): derived host image marker")
    # testinfra's paramiko backend warns about every per-image host key; the image's
    # own SSH key is the trust anchor here, so the warning is noise.
    config.addinivalue_line("filterwarnings", "ignore:Unknown ssh-ed25519 host key:UserWarning")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        config.stash[CFG_KEY] = _build_config(config)
        check_host_images(config.stash[CFG_KEY].host_images)
        known = config.getoption("--known-issues")
        config.stash[ISSUES_KEY] = load_known_issues(Path(known)) if known else load_known_issues()
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    artifacts = run_config(config).artifacts_dir.resolve()
    config.stash[SOURCES_KEY] = Sources(
        entry_points=() if config.getoption("--nx-no-entry-points") else tuple(entry_point_plugins()),
        example_dir=artifacts / "readme-example")
    config.pluginmanager.register(ResultsPlugin(artifacts, lambda: measurements(config),
                                                lambda: run_incidents(config)),
                                  "nested-xen-results")
    issues = config.stash[ISSUES_KEY]
    verdicts = VerdictPlugin(issues, run_config(config).emulator_fault_reruns, host_lost,
                             strict=config.getoption("strict_emulator"))
    config.stash[VERDICTS_KEY] = verdicts
    config.pluginmanager.register(verdicts, "nested-xen-verdicts")
    incidents.set_classifier(lambda incident: _classify(issues, incident))
    _register_stages(config, artifacts)
    if config.getoption("--print-config"):
        import dataclasses
        import json

        cfg = run_config(config)
        print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        pytest.exit("printed the effective configuration", returncode=0)


def _register_stages(config: pytest.Config, artifacts: Path) -> None:
    """Stage lines on the terminal and artifacts/stages.log; report.html at the end
    (harness/progress.py, harness/html_report.py)."""
    from .html_report import ReportPlugin
    from .progress import StagePlugin

    stages = StagePlugin(config, artifacts)
    config.pluginmanager.register(stages, "nested-xen-stages")
    results = config.pluginmanager.get_plugin("nested-xen-results")

    def ran_checks() -> bool:
        return stages.active or bool(results.results.results)

    config.pluginmanager.register(ReportPlugin(artifacts, ran_checks), "nested-xen-html")


def _classify(issues: list, incident: incidents.Incident) -> str | None:
    """The guest-death entry this death's own evidence (that domain's xl dmesg lines and
    console) shows, as a label; None when none matches or the host's facts are unknown."""
    facts = FACTS_BY_IMAGE.get(incident.image)
    if facts is None or incident.subject != "guest":
        return None
    incident.accel = getattr(facts, "accel", "")
    fault = emulator_fault(issues, incident.guest_type or None, facts, incident.evidence)
    return fault.label() if fault is not None else None


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: pytest tears fixtures down, so VMs and guests go."""
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return report_header(config.stash[SOURCES_KEY], config.getoption("--nx-no-entry-points"))


# ---------------------------------------------------------------------- collection


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """``plugins/`` also collects entry-point plugins and the README's example (harness/discovery.py)."""
    return collect_directory(path, parent)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = run_config(metafunc.config)
    names = set(metafunc.fixturenames)
    if names & HOST_FIXTURES:
        dom0 = f"-dom0={cfg.dom0}" if cfg.dom0 else ""  # else the booted host tells (JUnit property)
        metafunc.parametrize("host_image_name", list(cfg.host_images), indirect=True,
                             scope="session", ids=[f"img={n}{dom0}" for n in cfg.host_images])
    if "guest_type" in names:
        try:
            spec = spec_of(metafunc.definition)
        except PluginError as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("guest_type", list(spec.guests), indirect=True,
                             scope=_guest_scope(metafunc), ids=[f"guest={g}" for g in spec.guests])


def _guest_scope(metafunc: pytest.Metafunc) -> str:
    """Module scope lets a module's checks share a guest; a fresh-host module is function-scoped."""
    return "module"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    narrow(config, items)  # `tox -e nested-xen -- plugins/smoke.py` runs that file only
    _check_properties(items)
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & HOST_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        kind = callspec.params.get("guest_type")
        if kind:
            item.add_marker(getattr(pytest.mark, kind))
        image = callspec.params.get("host_image_name")
        if image:
            item.add_marker(pytest.mark.image(image))


def _check_properties(items: list[pytest.Item]) -> None:
    """Name each check's plugin, image and guest type in its JUnit properties (and results.json)."""
    for item in items:
        if item.get_closest_marker(MARKER) is None:
            continue
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        item.user_properties.extend(check_properties(item, params.get("host_image_name"),
                                                     params.get("guest_type")))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    if report.when == "teardown" and report.failed:
        _teardown_on_lost_host(item, call, report)
    item.stash.setdefault(OUTCOME_KEY, {})[report.when] = report
    return report


def _teardown_on_lost_host(item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport) -> None:
    """Fixtures torn down after their host was lost (LOST_HOSTS) cannot reach dom0 (saving
    a console, destroying a guest on a host that is replaced anyway): that transport error
    is the recorded incident's consequence, reported with it, not an error of its own."""
    lost = LOST_HOSTS.get(lost_key(item))
    if lost is None or call.excinfo is None or not call.excinfo.errisinstance(RemoteError):
        return
    note = f"teardown could not reach {lost.name}, lost earlier ({lost.line()}): {call.excinfo.value}"
    log.warning("%s: %s", item.nodeid, note)
    report.outcome = "passed"
    report.longrepr = None
    report.sections.append(("nested-xen teardown", note))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A check whose module's host was lost by an earlier check does not try it: it fails
    naming that incident (never an expected failure), or, when a ``host-death`` entry
    showed that death to be an emulator fault, is skipped as not run, naming it."""
    lost = LOST_HOSTS.get(lost_key(item))
    if lost is None:
        return
    if (lost.signature or "").startswith(f"{HOST_DEATH} "):
        pytest.skip(f"not run: {lost.name} (dom0) died during {lost.nodeid} of a known emulator fault "
                    f"[{lost.signature}]; the next module gets a fresh host")
    pytest.fail(f"{lost.name} stopped answering during {lost.nodeid} (incident: {lost.line()}); "
                "this check could not run on it; the next module gets a fresh host", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Each process writes its incidents: incidents-<worker>.json (xdist) or incidents.json."""
    config = session.config
    if is_xdist_controller(config) or CFG_KEY not in config.stash:
        return
    name = worker()
    path = run_config(config).artifacts_dir / ("incidents.json" if name == "main"
                                               else f"incidents-{name}.json")
    if incidents.INCIDENTS or name != "main":
        incidents.write(path)
    else:
        path.unlink(missing_ok=True)  # no stale record of an earlier run's incidents


def _summarise_incidents(terminalreporter, config: pytest.Config) -> None:
    found = run_incidents(config)
    verdicts = config.stash.get(VERDICTS_KEY, None)
    if found:
        terminalreporter.section(f"nested-xen incidents: {len(found)} death(s) the harness did not cause")
        for incident in found:
            terminalreporter.write_line(incident.line())
        terminalreporter.write_line(f"incidents: {run_config(config).artifacts_dir / 'incidents.json'}")
    from .verdict import VERIFY_COST
    if VERIFY_COST["calls"]:
        terminalreporter.write_line(
            f"guest verification around checks: {VERIFY_COST['calls']} `xl list` calls, "
            f"{VERIFY_COST['seconds']:.1f} s in all (the time it adds to this run)")
    if verdicts is not None and verdicts.reruns:
        cap = run_config(config).emulator_fault_reruns
        terminalreporter.write_line(f"emulator-fault reruns: {len(verdicts.reruns)} of {cap} this run "
                                    "(1 per check): " + ", ".join(verdicts.reruns))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    _summarise_incidents(terminalreporter, config)
    measurements(config)  # under xdist: join the workers' metrics first
    sink = config.stash.get(METRICS_KEY, None)
    if sink is None or not sink.records:
        return
    from .report import plots, summary_table

    terminalreporter.section("nested-xen measurements")
    terminalreporter.write_line(summary_table(sink.records))
    try:
        written = plots(sink.records, sink.path.parent / "plots")
    except ImportError:
        terminalreporter.write_line("plots skipped: install matplotlib (pip install nested-xen[report])")
        return
    for path in written:
        terminalreporter.write_line(f"plot: {path}")
    terminalreporter.write_line(f"metrics: {sink.path}")

