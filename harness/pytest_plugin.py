"""The pytest plugin: options, fixtures, markers, gating and artifacts.

Fixtures are a ladder, one guarantee per step::

    nx_config -> provisioner -> xen_host (Xen booted, dom0 answered) -> dom0 / xl / agent
              -> guest[pv|pvh|hvm] (probe ready)

``xen_host`` is parametrized over the run's host images (session scope, one
L1 per image). A module whose checks declare ``fresh_host=True`` gets its own
host, restored from the L1 snapshot. Markers ``e2e``, ``pv``, ``pvh``, ``hvm``
and one per image are derived from fixture names and parameters at collection.
On failure the serial log, `xl dmesg` and guest consoles are kept.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .config import ConfigError, RunConfig, load_run_config
from .host import XenHost
from .known_issues import load_known_issues, match
from .metrics import MetricsSink
from .plugins import GUEST_TYPES, MARKER, PluginError, spec_of
from .provision import Provisioner

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
    group.addoption("--print-config", action="store_true", help="print the effective config and exit")


def _build_config(config: pytest.Config) -> RunConfig:
    opt = config.getoption
    path = opt("--nx-config")
    cfg = load_run_config(Path(path) if path else None)
    images = opt("--host-image")
    if images:
        images = tuple(n.strip() for arg in images for n in arg.split(",") if n.strip())
    return cfg.with_overrides(
        host_images=images or None,
        backend=opt("--backend"), accel=opt("--accel"), dom0=opt("--dom0"),
        artifacts_dir=Path(opt("--artifacts-dir")) if opt("--artifacts-dir") else None,
        cache_dir=Path(opt("--cache-dir")) if opt("--cache-dir") else None,
        mirror=opt("--mirror"), snapshot=opt("--snapshot"), rebuild=opt("--rebuild"),
        memory_mb=opt("--memory-mb"),
    )


def pytest_configure(config: pytest.Config) -> None:
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
        config.stash[_ISSUES_KEY] = load_known_issues()
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    if config.getoption("--print-config"):
        import dataclasses
        import json

        cfg = config.stash[_CFG_KEY]
        print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        pytest.exit("printed the effective configuration", returncode=0)


_CFG_KEY = pytest.StashKey[RunConfig]()
_ISSUES_KEY = pytest.StashKey[list]()


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: pytest tears fixtures down, so VMs and guests go."""
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------- collection


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = metafunc.config.stash[_CFG_KEY]
    names = set(metafunc.fixturenames)
    if names & HOST_FIXTURES:
        metafunc.parametrize("host_image_name", list(cfg.host_images), indirect=True,
                             scope="session", ids=[f"img={n}" for n in cfg.host_images])
    if "guest_type" in names:
        try:
            spec = spec_of(metafunc.definition)
        except PluginError as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("guest_type", list(spec.guests), indirect=True,
                             scope=_guest_scope(metafunc), ids=list(spec.guests))


def _guest_scope(metafunc: pytest.Metafunc) -> str:
    """Module scope lets a module's checks share a guest; a fresh-host module is function-scoped."""
    return "module"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    item.stash.setdefault(OUTCOME_KEY, {})[report.when] = report
    return report


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


@pytest.fixture(scope="session")
def metrics(pytestconfig: pytest.Config, artifacts_dir: Path):
    """The run's metrics sink: ``metrics.add(Record(...))``; written to artifacts/metrics.json."""
    from .metrics import MetricsSink

    sink = MetricsSink(artifacts_dir / "metrics.json")
    pytestconfig.stash[_METRICS_KEY] = sink
    return sink


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    from .guests import EARLY_BOOT_CRASHES

    if EARLY_BOOT_CRASHES:
        import json

        terminalreporter.section("guests that died in early boot and were created again")
        for event in EARLY_BOOT_CRASHES:
            first = event["error"].splitlines()[0]
            triple = "triple fault" if "Triple fault" in event["error"] else "no Xen message"
            terminalreporter.write_line(f"{event['guest']} ({event['type']}): {triple}: {first}")
        path = config.stash[_CFG_KEY].artifacts_dir / "guest_boot_crashes.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(EARLY_BOOT_CRASHES, indent=2) + "\n")
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
                       setup_guests=lambda host: attach_pool(host, nx_config, create=True))


@pytest.fixture(scope="session")
def host_image_name(request: pytest.FixtureRequest) -> str:
    return request.param


class HostLease:
    """The session's host for one image, replaced when a check leaves it unhealthy."""

    def __init__(self, make: Callable[[], XenHost]) -> None:
        self._make = make
        self.host: XenHost | None = None
        self.failure: str | None = None

    def get(self) -> XenHost:
        """The host; a host that failed to come up fails every later user at once."""
        if self.failure:
            pytest.fail(f"the host could not be provided earlier in this run: {self.failure}",
                        pytrace=False)
        if self.host is None:
            try:
                self.host = self._make()
            except Exception as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                raise
        return self.host

    def replace(self) -> None:
        self.release()
        self.host = None

    def release(self) -> None:
        if self.host is not None:
            self.host.stop()


@pytest.fixture(scope="session")
def _host_lease(provisioner: Provisioner, host_image_name: str, artifacts_dir: Path) -> Iterator[HostLease]:
    counter = iter(range(1000))

    def make() -> XenHost:
        label = f"{host_image_name}-{_worker()}-{next(counter)}"
        return _with_pool(provisioner.host(host_image_name, label, artifacts_dir / "hosts" / label),
                          provisioner)

    lease = HostLease(make)
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
        host = _with_pool(provisioner.host(host_image_name, label, artifacts_dir / "hosts" / label),
                          provisioner)
        try:
            yield host
        finally:
            host.stop()
        return
    host = _host_lease.get()
    yield host
    if not _healthy(host):
        log.warning("%s is unhealthy after %s; the next module gets a fresh host",
                    host.name, request.module.__name__)
        _host_lease.replace()


def _with_pool(host: XenHost, provisioner: Provisioner) -> XenHost:
    from .guests import attach_pool

    attach_pool(host, provisioner.cfg, create=False)
    return host


def _module_items(request: pytest.FixtureRequest) -> list[pytest.Item]:
    session = request.session
    return [i for i in session.items if getattr(i, "module", None) is request.module]


def _healthy(host: XenHost) -> bool:
    try:
        return host.remote.run("xl list >/dev/null", timeout=30).rc == 0
    except Exception:  # noqa: BLE001 - any failure means unhealthy
        return False


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
    reason = spec_of(request.node).skip_reason(facts)
    if reason:
        pytest.skip(reason)
    issue = match(request.config.stash[_ISSUES_KEY], _check_id(request.node),
                  request.node.callspec.params.get("guest_type")
                  if hasattr(request.node, "callspec") else None, facts)
    if issue:
        request.applymarker(pytest.mark.xfail(strict=not issue.flaky, reason=issue.describe()))


def _check_id(item: pytest.Item) -> str:
    """``plugins/FILE.py::test_name`` (no parameters), as known_issues.yaml names checks."""
    path = Path(str(item.path)).resolve()
    try:
        rel = path.relative_to(item.config.rootpath.resolve())
    except ValueError:
        rel = Path(path.name)
    return f"{rel.as_posix()}::{item.originalname if hasattr(item, 'originalname') else item.name}"


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
