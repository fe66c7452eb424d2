"""A forced emulator fault for `nested-xen bisect --force-fault REV` (a pytest plugin,
loaded with ``-p harness.bisect_fault`` only for that commit's runs).

Once per run, right after the call of the first check that uses a guest, the guest is
reset from dom0 (``xl sysrq <guest> b``: the kernel prints "sysrq: Resetting" on its
console and ``on_reboot = "destroy"`` removes it), as tests/e2e/test_verdicts.py does.
The run's known-issues file (written by harness/bisect.py: the repository's plus
:data:`ENTRY`) names that reset as a guest-death emulator fault, so the verdict layer
itself sees a guest die during the check, matches the signature on that domain's own
console, and reruns the check on a fresh guest: the result is "passed after emulator
fault" (or a failure carrying the emulator incident), never a plain pass. Nothing here
writes an outcome. What was done is written to $NX_BISECT_FAULT_REPORT (JSON), so the
bisect can say whether the fault was injected.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from harness import timeouts as t

REPORT_ENV = "NX_BISECT_FAULT_REPORT"
SIGNATURE = r"(?i)sysrq.{0,3}resetting"
ENTRY = {
    "check": "guest-death",
    "evidence": ["console"],
    "signature": SIGNATURE,
    "reason": "forced by `nested-xen bisect --force-fault` (xl sysrq <guest> b after the check's call)",
}
DEAD_WITHIN_S = 120.0

_DONE: dict[str, Any] = {}


def _report(data: dict[str, Any]) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    _DONE.clear()
    _report({"injected": False, "why": "no selected check used a guest"})


def reset(guest: Any, timeout: float = DEAD_WITHIN_S) -> None:
    """``xl sysrq <guest> b``, then wait until the domain is gone or crashed."""
    guest.xl.remote.run_expect(f"xl sysrq {guest.name} b", timeout=t.SMALL_COMMAND_S)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dom = guest.xl.domain(guest.name)
        if dom is None or dom.crashed:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{guest.name} did not die within {timeout:.0f} s of `xl sysrq b`")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    try:
        return (yield)
    finally:
        if not _DONE:
            _inject(item)


def _inject(item: pytest.Item) -> None:
    from .verdict import guests_of

    guests = guests_of(item)
    if not guests:
        return
    guest = guests[0]
    _DONE["nodeid"] = item.nodeid
    try:
        reset(guest)
    except Exception as exc:  # noqa: BLE001 - said in the report; the verdict layer judges the rest
        _report({"injected": False, "nodeid": item.nodeid, "guest": guest.name, "why": str(exc)[:300]})
        return
    _report({"injected": True, "nodeid": item.nodeid, "guest": guest.name,
             "domid": getattr(guest, "domid", None)})
