"""Migration across Xen versions (issue 29): the run config's pairs of host images, and the
judgement of one migration between them.

``migration.cross_version`` lists (source, destination) host-image pairs::

    migration:
      cross_version:
        - {source: bookworm, destination: bookworm-own-dist, guest_types: [pv, pvh]}

Which host is old and which new comes from their booted Xen versions (harness/xen_compat.py),
so each pair is migrated both ways whatever its order. :func:`judge` is pure: it takes what
was observed (the toolstack's output and exit status, both hosts' `xl list`, the memory and
dirty-page verification) and says whether nothing is silently wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .xen import Domain
from .xen_compat import SUPPORTED, Rule

GUEST_TYPES = ("pv", "pvh", "hvm")
PAIR_KEYS = ("source", "destination", "guest_types")
DEFAULT_GUEST_TYPES = ("pv", "pvh")
MIGRATED, REFUSED, FAILED = "migrated-intact", "refused-cleanly", "failed"


@dataclass(frozen=True)
class CrossPair:
    """Two host images to migrate between (the order is the config's, not the direction)."""

    source: str
    destination: str
    guest_types: tuple[str, ...] = DEFAULT_GUEST_TYPES

    @property
    def id(self) -> str:
        return f"{self.source}--{self.destination}"

    def images(self) -> tuple[str, str]:
        return self.source, self.destination


def parse_pairs(value: Any) -> tuple[CrossPair, ...]:
    """The ``migration.cross_version`` list; ValueError saying what to write."""
    example = "e.g. [{source: bookworm, destination: bookworm-own-dist, guest_types: [pv, pvh]}]"
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {{source, destination, guest_types}} mappings, {example}")
    pairs = []
    for i, item in enumerate(value):
        where = f"[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping with keys {', '.join(PAIR_KEYS)}, got {item!r}; "
                             f"{example}")
        unknown = sorted(set(item) - set(PAIR_KEYS))
        missing = [k for k in ("source", "destination") if not item.get(k)]
        if unknown or missing:
            raise ValueError(f"{where}: " + (f"unknown key(s) {', '.join(unknown)}; " if unknown else "")
                             + (f"missing {', '.join(missing)}; " if missing else "")
                             + f"valid keys: {', '.join(PAIR_KEYS)}")
        source, destination = item["source"], item["destination"]
        if not isinstance(source, str) or not isinstance(destination, str):
            raise ValueError(f"{where}: source and destination are host-image (recipe) names, got "
                             f"{source!r} and {destination!r}")
        if source == destination:
            raise ValueError(f"{where}: source and destination are both {source!r}: a cross-version pair "
                             "needs two host images (their Xen releases differ)")
        types = item.get("guest_types", list(DEFAULT_GUEST_TYPES))
        if not isinstance(types, list) or not types or any(t not in GUEST_TYPES for t in types):
            raise ValueError(f"{where}: guest_types {types!r} invalid; list one or more of "
                             f"{', '.join(GUEST_TYPES)}")
        pairs.append(CrossPair(source, destination, tuple(types)))
    return tuple(pairs)


# ------------------------------------------------------------------ the judgement

# A toolstack line that says something went wrong (xl, libxl, libxc, the relay).
WORDS = re.compile(r"error|fail|refus|unable|cannot|can't|invalid|unexpected|unrecognised|not handled|"
                   r"incompatible|abort|denied|truncat|broken pipe|reset by peer", re.IGNORECASE)
STAMP = re.compile(r"^\d+\.\d+ ")
WORD_LINES = 20


def toolstack_words(log: str, lines: int = WORD_LINES) -> str:
    """The toolstack's own lines about what went wrong (timestamps stripped), the last ``lines``."""
    said = [STAMP.sub("", line).rstrip() for line in log.splitlines() if WORDS.search(line)]
    return "\n".join(said[-lines:])


@dataclass(frozen=True)
class Observed:
    """What one migration of ``guest`` did: the toolstack's log and exit status, both hosts'
    `xl list` afterwards, the source's domid before it, and the memory checks where the
    guest was looked for (``corrupted``: the probe pages that changed, None when not
    checked; ``dirty_ok``: the dirty-page verdict, None without a dirty workload)."""

    guest: str
    source_domid: int
    rc: int
    log: str
    source_after: Sequence[Domain]
    destination_after: Sequence[Domain]
    corrupted: Sequence[str] | None = None
    dirty_ok: bool | None = None
    dirty_message: str = ""
    unchecked: str = ""  # why the memory was not checked, when it was not


@dataclass(frozen=True)
class Judgement:
    outcome: str  # MIGRATED | REFUSED | FAILED
    reasons: tuple[str, ...] = ()
    words: str = ""
    rule: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return self.outcome in (MIGRATED, REFUSED)

    def message(self) -> str:
        head = f"cross-version migration {self.outcome}"
        parts = [head + (": " + "; ".join(self.reasons) if self.reasons else "")]
        if self.words:
            parts.append("the toolstack said:\n" + self.words)
        if self.rule:
            parts.append("rule: " + self.rule)
        return "\n".join(parts)


def _named(domains: Sequence[Domain], name: str) -> Domain | None:
    return next((d for d in domains if d.name == name), None)


def _memory(obs: Observed, where: str) -> list[str]:
    if obs.corrupted is None:
        why = f": {obs.unchecked}" if obs.unchecked else ""
        return [f"the guest's memory on the {where} was not checked{why}"]
    out = [f"{len(obs.corrupted)} probe page(s) changed on the {where}: " + "; ".join(obs.corrupted[:5])
           ] if obs.corrupted else []
    if obs.dirty_ok is False:
        out.append(f"pages written during the copy are wrong on the {where}: {obs.dirty_message}")
    return out


def _migrated(obs: Observed) -> list[str]:
    problems = []
    there, here = _named(obs.destination_after, obs.guest), _named(obs.source_after, obs.guest)
    if there is None:
        problems.append(f"the toolstack reported success but the destination has no domain {obs.guest}")
    elif there.crashed or there.dying:
        problems.append(f"{obs.guest} is d{there.domid} on the destination, state {there.state}")
    if here is not None and not here.dying:
        problems.append(f"{obs.guest} is still on the source too (d{here.domid}, state {here.state})")
    return problems + _memory(obs, "destination")


def _refused(obs: Observed, words: str) -> list[str]:
    problems = [] if words else [f"the toolstack failed (exit status {obs.rc}) without a word saying why"]
    there, here = _named(obs.destination_after, obs.guest), _named(obs.source_after, obs.guest)
    if there is not None:
        problems.append(f"the refused migration left d{there.domid} {obs.guest} (state {there.state}) "
                        "half-created on the destination")
    if here is None:
        return problems + [f"the source guest d{obs.source_domid} is gone from the source"]
    if here.domid != obs.source_domid:
        problems.append(f"the source guest changed: was d{obs.source_domid}, now d{here.domid}")
    if not here.running:
        problems.append(f"the source guest d{here.domid} is not running (state {here.state})")
    return problems + _memory(obs, "source")


def judge(obs: Observed, rule: Rule) -> Judgement:
    """Did the migration end one of the two ways the rule allows, with nothing silently wrong?

    - migrated (exit status 0): the guest is on the destination alone, its probe pages
      intact and the pages written during the copy verified -> ``migrated-intact``;
    - refused (any other status): where Xen promises the direction (forward) a failure
      citing the rule; else the toolstack's words, no domain of its name left on the
      destination, the source guest the same domain, running, intact -> ``refused-cleanly``.

    Anything else is ``failed``, with every reason."""
    words = toolstack_words(obs.log)
    if obs.rc == 0:
        problems = _migrated(obs)
        return Judgement(FAILED if problems else MIGRATED, tuple(problems), words, rule.cite())
    problems = _refused(obs, words)
    if rule.promise == SUPPORTED:
        problems.insert(0, f"the {rule.direction} migration was refused (exit status {obs.rc}), "
                           "where Xen documents it as supported")
    return Judgement(FAILED if problems else REFUSED, tuple(problems), words, rule.cite())
