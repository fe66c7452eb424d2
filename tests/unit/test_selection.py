"""`tox -e nested-xen -- PATH`: paths inside plugins/ narrow the run; options alone do not."""

from pathlib import Path
from types import SimpleNamespace

from harness.selection import narrow


class Hook:
    def __init__(self) -> None:
        self.deselected: list = []

    def pytest_deselected(self, items) -> None:
        self.deselected += items


def _setup(tmp_path: Path, args: list[str]):
    (tmp_path / "plugins").mkdir()
    for name in ("smoke.py", "translation.py"):
        (tmp_path / "plugins" / name).write_text("")
    items = [SimpleNamespace(path=tmp_path / "plugins" / f, nodeid=f"plugins/{f}::{t}[img=bookworm]")
             for f in ("smoke.py", "translation.py") for t in ("test_a", "test_b")]
    config = SimpleNamespace(args=args, invocation_params=SimpleNamespace(dir=tmp_path), hook=Hook())
    return config, items


def test_options_alone_keep_every_plugin(tmp_path):
    config, items = _setup(tmp_path, ["plugins"])
    narrow(config, items)
    assert len(items) == 4 and not config.hook.deselected


def test_a_file_inside_plugins_narrows_to_it(tmp_path):
    config, items = _setup(tmp_path, ["plugins", "plugins/smoke.py"])
    narrow(config, items)
    assert [i.nodeid.split("::")[0] for i in items] == ["plugins/smoke.py"] * 2
    assert len(config.hook.deselected) == 2


def test_a_check_id_narrows_to_that_check(tmp_path):
    config, items = _setup(tmp_path, ["plugins", "plugins/translation.py::test_b"])
    narrow(config, items)
    assert [i.nodeid for i in items] == ["plugins/translation.py::test_b[img=bookworm]"]
