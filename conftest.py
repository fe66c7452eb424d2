"""Thin: the harness's pytest plugin does the work.

Installed packages load it through the ``pytest11`` entry point; a source
checkout that is not installed gets it from here.
"""

from importlib.metadata import entry_points

if not any(ep.value == "harness.pytest_plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["harness.pytest_plugin"]
