"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

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
