"""Known issues: one versioned file, each entry a strict expected failure where it applies.

An entry names a check (``plugins/FILE.py::test_name``), optionally the guest
types, Xen and dom0-kernel version ranges (PEP 440 specifiers against what the
booted host reports), dom0 modes, accelerators and QEMU versions it applies to, with the reason
and a link. A matching test is marked ``xfail(strict=True)``: while the issue
stands the run shows it as XFAIL with the reason; once fixed, the XPASS fails
the run so the entry gets removed instead of hiding a fix. An entry marked
``flaky: true`` (the fault is intermittent) is a non-strict xfail: its XPASS
is shown in the summary but does not fail the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from .config import REPO_ROOT, ConfigError
from .plugins import version_of

KNOWN_ISSUES = REPO_ROOT / "known_issues.yaml"
KEYS = {"check", "guests", "xen", "kernel", "dom0", "accel", "qemu", "reason", "link", "flaky", "console",
        "signature"}
# The check name of an entry about the host itself not coming up (Xen or dom0 does
# not boot): it is matched against what the image and the run say (Xen version from
# the image's Xen file, dom0 mode, accelerator) since the host never reports, and its
# `console:` pattern must appear in the failure or the serial log. Every check on that
# host is then an expected failure with the reason; a host that boots fine fails the
# first check that uses it, so the stale entry gets removed.
BOOT_CHECK = "boot"


@dataclass(frozen=True)
class KnownIssue:
    check: str
    reason: str
    link: str = ""
    guests: tuple[str, ...] = ()
    xen: SpecifierSet | None = None
    kernel: SpecifierSet | None = None
    dom0: tuple[str, ...] = ()
    accel: tuple[str, ...] = ()
    qemu: SpecifierSet | None = None  # the L1's QEMU version: TCG's nested SVM faults are QEMU's
    flaky: bool = False  # an intermittent fault cannot be a strict xfail: it would XPASS at random
    console: re.Pattern[str] | None = None  # boot entries: what the failure or serial log shows
    # What the failure shows, decided when the check has run: a failure without it is a
    # plain failure; a pass is an XPASS (strict unless flaky).
    signature: re.Pattern[str] | None = None

    def applies(self, check: str, guest_type: str | None, facts: Any) -> bool:
        if check != self.check:
            return False
        if self.guests and guest_type not in self.guests:
            return False
        if self.xen is not None and not self.xen.contains(version_of(facts.xen_version), True):
            return False
        if self.kernel is not None and not self.kernel.contains(version_of(facts.kernel_release), True):
            return False
        if self.dom0 and facts.dom0_mode not in self.dom0:
            return False
        if self.qemu is not None and not self.qemu.contains(
                version_of(getattr(facts, "qemu_version", "0")), True):
            return False
        return not (self.accel and facts.accel not in self.accel)

    def describe(self) -> str:
        return f"known issue: {self.reason}" + (f" ({self.link})" if self.link else "")

    def seen_in(self, text: str) -> bool:
        """Does a failure's text show this issue (always, without a ``console:`` or
        ``signature:`` pattern)?"""
        pattern = self.console or self.signature
        return pattern is None or pattern.search(text) is not None


def _tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _regex(entry: dict, key: str, where: str) -> re.Pattern[str] | None:
    try:
        return re.compile(entry[key]) if entry.get(key) else None
    except re.error as exc:
        raise ConfigError(f"{where}: {key}: not a regular expression: {exc}") from None


def load_known_issues(path: Path = KNOWN_ISSUES) -> list[KnownIssue]:
    if not path.exists():
        return []
    data = yaml.safe_load(path.read_text()) or []
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of entries")
    issues = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = set(entry) - KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(KEYS)}")
        for key in ("check", "reason"):
            if not entry.get(key):
                raise ConfigError(f"{where}: `{key}` is required")
        try:
            xen = SpecifierSet(entry["xen"]) if entry.get("xen") else None
            kernel = SpecifierSet(entry["kernel"]) if entry.get("kernel") else None
            qemu = SpecifierSet(entry["qemu"]) if entry.get("qemu") else None
        except InvalidSpecifier as exc:
            raise ConfigError(f"{where}: {exc}") from None
        console, signature = (_regex(entry, key, where) for key in ("console", "signature"))
        issues.append(KnownIssue(
            check=entry["check"], reason=entry["reason"], link=entry.get("link", ""),
            guests=_tuple(entry.get("guests")), xen=xen, kernel=kernel,
            dom0=_tuple(entry.get("dom0")), accel=_tuple(entry.get("accel")), qemu=qemu,
            flaky=bool(entry.get("flaky", False)), console=console, signature=signature,
        ))
    return issues


def match(issues: list[KnownIssue], check: str, guest_type: str | None, facts: Any) -> KnownIssue | None:
    return next((i for i in issues if i.applies(check, guest_type, facts)), None)


def boot_issue(issues: list[KnownIssue], facts: Any, failure: str | None = None) -> KnownIssue | None:
    """The ``check: boot`` entry for a host with these facts; with ``failure`` (the
    error and serial log of a host that did not come up), only one whose ``console:``
    pattern it shows."""
    for issue in issues:
        if issue.applies(BOOT_CHECK, None, facts) and (failure is None or issue.seen_in(failure)):
            return issue
    return None
