"""The pytest plugin: options, fixtures, markers, gating and artifacts.

Fixtures are a ladder, one guarantee per step::

    nx_config -> provisioner -> xen_host (Xen booted, dom0 answered) -> dom0 / xl / agent
              -> guest[pv|pvh|hvm] (probe ready)

``xen_host`` is parametrized over the run's host images (session scope, one
L1 per image). A module whose checks declare ``fresh_host=True`` gets its own
host, restored from the L1 snapshot. Markers ``e2e``, ``pv``, ``pvh``, ``hvm``
and one per image are derived from fixture names and parameters at collection.
On failure the serial log, `xl dmesg` and guest consoles are kept. ``plugins/``
also collects entry-point plugins and the README's example (harness/discovery.py);
each check's results go to results.json and summary.md (harness/results.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import incidents
from .config import ConfigError, RunConfig, load_run_config
from .discovery import SOURCES_KEY, Sources, collect_directory, entry_point_plugins, report_header
from .host import XenHost
from .known_issues import emulator_fault, load_known_issues
from .metrics import MetricsSink
from .plugins import GUEST_TYPES, MARKER, PluginError, spec_of
from .provision import Provisioner
from .results import ResultsPlugin, check_properties, host_properties
from .selection import narrow
from .verdict import FACTS_KEY, VerdictPlugin, check_id, verify_before

log = logging.getLogger("nested_xen")

OUTCOME_KEY = pytest.StashKey[dict]()
HOST_FIXTURES = {"xen_host", "dom0", "xl", "agent", "guest", "own_guest", "host_facts"}


# ---------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nested-xen", "nested-xen: Xen in QEMU")
    group.addoption("--nx-config", metavar="YAML", help="run configuration file")
    group.addoption("--host-image", action="append", metavar="NAME",
                    help="host image recipe (images/hosts/NAME.yaml); repeat or comma-separate")
    group.addoption("--backend", choices=["qemu", "libvirt"], help="L1 machine backend")
    group.addoption("--libvirt-uri", metavar="URI",
                    help="libvirt connection for --backend libvirt (default qemu:///system)")
    group.addoption("--accel", choices=["auto", "kvm", "tcg"], help="QEMU accelerator")
    group.addoption("--dom0", choices=["pv", "pvh"], help="dom0 mode (overrides the recipe)")
    group.addoption("--artifacts-dir", metavar="DIR", help="where logs and reports go")
    group.addoption("--cache-dir", metavar="DIR", help="image and snapshot cache")
    group.addoption("--mirror", metavar="URL", help="Debian mirror for image builds")
    group.addoption("--snapshot", choices=["auto", "off", "refresh"],
                    help="L1 snapshots: use/create (auto), never (off), recreate (refresh)")
    group.addoption("--rebuild", action="store_true", default=None,
                    help="rebuild images and drop snapshots")
    group.addoption("--memory-mb", type=int, help="L1 memory in MiB")
    from .inputs import add_options

    add_options(group.addoption)
    group.addoption("--print-config", action="store_true", help="print the effective config and exit")
    group.addoption("--known-issues", metavar="YAML",
                    help="known issues file (default: the repository's known_issues.yaml)")
    group.addoption("--nx-no-entry-points", action="store_true",
                    help="do not collect checks from installed packages' nested_xen.plugins entry points")


def _build_config(config: pytest.Config) -> RunConfig:
    opt = config.getoption
    path = opt("--nx-config")
    cfg = load_run_config(Path(path) if path else None)
    images = opt("--host-image")
    if images:
        images = tuple(n.strip() for arg in images for n in arg.split(",") if n.strip())
    return cfg.with_overrides(
        host_images=images or None,
        backend=opt("--backend"), libvirt_uri=opt("--libvirt-uri"), accel=opt("--accel"), dom0=opt("--dom0"),
        artifacts_dir=Path(opt("--artifacts-dir")) if opt("--artifacts-dir") else None,
        cache_dir=Path(opt("--cache-dir")) if opt("--cache-dir") else None,
        mirror=opt("--mirror"), snapshot=opt("--snapshot"), rebuild=opt("--rebuild"),
        memory_mb=opt("--memory-mb"), inputs=_inputs_of(opt, cfg),
    )


def _inputs_of(opt, cfg: RunConfig):
    from .inputs import InputError, from_options

    try:
        return from_options(opt, cfg.inputs)
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def pytest_configure(config: pytest.Config) -> None:
    LOST_HOSTS.clear()  # one run's lost hosts (an in-process rerun starts afresh)
    incidents.clear()
    FACTS_BY_IMAGE.clear()
    config.stash[_STARTED_KEY] = time.time()
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
        config.stash[_CFG_KEY] = _build_config(config)
        known = config.getoption("--known-issues")
        config.stash[_ISSUES_KEY] = load_known_issues(Path(known)) if known else load_known_issues()
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    artifacts = config.stash[_CFG_KEY].artifacts_dir.resolve()
    config.stash[SOURCES_KEY] = Sources(
        entry_points=() if config.getoption("--nx-no-entry-points") else tuple(entry_point_plugins()),
        example_dir=artifacts / "readme-example")
    config.pluginmanager.register(ResultsPlugin(artifacts, lambda: _measurements(config),
                                                lambda: _run_incidents(config)),
                                  "nested-xen-results")
    issues = config.stash[_ISSUES_KEY]
    verdicts = VerdictPlugin(issues, config.stash[_CFG_KEY].emulator_fault_reruns, _host_lost)
    config.stash[_VERDICTS_KEY] = verdicts
    config.pluginmanager.register(verdicts, "nested-xen-verdicts")
    incidents.set_classifier(lambda incident: _classify(issues, incident))
    _register_stages(config, artifacts)
    if config.getoption("--print-config"):
        import dataclasses
        import json

        cfg = config.stash[_CFG_KEY]
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


_CFG_KEY = pytest.StashKey[RunConfig]()
_ISSUES_KEY = pytest.StashKey[list]()
_VERDICTS_KEY = pytest.StashKey[VerdictPlugin]()
_STARTED_KEY = pytest.StashKey[float]()
# image -> the booted host's facts, for classifying incidents found outside a check
# (early boot, between checks) against known_issues.yaml's guest-death entries.
FACTS_BY_IMAGE: dict[str, object] = {}


def _classify(issues: list, incident: incidents.Incident) -> str | None:
    facts = FACTS_BY_IMAGE.get(incident.image)
    if facts is None:
        return None
    fault = emulator_fault(issues, incident.guest_type or None, facts, incident.text())
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
    cfg = metafunc.config.stash[_CFG_KEY]
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
    item.stash.setdefault(OUTCOME_KEY, {})[report.when] = report
    return report


# (module, image) -> the incident of a host lost during one of the module's checks (it
# failed and dom0 no longer answered). Seen here: an L1 froze for good during a PVH
# guest's localhost migration under TCG nested SVM. The module's later checks on it fail
# naming that incident (never a blanket expected failure); the next module gets a fresh
# host (xen_host's health check).
LOST_HOSTS: dict[tuple[str, str], incidents.Incident] = {}
SERIAL_TAIL_LINES = 60


def _lost_key(node: pytest.Item) -> tuple[str, str] | None:
    """(module, image) of a check that runs on a host image; None for any other test."""
    callspec = getattr(node, "callspec", None)
    image = callspec.params.get("host_image_name") if callspec is not None else None
    module = getattr(getattr(node, "module", None), "__name__", None)
    return (module, image) if image and module else None


def _host_lost(item: pytest.Item, report: pytest.TestReport) -> incidents.Incident | None:
    """After a failed check: an incident (subject host, with its serial tail) if dom0
    stopped answering; None while it answers."""
    host = (item.funcargs or {}).get("xen_host") if hasattr(item, "funcargs") else None
    key = _lost_key(item)
    if host is None or key is None or key in LOST_HOSTS or _healthy(host):
        return None
    try:
        serial = "\n".join(host.machine.read_serial().splitlines()[-SERIAL_TAIL_LINES:])
    except Exception as exc:  # noqa: BLE001 - the serial log is evidence, not a must
        serial = f"(serial log unreadable: {exc})"
    lost = incidents.record(incidents.Incident(
        "host", host.name, "during-check", image=key[1], nodeid=item.nodeid,
        detail="dom0 stopped answering (`xl list` over SSH)", evidence={"serial": serial}))
    LOST_HOSTS[key] = lost
    log.warning("%s stopped answering during %s; the rest of %s on it cannot run", host.name,
                item.nodeid, item.module.__name__)
    return lost


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A check whose module's host was lost by an earlier check does not try it: it fails
    naming that incident (whatever that check's outcome, never an expected failure)."""
    lost = LOST_HOSTS.get(_lost_key(item))
    if lost is None:
        return
    pytest.fail(f"{lost.name} stopped answering during {lost.nodeid} (incident: {lost.line()}); "
                "this check could not run on it; the next module gets a fresh host", pytrace=False)


def failed(request: pytest.FixtureRequest) -> bool:
    """Did the test owning ``request`` fail in setup or call?"""
    reports = request.node.stash.get(OUTCOME_KEY, {})
    return any(r.failed for r in reports.values())


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def nx_config(pytestconfig: pytest.Config) -> RunConfig:
    return pytestconfig.stash[_CFG_KEY]


@pytest.fixture(scope="session")
def artifacts_dir(nx_config: RunConfig) -> Path:
    path = nx_config.artifacts_dir.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


_METRICS_KEY = pytest.StashKey[MetricsSink]()


def _measurements(config: pytest.Config) -> list:
    """The run's metrics records so far (none before the ``metrics`` fixture ran);
    on the xdist controller, the workers' records merged into metrics.json."""
    sink = config.stash.get(_METRICS_KEY, None)
    if sink is None and _is_xdist_controller(config):
        sink = _merge_worker_metrics(config)
    return sink.records if sink is not None else []


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def _merge_worker_metrics(config: pytest.Config) -> MetricsSink | None:
    """Each xdist worker writes metrics-<worker>.json; the controller joins them."""
    from .metrics import MetricsSink, load

    artifacts = config.stash[_CFG_KEY].artifacts_dir
    parts = sorted(artifacts.glob("metrics-gw*.json"))
    if not parts:
        return None
    sink = MetricsSink(artifacts / "metrics.json")
    for part in parts:
        for record in load(part):
            sink.add(record)
    sink.write()
    config.stash[_METRICS_KEY] = sink
    return sink


@pytest.fixture(scope="session")
def metrics(pytestconfig: pytest.Config, artifacts_dir: Path):
    """The run's metrics sink: ``metrics.add(Record(...))``; written to artifacts/metrics.json
    (metrics-<worker>.json under xdist, joined by the controller at the end)."""
    from .metrics import MetricsSink

    worker = _worker()
    sink = MetricsSink(artifacts_dir / ("metrics.json" if worker == "main" else f"metrics-{worker}.json"))
    pytestconfig.stash[_METRICS_KEY] = sink
    return sink


def _run_incidents(config: pytest.Config) -> list[incidents.Incident]:
    """The run's incidents: this process's, or on the xdist controller the workers' merged."""
    if _is_xdist_controller(config):
        return incidents.merge(config.stash[_CFG_KEY].artifacts_dir, config.stash[_STARTED_KEY])
    return list(incidents.INCIDENTS)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Each process writes its incidents: incidents-<worker>.json (xdist) or incidents.json."""
    config = session.config
    if _is_xdist_controller(config) or _CFG_KEY not in config.stash:
        return
    worker = _worker()
    path = config.stash[_CFG_KEY].artifacts_dir / ("incidents.json" if worker == "main"
                                                   else f"incidents-{worker}.json")
    if incidents.INCIDENTS or worker != "main":
        incidents.write(path)
    else:
        path.unlink(missing_ok=True)  # no stale record of an earlier run's incidents


def _summarise_incidents(terminalreporter, config: pytest.Config) -> None:
    found = _run_incidents(config)
    verdicts = config.stash.get(_VERDICTS_KEY, None)
    if found:
        terminalreporter.section(f"nested-xen incidents: {len(found)} death(s) the harness did not cause")
        for incident in found:
            terminalreporter.write_line(incident.line())
        terminalreporter.write_line(f"incidents: {config.stash[_CFG_KEY].artifacts_dir / 'incidents.json'}")
    from .verdict import VERIFY_COST
    if VERIFY_COST["calls"]:
        terminalreporter.write_line(
            f"guest verification around checks: {VERIFY_COST['calls']} `xl list` calls, "
            f"{VERIFY_COST['seconds']:.1f} s in all (the time it adds to this run)")
    if verdicts is not None and verdicts.reruns:
        cap = config.stash[_CFG_KEY].emulator_fault_reruns
        terminalreporter.write_line(f"emulator-fault reruns: {len(verdicts.reruns)} of {cap} this run "
                                    "(1 per check): " + ", ".join(verdicts.reruns))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    _summarise_incidents(terminalreporter, config)
    _measurements(config)  # under xdist: join the workers' metrics first
    sink = config.stash.get(_METRICS_KEY, None)
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


@pytest.fixture(scope="session")
def provisioner(nx_config: RunConfig) -> Provisioner:
    from .guests import attach_pool, guest_payload_for

    def progress(line: str) -> None:
        log.info("%s", line)

    return Provisioner(nx_config, progress=progress, guest_payload=guest_payload_for(nx_config),
                       setup_guests=lambda host: attach_pool(_learn_facts(host), nx_config, create=True))


def _learn_facts(host: XenHost) -> XenHost:
    """Remember the host's facts by image before its shared guests are created, so an
    early-boot death among them is classified against known_issues.yaml's guest-death
    entries like any later one (incidents.record)."""
    image = getattr(getattr(host, "image", None), "name", "")
    if image and image not in FACTS_BY_IMAGE:
        try:
            FACTS_BY_IMAGE[image] = host.facts()
        except Exception as exc:  # noqa: BLE001 - unclassified then, as before; the check gates say more
            log.warning("%s: facts not read before its shared guests: %s", host.name, exc)
    return host


@pytest.fixture(scope="session")
def host_image_name(request: pytest.FixtureRequest) -> str:
    return request.param


class HostLease:
    """The session's host for one image, replaced when a check leaves it unhealthy."""

    def __init__(self, make: Callable[[], XenHost],
                 expected: Callable[[Exception], str | None] = lambda exc: None) -> None:
        self._make = make
        self._expected = expected
        self.host: XenHost | None = None
        self.failure: str | None = None
        self.expected_failure: str | None = None

    def get(self) -> XenHost:
        """The host; a host that failed to come up fails every later user at once (or,
        when a known issue says it cannot boot, makes each an expected failure)."""
        if self.expected_failure:
            pytest.xfail(self.expected_failure)
        if self.failure:
            pytest.fail(f"the host could not be provided earlier in this run: {self.failure}",
                        pytrace=False)
        if self.host is None:
            try:
                self.host = self._make()
            except Exception as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                self.expected_failure = self._expected(exc)
                if self.expected_failure:
                    pytest.xfail(self.expected_failure)
                raise
        return self.host

    def replace(self) -> None:
        self.release()
        self.host = None

    def release(self) -> None:
        if self.host is not None:
            self.host.stop()


@pytest.fixture(scope="session")
def _host_lease(provisioner: Provisioner, host_image_name: str, artifacts_dir: Path,
                pytestconfig: pytest.Config) -> Iterator[HostLease]:
    counter = iter(range(1000))

    def make() -> XenHost:
        label = f"{host_image_name}-{_worker()}-{next(counter)}"
        return _with_pool(provisioner.host(host_image_name, label, artifacts_dir / "hosts" / label),
                          provisioner)

    issues = pytestconfig.stash[_ISSUES_KEY]
    lease = HostLease(make, lambda exc: expected_boot_failure(provisioner, host_image_name, exc, issues))
    try:
        yield lease
    finally:
        lease.release()


@pytest.fixture(scope="module")
def xen_host(request: pytest.FixtureRequest, _host_lease: HostLease, provisioner: Provisioner,
             host_image_name: str, artifacts_dir: Path) -> Iterator[XenHost]:
    """A booted Xen host with dom0 answering; fresh per module when the module asks."""
    fresh = any(spec_of(item).fresh_host for item in _module_items(request))
    if fresh:
        label = f"{host_image_name}-{_worker()}-{request.module.__name__.rsplit('.', 1)[-1]}"
        try:
            host = _with_pool(provisioner.host(host_image_name, label, artifacts_dir / "hosts" / label),
                              provisioner)
        except Exception as exc:
            reason = expected_boot_failure(provisioner, host_image_name, exc,
                                           request.config.stash[_ISSUES_KEY])
            if reason:
                pytest.xfail(reason)
            raise
        try:
            yield host
        finally:
            host.stop()
        return
    host = _host_lease.get()
    yield host
    # A host already found lost during one of the module's checks is not probed again.
    if (request.module.__name__, host_image_name) in LOST_HOSTS or not _healthy(host):
        log.warning("%s is unhealthy after %s; the next module gets a fresh host",
                    host.name, request.module.__name__)
        _host_lease.replace()


def expected_boot_failure(provisioner: Provisioner, image_name: str, exc: Exception,
                          issues: list) -> str | None:
    """The reason, when a known issue (``check: boot``) says this host cannot come up and
    the failure (its message or the serial log) shows that issue; else None."""
    from .host import image_facts, qemu_for
    from .known_issues import boot_issue
    from .machines.qemu import qemu_version_label

    try:
        recipe, image = provisioner.image(image_name)
        cfg = getattr(provisioner, "cfg", None)
        # The QEMU this host would run on: the recipe may need another than the run's.
        qemu = qemu_version_label(qemu_for(recipe, cfg, provisioner.accel)) if cfg is not None else "0"
        facts = image_facts(recipe, image, provisioner.accel.accel, qemu)
    except Exception:  # noqa: BLE001 - no image, no prediction: the real error stands
        return None
    text = str(exc)
    log_path = getattr(exc, "log_path", None)
    if log_path is not None and Path(log_path).is_file():
        text += "\n" + Path(log_path).read_text(errors="replace")
    issue = boot_issue(issues, facts, text)
    if issue is None:
        return None
    where = f"Xen {facts.xen_version}, {facts.dom0_mode.upper()} dom0, {facts.accel}"
    return f"expected failure ({where}): {issue.reason}" + (f" ({issue.link})" if issue.link else "")


def _with_pool(host: XenHost, provisioner: Provisioner) -> XenHost:
    from .guests import attach_pool

    attach_pool(_learn_facts(host), provisioner.cfg, create=False)
    return host


def _module_items(request: pytest.FixtureRequest) -> list[pytest.Item]:
    session = request.session
    return [i for i in session.items if getattr(i, "module", None) is request.module]


def _healthy(host: XenHost) -> bool:
    try:
        return host.remote.run("xl list >/dev/null", timeout=30).rc == 0
    except Exception:  # noqa: BLE001 - any failure means unhealthy
        return False


@pytest.fixture
def peer_host(xen_host: XenHost, provisioner: Provisioner, host_image_name: str,
              artifacts_dir: Path, nx_config: RunConfig) -> Iterator[XenHost]:
    """A second L1 from the same image, linked to ``xen_host`` by a private network
    (a UDP socket pair on 127.0.0.1 that only the two QEMUs use): dom0s at
    ``LINK_NET.1`` (xen_host) and ``LINK_NET.2`` (the peer). Restored from the same
    snapshot when there is one; its copies of the shared guests are destroyed."""
    label = f"{host_image_name}-{_worker()}-peer"
    started = time.monotonic()
    steps: dict[str, float] = {}

    def step(name: str) -> None:
        steps[name] = time.monotonic() - started - sum(steps.values())

    with contextlib.ExitStack() as stack:
        # xen_host's guests wait, paused, while the peer comes up: see Xl.guests_paused.
        with xen_host.xl.guests_paused():
            step("pause")
            peer = provisioner.host(host_image_name, label, artifacts_dir / "hosts" / label,
                                    link_to=xen_host)
            stack.callback(peer.stop)
            step("host")
            peer.xl.destroy_all_guests()
            step("destroy_guests")
        xen_host.link_up(1)
        address = peer.link_up(2)
        step("link_up")
        if nx_config.migration.transport == "ssh":
            # What `xl migrate` itself needs then: dom0 logging in to the peer's dom0.
            probe = f"ssh -o ConnectTimeout=20 root@{address} true"
        else:  # a TCP connection over the link, without an SSH handshake under TCG
            probe = (f"python3 -c 'import socket; socket.create_connection((\"{address}\", 22), 20)"
                     f".recv(64)'")
        reach = xen_host.remote.run(probe, timeout=90)
        if reach.rc != 0:
            raise RuntimeError(f"dom0 of {xen_host.name} cannot reach the peer's dom0 at {address} "
                               f"over the private link: {reach.stdout}{reach.stderr}")
        step("reach")
        log.info("[%s] peer ready in %.1f s (%s)", label, time.monotonic() - started,
                 ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
        yield peer


@pytest.fixture(scope="module")
def host_facts(xen_host: XenHost):
    return xen_host.facts()


@pytest.fixture(scope="module")
def xl(xen_host: XenHost):
    return xen_host.xl


@pytest.fixture(scope="module")
def dom0(xen_host: XenHost):
    """A testinfra host for dom0."""
    return xen_host.remote.testinfra_host()


@pytest.fixture(scope="module")
def agent(xen_host: XenHost):
    """The dom0 agent (privcmd calls) on this host."""
    from .agent.client import Agent

    return Agent(xen_host.remote.as_runner())


@pytest.fixture(autouse=True)
def _nx_gate(request: pytest.FixtureRequest) -> None:
    """Skip a check, with the reason, when the booted host is out of its declared range."""
    if request.node.get_closest_marker(MARKER) is None:
        return
    if not set(request.fixturenames) & HOST_FIXTURES:
        return
    facts = request.getfixturevalue("host_facts")
    request.node.stash[FACTS_KEY] = facts
    FACTS_BY_IMAGE[request.getfixturevalue("host_image_name")] = facts
    request.node.user_properties.extend(p for p in host_properties(facts)
                                        if p not in request.node.user_properties)  # a rerun: once
    _stale_boot_issue(request, facts)
    kind = request.node.callspec.params.get("guest_type") if hasattr(request.node, "callspec") else None
    reason = spec_of(request.node).skip_reason(facts, kind)
    if not reason and kind == "hvm" and getattr(facts, "device_model", None) == "":
        from .inputs import NO_DEVICE_MODEL

        reason = NO_DEVICE_MODEL.format(origin=facts.origin)
    if reason:
        pytest.skip(reason)
    # Known issues are decided once the check has run, by its evidence: harness/verdict.py.


@pytest.fixture(autouse=True)
def _nx_alive(request: pytest.FixtureRequest, _nx_gate: None) -> None:
    """A check's guest is alive and is the domain the harness created: one `xl list`
    (skipped when the previous check verified it moments ago); a dead one is an
    incident and is created again in place (harness/verdict.py: verify_before)."""
    if request.node.get_closest_marker(MARKER) is None:
        return
    if not {"guest", "own_guest"} & set(request.fixturenames):
        return
    agent = request.getfixturevalue("agent")
    verify_before(request.node, request, agent.p2m, request.getfixturevalue("nx_config").timeouts.guest_ready)


_STALE_BOOT_REPORTED: set[str] = set()


def _stale_boot_issue(request: pytest.FixtureRequest, facts) -> None:
    """A host that a strict ``check: boot`` known issue says cannot come up did: fail the
    first check on it (like a strict XPASS) so the entry gets removed."""
    from .known_issues import boot_issue

    issue = boot_issue(request.config.stash[_ISSUES_KEY], facts)
    host = request.getfixturevalue("xen_host").name
    if issue is None or issue.flaky or host in _STALE_BOOT_REPORTED:
        return
    _STALE_BOOT_REPORTED.add(host)
    pytest.fail(f"[XPASS(strict)] known boot issue did not happen, {host} came up: {issue.reason} "
                "-- remove its `check: boot` entry from known_issues.yaml", pytrace=False)


_check_id = check_id  # ``plugins/FILE.py::test_name``: harness/verdict.py


@pytest.fixture
def defer(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``defer(fn, *args)`` runs ``fn(*args)`` at teardown, even when the test failed."""

    def add(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        request.addfinalizer(lambda: fn(*args, **kwargs))

    return add


@pytest.fixture(autouse=True)
def _nx_artifacts(request: pytest.FixtureRequest, artifacts_dir: Path) -> Iterator[None]:
    """On failure keep the serial log tail and `xl dmesg` beside the test's name."""
    yield
    if not failed(request) or "xen_host" not in request.fixturenames:
        return
    host: XenHost = request.getfixturevalue("xen_host")
    dest = artifacts_dir / "failures" / _safe(request.node.nodeid)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        (dest / "serial.log").write_text(host.machine.read_serial())
        (dest / "xl-dmesg.txt").write_text(host.xl.dmesg())
    except Exception as exc:  # noqa: BLE001 - artifacts must not mask the failure
        (dest / "artifact-error.txt").write_text(f"{time.ctime()}: {exc}\n")


def _safe(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", nodeid)[-150:]


# Guest fixtures live in harness/guests.py and are registered here.
from .guests import guest, guest_type, own_guest  # noqa: E402,F401
