"""Where checks come from, besides the modules in ``plugins/``.

When pytest collects the repository's ``plugins/`` package it also collects:

* every module named by an entry point in the ``nested_xen.plugins`` group of an
  installed distribution, so a team can ship checks in its own package::

      [project.entry-points."nested_xen.plugins"]
      acme = "acme_xen_checks.grants"

  Its node id is the module's path, ``acme_xen_checks/grants.py``, which is also
  how ``known_issues.yaml`` names its checks;

* the worked example of README.md ("Writing a plugin", the fenced block after
  ``<!-- plugin-example -->``), written to ``<artifacts>/readme-example/`` and run
  against the booted host like any plugin, as ``README.md::test_...``.

A run that does not collect ``plugins/`` (the unit tests, ``pytest plugins/smoke.py``)
collects neither.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ENTRY_POINT_GROUP = "nested_xen.plugins"
PLUGINS_DIR = "plugins"
EXAMPLE_MARKER = "<!-- plugin-example -->"
EXAMPLE_MODULE = "readme_example"
EXAMPLE_NODEID = "README.md"


class DiscoveryError(Exception):
    """An entry point that does not name an importable Python source module."""


@dataclass(frozen=True)
class EntryPointPlugin:
    """One ``nested_xen.plugins`` entry point: ``name = module`` in distribution ``dist``."""

    name: str
    module: str
    dist: str

    def describe(self) -> str:
        return f"{self.name} = {self.module} ({self.dist})"

    def source(self) -> Path:
        """The module's file, found without running the module (its parent packages are imported)."""
        where = f"entry point {self.describe()} in group {ENTRY_POINT_GROUP}"
        if ":" in self.module:
            raise DiscoveryError(f"{where}: name a module, not an attribute")
        try:
            spec = importlib.util.find_spec(self.module)
        except ImportError as exc:
            raise DiscoveryError(f"{where}: {exc}") from None
        if spec is None:
            raise DiscoveryError(f"{where}: no module named {self.module!r}")
        if not spec.origin or not spec.origin.endswith(".py"):
            what = spec.origin or "a namespace package"
            raise DiscoveryError(f"{where}: {what} is not a Python source file")
        return Path(spec.origin)

    def nodeid(self, source: Path) -> str:
        """``pkg/mod.py`` for module ``pkg.mod`` (``pkg/__init__.py`` for a package)."""
        parts = self.module.split(".")
        if source.name == "__init__.py":
            parts.append("__init__")
        return "/".join(parts) + ".py"


def entry_point_plugins() -> list[EntryPointPlugin]:
    """The ``nested_xen.plugins`` entry points of the installed distributions, by name."""
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        found.append(EntryPointPlugin(ep.name, ep.value.strip(), dist))
    return sorted(found, key=lambda p: (p.name, p.module))


def readme_example(readme_text: str) -> str | None:
    """The fenced ```python block that follows the ``<!-- plugin-example -->`` line, or None."""
    match = re.search(re.escape(EXAMPLE_MARKER) + r"\s*\n```python\n(.*?)^```", readme_text,
                      re.DOTALL | re.MULTILINE)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Sources:
    """What the ``plugins/`` package collects beyond its own modules (set at configure time)."""

    entry_points: tuple[EntryPointPlugin, ...]
    example_dir: Path  # where the README example is written


SOURCES_KEY = pytest.StashKey[Sources]()


class PluginsPackage(pytest.Package):
    """The repository's ``plugins/`` package, plus entry-point plugins and the README example."""

    def collect(self) -> Iterable[pytest.Item | pytest.Collector]:
        yield from super().collect()
        sources = self.config.stash[SOURCES_KEY]
        for plugin in sources.entry_points:
            yield self._entry_point_module(plugin)
        example = self._readme_example(sources.example_dir)
        if example is not None:
            yield example

    def _entry_point_module(self, plugin: EntryPointPlugin) -> pytest.Module:
        # Registered before the module is imported (find_spec imports its parents).
        pytest.register_assert_rewrite(plugin.module)
        try:
            source = plugin.source()
        except DiscoveryError as exc:
            raise self.CollectError(str(exc)) from None
        return pytest.Module.from_parent(self, path=source, nodeid=plugin.nodeid(source))

    def _readme_example(self, directory: Path) -> pytest.Module | None:
        readme = self.config.rootpath / EXAMPLE_NODEID
        code = readme_example(readme.read_text()) if readme.is_file() else None
        if code is None:
            return None
        path = directory / f"{EXAMPLE_MODULE}.py"
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(code)
        tmp.replace(path)  # atomic: xdist workers write the same file
        pytest.register_assert_rewrite(EXAMPLE_MODULE)
        return pytest.Module.from_parent(self, path=path, nodeid=EXAMPLE_NODEID)


def collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """``pytest_collect_directory``: the rootdir's ``plugins/`` package is a :class:`PluginsPackage`."""
    if path == parent.config.rootpath / PLUGINS_DIR and (path / "__init__.py").is_file():
        return PluginsPackage.from_parent(parent, path=path)
    return None


def report_header(sources: Sources, disabled: bool) -> list[str]:
    """The lines pytest prints at the start of a run about entry-point plugins."""
    if disabled:
        return [f"nested-xen: {ENTRY_POINT_GROUP} entry points not collected (--nx-no-entry-points)"]
    return [f"nested-xen: {ENTRY_POINT_GROUP} entry point {p.describe()}" for p in sources.entry_points]
