"""Known issues: one versioned file; an entry is versions *and* a signature.

An entry names a check (``plugins/FILE.py::test_name``, ``boot``, ``guest-death``
or ``host-death``), optionally the guest types, Xen and dom0-kernel version ranges
(PEP 440 specifiers against what the booted host reports), dom0 modes,
accelerators, QEMU versions and guest paging modes (``paging: hap|shadow``, how a
PVH or HVM guest's memory is translated: never a PV guest's) it applies to, the reason and a link, and a
required ``signature:``: a regular expression over the evidence (the check's
failure text, the dead domain's ``xl dmesg`` lines, its console, the serial
tail). The decision is taken when the check has run (harness/pytest_plugin.py,
at report time): a failure whose versions match an entry *and* whose evidence
shows its signature is an expected failure with the reason; one whose versions
match but whose evidence lacks the signature stays a failure, and its report
names the entry considered. A strict entry (not ``flaky: true``) whose check
passes fails the run (XPASS(strict)) so the entry gets removed.

Each signature is matched on its own evidence: an entry's ``evidence:`` names the
kinds it reads (``failure``: the check's own assertion text, without what a check only
shows; ``dmesg``/``console``: the dead domain's own ``xl dmesg`` lines and console;
``serial``: a lost host's serial tail; ``device-model``/``toolstack``: the check's
guests' qemu-dm and xl logs). A host-wide tail is shown to the reader, never matched,
and a pattern that matches what a healthy run prints (harness/data/healthy/) is
rejected at load: it would match every failure.

A ``flaky: true`` entry records its measured ``rate:`` (``HITS/RUNS``, from the runs
that saw it); a fault that strikes every attempt of a check where that rate makes it
unlikely is a suspected regression, not an expected failure (:func:`chance`).

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

from .config import PAGING_MODES, REPO_ROOT, ConfigError
from .plugins import version_of

KNOWN_ISSUES = REPO_ROOT / "known_issues.yaml"
KEYS = {"check", "guests", "xen", "kernel", "dom0", "accel", "qemu", "device_model", "paging", "reason",
        "link", "flaky", "signature", "evidence", "rate",
        "console"}  # console: the old name of a boot entry's signature, still accepted
# What an entry's signature may be matched against (harness/verdict.py gathers each).
EVIDENCE_KINDS = ("failure", "dmesg", "console", "serial", "device-model", "toolstack")
# The evidence each kind of entry may read: a guest's death is judged on that domain's own
# lines and console, a host's on its serial tail; a boot entry on the boot error and serial.
ALLOWED_EVIDENCE = {"guest-death": ("dmesg", "console"), "host-death": ("serial",),
                    "boot": ("failure", "serial")}
# Healthy runs' serial logs and xl dmesg (no incident in them): no signature may match a line.
HEALTHY_DIR = Path(__file__).parent / "data" / "healthy"
# A suspected regression: the fault struck every attempt, and at the entry's measured
# rate that happens with a probability below this.
ALPHA = 0.05
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
    evidence: tuple[str, ...] = ("failure",)  # the EVIDENCE_KINDS the signature is matched on
    device_model: SpecifierSet | None = None  # the HVM device model's version (facts.device_model_version)
    rate: tuple[int, int] | None = None  # (hits, runs) measured for a flaky entry
    paging: tuple[str, ...] = ()  # the translated guests' paging (facts.paging): hap, shadow

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
        if not _within(self.qemu, getattr(facts, "qemu_version", None)):
            return False
        if not _within(self.device_model, getattr(facts, "device_model_version", None)):
            return False
        if self.paging and paging_of(guest_type, facts) not in self.paging:
            return False
        return not (self.accel and facts.accel not in self.accel)

    def probability(self, attempts: int) -> float | None:
        """How likely this flaky fault strikes ``attempts`` attempts in a row at its measured
        rate (Laplace's rule of succession, (hits+1)/(runs+2): an entry seen in 2 of 2 runs is
        0.75, not certain); None for an entry without a rate (a strict, deterministic one)."""
        if self.rate is None:
            return None
        hits, runs = self.rate
        return ((hits + 1) / (runs + 2)) ** attempts

    def describe(self) -> str:
        return f"known issue: {self.reason}" + (f" ({self.link})" if self.link else "")

    def seen_in(self, evidence: dict[str, str]) -> bool:
        """Does the evidence of the kinds this entry reads (``{kind: text}``) show its
        signature? Evidence of other kinds is never looked at."""
        if self.signature is None:
            return True
        return any(self.signature.search(evidence.get(kind) or "") for kind in self.evidence)

    def matched_line(self, evidence: dict[str, str]) -> str:
        """Where the signature was seen: ``kind: the line`` (for the reader of an expected failure)."""
        if self.signature is None:
            return ""
        for kind in self.evidence:
            for line in (evidence.get(kind) or "").splitlines():
                if self.signature.search(line):
                    return f"{kind}: {line.strip()[:240]}"
        found = next((k for k in self.evidence if self.signature.search(evidence.get(k) or "")), None)
        return f"{found}: (across lines)" if found else ""

    def label(self) -> str:
        """How reports name the entry: its check, scope and signature."""
        scope = ",".join(self.guests) if self.guests else "any guest"
        scopes = (("xen", self.xen), ("qemu", self.qemu), ("paging", ",".join(self.paging) or None))
        versions = " ".join(f"{k} {v}" for k, v in scopes if v is not None)
        pattern = self.signature.pattern if self.signature is not None else ""
        where = "+".join(self.evidence)
        return f"{self.check} [{scope}{', ' + versions if versions else ''}] /{pattern}/ in {where}"


def paging_of(guest_type: str | None, facts: Any) -> str:
    """The paging a guest of ``guest_type`` ran on (the host's ``facts.paging``; None: a
    check of no guest, on the host's mode): "" for a PV guest, which has neither, and
    where unknown, so that a paging-scoped entry never matches it."""
    return "" if guest_type == "pv" else str(getattr(facts, "paging", "") or "")


def _within(spec: SpecifierSet | None, version: str | None) -> bool:
    """Is ``version`` in ``spec``? An unknown version ("", "0", None) is in no range: an
    entry scoped to a QEMU or device model release never applies where it is not known."""
    if spec is None:
        return True
    if not version or version in ("0", "unknown"):
        return False
    try:
        return spec.contains(version_of(version), True)
    except Exception:  # noqa: BLE001 - an unreadable version is an unknown one
        return False


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
            device_model = SpecifierSet(entry["device_model"]) if entry.get("device_model") else None
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
        kinds = _evidence_kinds(entry, name, where)
        paging = _tuple(entry.get("paging"))
        if set(paging) - set(PAGING_MODES) or (entry.get("paging") is not None and not paging):
            raise ConfigError(f"{where}: paging: {entry.get('paging')!r}; give hap or shadow (or a list of "
                              "them): the paging of the PVH and HVM guests the issue strikes")
        rate = _rate(entry, where)
        _not_healthy(signature, where)
        issues.append(KnownIssue(
            check=entry["check"], reason=entry["reason"], link=entry.get("link", ""),
            guests=_tuple(entry.get("guests")), xen=xen, kernel=kernel,
            dom0=_tuple(entry.get("dom0")), accel=_tuple(entry.get("accel")), qemu=qemu,
            flaky=bool(entry.get("flaky", False)), signature=signature, evidence=kinds,
            device_model=device_model, rate=rate, paging=paging,
        ))
    return issues


def _evidence_kinds(entry: dict, name: str, where: str) -> tuple[str, ...]:
    kinds = _tuple(entry.get("evidence"))
    allowed = ALLOWED_EVIDENCE.get(name, EVIDENCE_KINDS)
    if not kinds:
        raise ConfigError(f"{where}: `evidence` is required: the evidence its signature is matched "
                          f"against, one or more of {', '.join(allowed)} (a host-wide tail is never "
                          "matched: it would match every failure)")
    bad = [k for k in kinds if k not in allowed]
    if bad:
        raise ConfigError(f"{where}: evidence {bad}: a {name if name in ALLOWED_EVIDENCE else 'check'} "
                          f"entry reads {', '.join(allowed)}")
    return kinds


def _rate(entry: dict, where: str) -> tuple[int, int] | None:
    raw = entry.get("rate")
    if raw is None:
        if entry.get("flaky"):
            raise ConfigError(f"{where}: a flaky entry needs `rate: HITS/RUNS`, how often the fault "
                              "struck in the runs that measured it (e.g. 2/9): a fault that strikes "
                              "every attempt where that rate makes it unlikely is a suspected regression")
        return None
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(raw))
    if not found or int(found.group(2)) == 0 or int(found.group(1)) > int(found.group(2)):
        raise ConfigError(f"{where}: rate: expected HITS/RUNS with 0 <= HITS <= RUNS, RUNS > 0, got {raw!r}")
    return int(found.group(1)), int(found.group(2))


def healthy_lines() -> list[str]:
    """Every line of the healthy runs' logs kept in harness/data/healthy/."""
    if not HEALTHY_DIR.is_dir():
        return []
    return [line for path in sorted(HEALTHY_DIR.glob("*.log"))
            for line in path.read_text(errors="replace").splitlines()]


def _not_healthy(signature: re.Pattern[str], where: str) -> None:
    hit = next((line for line in healthy_lines() if signature.search(line)), None)
    if hit is not None:
        raise ConfigError(f"{where}: signature /{signature.pattern}/ matches what a healthy run prints "
                          f"({hit.strip()!r}, {HEALTHY_DIR}): it would match every failure; make it "
                          "say what only this fault shows")


def chance(entry: KnownIssue, attempts: int) -> str | None:
    """Why an expected failure on ``attempts`` struck attempts is not believable (the
    fault's measured rate makes it unlikely: a suspected regression), or None."""
    p = entry.probability(attempts)
    if p is None or attempts < 2 or p >= ALPHA:
        return None
    hits, runs = entry.rate
    return (f"suspected regression: the fault struck {attempts} of {attempts} attempts, and at its "
            f"measured rate ({hits} of {runs} runs) that happens with probability {p:.3f} < {ALPHA}")


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
           evidence: dict[str, str]) -> Decision:
    """The entry for ``check`` whose versions match and whose signature ``evidence`` shows."""
    applicable = [i for i in issues if i.applies(check, guest_type, facts)]
    matched = next((i for i in applicable if i.seen_in(evidence)), None)
    return Decision(matched, tuple(i for i in applicable if i is not matched) if matched is None else ())


def emulator_fault(issues: list[KnownIssue], guest_type: str | None, facts: Any,
                   evidence: dict[str, str], check: str | None = None) -> KnownIssue | None:
    """The ``guest-death`` entry (or, given ``check``, that check's own entry) whose versions
    match and whose signature this death's evidence shows: an emulator fault."""
    for name in (GUEST_DEATH, check):
        if name is None:
            continue
        found = decide(issues, name, guest_type, facts, evidence).matched
        if found is not None:
            return found
    return None


def boot_issue(issues: list[KnownIssue], facts: Any,
               failure: dict[str, str] | None = None) -> KnownIssue | None:
    """The ``check: boot`` entry for a host with these facts; with ``failure`` (the
    error and serial log of a host that did not come up, ``{"failure": .., "serial": ..}``),
    only one whose signature it shows."""
    for issue in issues:
        if issue.applies(BOOT_CHECK, None, facts) and (failure is None or issue.seen_in(failure)):
            return issue
    return None
