"""Known issues: one versioned file; an entry is versions *and* a signature.

An entry names a check (``plugins/FILE.py::test_name``, ``boot``, ``guest-death``
or ``host-death``), optionally the guest types, Xen and dom0-kernel version ranges
(PEP 440 specifiers against what the booted host reports), dom0 modes,
accelerators and QEMU versions it applies to, the reason and a link, and a
required ``signature:``: a regular expression over the evidence (the check's
failure text, the dead domain's ``xl dmesg`` lines, its console, the serial
tail). The decision is taken when the check has run (harness/pytest_plugin.py,
at report time): a failure whose versions match an entry *and* whose evidence
shows its signature is an expected failure with the reason; one whose versions
match but whose evidence lacks the signature stays a failure, and its report
names the entry considered. A strict entry (not ``flaky: true``) whose check
passes fails the run (XPASS(strict)) so the entry gets removed.

``guest-death`` entries are not about one check: they say which deaths of a
guest are emulator faults (rerun once on a fresh guest) rather than a failure of
the check that saw them; ``host-death`` entries say the same of dom0 dying under a
check (the host lost).
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
KEYS = {"check", "guests", "xen", "kernel", "dom0", "accel", "qemu", "reason", "link", "flaky", "signature",
        "console"}  # console: the old name of a boot entry's signature, still accepted
# The check name of an entry about the host itself not coming up (Xen or dom0 does
# not boot): it is matched against what the image and the run say (Xen version from
# the image's Xen file, dom0 mode, accelerator) since the host never reports, and its
# signature must appear in the failure or the serial log. Every check on that
# host is then an expected failure with the reason; a host that boots fine fails the
# first check that uses it, so the stale entry gets removed.
BOOT_CHECK = "boot"
# The check name of an entry about a guest's (or host's) death that is not tied to
# one check: its signature decides whether a death is an emulator fault (the check
# that saw it is run again on a fresh guest) or a plain failure.
GUEST_DEATH = "guest-death"
# The check name of an entry about dom0 dying under a check (the host lost): its signature
# over the host's serial tail decides whether that death is an emulator fault. The check
# it happened under is then an expected failure (its result is unknown, not wrong) and the
# module's later checks on that host are skipped as not run; without a match the check
# fails and so do the later ones, naming the incident.
HOST_DEATH = "host-death"
SPECIAL_CHECKS = (BOOT_CHECK, GUEST_DEATH, HOST_DEATH)


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
    signature: re.Pattern[str] | None = None  # what the evidence of this issue shows

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
        """Does this evidence (failure text, dmesg lines, console, serial) show the signature?"""
        return self.signature is None or self.signature.search(text) is not None

    def label(self) -> str:
        """How reports name the entry: its check, scope and signature."""
        scope = ",".join(self.guests) if self.guests else "any guest"
        versions = " ".join(f"{k} {v}" for k, v in (("xen", self.xen), ("qemu", self.qemu)) if v is not None)
        pattern = self.signature.pattern if self.signature is not None else ""
        return f"{self.check} [{scope}{', ' + versions if versions else ''}] /{pattern}/"


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
        where = f"{where} ({entry['check']})"
        if "signature" in entry and "console" in entry:
            raise ConfigError(f"{where}: give `signature` only (`console` is its old name)")
        pattern = entry.get("signature", entry.get("console"))
        if not pattern:
            raise ConfigError(f"{where}: `signature` is required: a regular expression that the "
                              "evidence of this issue shows (the failure text, the dead domain's "
                              "xl dmesg lines, its console or the serial log), e.g. 'Triple fault'")
        try:
            xen = SpecifierSet(entry["xen"]) if entry.get("xen") else None
            kernel = SpecifierSet(entry["kernel"]) if entry.get("kernel") else None
            qemu = SpecifierSet(entry["qemu"]) if entry.get("qemu") else None
        except InvalidSpecifier as exc:
            raise ConfigError(f"{where}: {exc}") from None
        try:
            signature = re.compile(str(pattern))
        except re.error as exc:
            raise ConfigError(f"{where}: signature: not a regular expression: {exc}") from None
        name = str(entry["check"])
        if name not in SPECIAL_CHECKS and not (name.startswith("plugins/") and "::test" in name):
            raise ConfigError(f"{where}: check: expected plugins/FILE.py::test_name or one of "
                              f"{', '.join(SPECIAL_CHECKS)} (an entry no check can match is a typo)")
        issues.append(KnownIssue(
            check=entry["check"], reason=entry["reason"], link=entry.get("link", ""),
            guests=_tuple(entry.get("guests")), xen=xen, kernel=kernel,
            dom0=_tuple(entry.get("dom0")), accel=_tuple(entry.get("accel")), qemu=qemu,
            flaky=bool(entry.get("flaky", False)), signature=signature,
        ))
    return issues


def match(issues: list[KnownIssue], check: str, guest_type: str | None, facts: Any) -> KnownIssue | None:
    """The first entry whose versions (and scope) match, whatever the evidence."""
    return next((i for i in issues if i.applies(check, guest_type, facts)), None)


@dataclass(frozen=True)
class Decision:
    """What known_issues.yaml says about one failure: the entry matched (versions and
    signature), and the entries whose versions matched but whose signature was absent."""

    matched: KnownIssue | None
    considered: tuple[KnownIssue, ...] = ()

    def note(self) -> str:
        """For the report of a failure that stays a failure although entries were considered."""
        return "\n".join(f"known issue considered: {i.label()}: versions match, but its signature is "
                         f"absent from the evidence, so this is not that issue ({i.reason})"
                         for i in self.considered)


def decide(issues: list[KnownIssue], check: str, guest_type: str | None, facts: Any,
           evidence: str) -> Decision:
    """The entry for ``check`` whose versions match and whose signature ``evidence`` shows."""
    applicable = [i for i in issues if i.applies(check, guest_type, facts)]
    matched = next((i for i in applicable if i.seen_in(evidence)), None)
    return Decision(matched, tuple(i for i in applicable if i is not matched) if matched is None else ())


def emulator_fault(issues: list[KnownIssue], guest_type: str | None, facts: Any,
                   evidence: str, check: str | None = None) -> KnownIssue | None:
    """The ``guest-death`` entry (or, given ``check``, that check's own entry) whose versions
    match and whose signature this death's evidence shows: an emulator fault."""
    for name in (GUEST_DEATH, check):
        if name is None:
            continue
        found = decide(issues, name, guest_type, facts, evidence).matched
        if found is not None:
            return found
    return None


def boot_issue(issues: list[KnownIssue], facts: Any, failure: str | None = None) -> KnownIssue | None:
    """The ``check: boot`` entry for a host with these facts; with ``failure`` (the
    error and serial log of a host that did not come up), only one whose signature it shows."""
    for issue in issues:
        if issue.applies(BOOT_CHECK, None, facts) and (failure is None or issue.seen_in(failure)):
            return issue
    return None
