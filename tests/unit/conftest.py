"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def restore_process_state() -> Iterator[None]:
    """cli.main() installs a SIGTERM handler and may configure logging: undo both.
    Modules that call main() use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    signal.signal(signal.SIGTERM, handler)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_incidents_left() -> Iterator[None]:
    """In-process pytest runs (pytester) record incidents in the harness's module list:
    none may leak into the next test or the outer run's summary."""
    from harness import incidents

    yield
    incidents.clear()
    incidents.set_classifier(None)


@pytest.fixture(scope="session")
def probe_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest probe (images/guests/probe.c) compiled as the payload builds it."""
    from harness.guest_payload import PROBE_SOURCE, GuestPayloadError, compile_probe

    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    out = tmp_path_factory.mktemp("probe") / "probe"
    try:
        compile_probe(PROBE_SOURCE, out)
    except GuestPayloadError as exc:
        if "cannot find -lc" in str(exc):
            pytest.skip("static libc missing (apt-get install libc6-dev)")
        raise
    return out
