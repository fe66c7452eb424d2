"""Paths given after ``tox -e nested-xen --`` narrow the run.

tox runs ``pytest plugins ... {posargs}`` so that options alone (``-k smoke``,
``-m hvm``) still select from every plugin. When the arguments also name files or
checks inside ``plugins/`` (``plugins/smoke.py``, ``plugins/smoke.py::test_x``),
the user asked for those: the broad directory stops counting and only the named
ones run (the rest are reported as deselected).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _targets(config: pytest.Config) -> list[tuple[Path, str]]:
    root = Path(config.invocation_params.dir)
    out = []
    for arg in config.args:
        path, _, rest = str(arg).partition("::")
        out.append(((root / path).resolve(), rest))
    return out


def narrow(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep only the items under the narrower arguments when a broad directory argument
    contains other arguments; do nothing otherwise."""
    targets = _targets(config)
    broad = {p for p, rest in targets if not rest and p.is_dir()
             and any(q != p and p in q.parents for q, _ in targets)}
    if not broad:
        return
    narrow_targets = [(p, rest) for p, rest in targets if p not in broad]
    keep, drop = [], []
    for item in items:
        path = Path(item.path).resolve()
        name = item.nodeid.partition("::")[2]
        chosen = any((path == p or p in path.parents) and (not rest or name.startswith(rest))
                     for p, rest in narrow_targets)
        (keep if chosen else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
