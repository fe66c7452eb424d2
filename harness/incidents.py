"""Incidents: one typed record per death the harness did not cause.

A guest that triple-faults in early boot, a shared guest found dead between two
checks, a check's guest that dies during it, an L1 that stops answering: each is
one :class:`Incident`, recorded here and nowhere else. It says what died (guest or
host), in which phase, the evidence (the ``xl dmesg`` lines of *that* domid, its
console tail, the serial tail for a host), the known-issue signature it matched
(an "emulator fault"), and what the harness did about it.

Each process (an xdist worker, or the only one) keeps its own list and writes it to
``incidents-<worker>.json``; the controller merges them (:func:`merge`). The
terminal summary lists them, ``results.json``/``summary.md`` count them per image
and guest type, and the JUnit properties of the check they hit carry them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUBJECTS = ("guest", "host")
PHASES = ("create", "early-boot", "between-checks", "during-check")
ACTIONS = ("recreated", "rerun", "failed", "expected-failure")


@dataclass
class Incident:
    """One death the harness did not cause."""

    subject: str  # guest | host
    name: str  # the guest's or the host's name
    phase: str  # a PHASES entry
    guest_type: str = ""
    image: str = ""
    domid: int = -1
    nodeid: str = ""  # the check it hit, if any
    detail: str = ""  # one line: what was seen ("gone from `xl list`", "crashed", "domid 3 -> 7")
    evidence: dict[str, str] = field(default_factory=dict)  # dmesg, console, serial, failure
    signature: str | None = None  # the known issue (emulator fault) it matched, as text
    action: str = "failed"  # an ACTIONS entry
    worker: str = "main"
    accel: str = ""  # the host's accelerator, when known (an emulator fault is TCG's)

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.subject, SUBJECTS, "subject"), (self.phase, PHASES, "phase"),
                                     (self.action, ACTIONS, "action")):
            if value not in allowed:
                raise ValueError(f"incident {what} {value!r}: choose one of {', '.join(allowed)}")

    def text(self) -> str:
        """All the evidence as one text, for signatures to search."""
        return "\n".join(v for v in self.evidence.values() if v)

    def line(self) -> str:
        """One line for the terminal summary."""
        what = f"{self.name} ({self.guest_type})" if self.guest_type else self.name
        dom = f" d{self.domid}" if self.domid >= 0 else ""
        where = f" in {self.nodeid}" if self.nodeid else ""
        sig = f"emulator fault [{self.signature}]" if self.signature else "no known signature"
        return f"{self.phase}: {what}{dom}{where}: {self.detail}; {sig}; {self.action}"

    def as_property(self) -> str:
        """The JUnit property value: the record without its (long) evidence."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "evidence"}
        return json.dumps(data, sort_keys=True)


# This process's incidents. Guests, hosts and the pytest plugin report here; none keeps
# its own list.
INCIDENTS: list[Incident] = []
# Set by the pytest plugin: decides which known issue (``check: guest-death``) an
# incident's evidence shows, if any. Without it nothing is classified.
Classifier = Callable[[Incident], "str | None"]
_classifier: list[Classifier] = []


def set_classifier(classify: Classifier | None) -> None:
    _classifier[:] = [classify] if classify else []


def record(incident: Incident) -> Incident:
    """Add an incident (classifying it first, when it has no signature yet)."""
    if incident.signature is None and _classifier:
        incident.signature = _classifier[0](incident)
    INCIDENTS.append(incident)
    log.warning("incident: %s", incident.line())  # a stage line too (harness/stages.py)
    return incident


def retriable(incident: Incident) -> bool:
    """May a guest whose early-boot death this is be created again? Only when a known
    emulator-fault signature matched that domain's own evidence, and never under KVM (no
    emulator fault is expected there): a guest that dies silently at boot half the time
    would otherwise give a green run."""
    return incident.signature is not None and incident.accel != "kvm"


def clear() -> None:
    INCIDENTS.clear()


def domain_lines(dmesg: str, domid: int) -> list[str]:
    """The lines of ``xl dmesg`` about domain ``domid`` only (``d7v0``, ``Dom7 ``, ``d7 ``);
    none for an unknown domid: another domain's fault is never evidence."""
    if domid < 0:
        return []
    pattern = re.compile(rf"\bd{domid}(?:v\d|\b)|\bDom{domid}\b")
    return [line for line in dmesg.splitlines() if pattern.search(line)]


# ---------------------------------------------------------------------- files


def write(path: Path, incidents: Iterable[Incident] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [dataclasses.asdict(i) for i in (INCIDENTS if incidents is None else incidents)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def load(path: Path) -> list[Incident]:
    names = {f.name for f in dataclasses.fields(Incident)}
    return [Incident(**{k: v for k, v in raw.items() if k in names})
            for raw in json.loads(Path(path).read_text())]


def merge(artifacts: Path, since: float = 0.0) -> list[Incident]:
    """The xdist workers' ``incidents-gw*.json`` (written after ``since``, a time.time():
    not an earlier run's) joined into ``incidents.json``."""
    parts = [p for p in sorted(artifacts.glob("incidents-gw*.json")) if p.stat().st_mtime >= since]
    merged = [i for part in parts for i in load(part)]
    write(artifacts / "incidents.json", merged)
    return merged


# ---------------------------------------------------------------------- summaries


def counts(incidents: Iterable[Incident]) -> dict[tuple[str, str, str, str], int]:
    """(image, guest type or "host", phase, signature or "-") -> how many."""
    table: Counter[tuple[str, str, str, str]] = Counter()
    for i in incidents:
        table[(i.image or "-", i.guest_type or i.subject, i.phase, i.signature or "-")] += 1
    return dict(sorted(table.items()))


def table_rows(incidents: Iterable[Incident]) -> list[tuple[str, ...]]:
    return [(*key, str(n)) for key, n in counts(incidents).items()]


TABLE_HEADER = ("image", "guest type", "phase", "signature", "incidents")


def as_dicts(incidents: Iterable[Incident]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(i) for i in incidents]
