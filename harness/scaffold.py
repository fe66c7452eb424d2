"""`nested-xen new-plugin NAME`: start a plugin module from the README's worked example.

The module written is exactly the example of README.md's "Writing a plugin"
section (a unit test keeps the two equal), so a new plugin starts from a check
that runs against a booted host, with its negative control.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from .discovery import PLUGINS_DIR

TEMPLATE = '''\
"""Dom0 maps an HVM or PVH guest's memory by gfn and sees what the guest wrote there.

Xen translates each gfn through the guest's HAP page tables; the probe in the
guest reported the SHA-256 of every page it filled, and the check compares them.
"""

from __future__ import annotations

import pytest

from harness.plugins import check


def frame_problem(page, got) -> str | None:
    """Why mapped frame ``got`` does not hold probe page ``page``, or None when it does."""
    if got.error != 0:
        return f"page {page.index} at frame {got.frame:#x}: did not map (error {got.error})"
    if got.sha256 != page.sha256:
        return f"page {page.index} at frame {got.frame:#x}: other content, sha256 {got.sha256}"
    return None


def assert_frames_hold_pages(agent, domid: int, frames: list[int], pages: list) -> None:
    """Map ``frames`` of domain ``domid`` from dom0: frame i must hold probe page i's content."""
    result = agent.map_foreign(domid, frames)
    assert result.ok and not result.crashed, result.raw
    bad = [why for page, got in zip(pages, result.frames, strict=True) if (why := frame_problem(page, got))]
    assert not bad, f"{len(bad)} of {len(pages)} frames differ from the probe:\\n" + "\\n".join(bad)


@check(guests=["pvh", "hvm"], xen=">=4.17", kernel=">=6.1", caps=["hap"])
def test_first_and_last_probe_pages_map(guest, agent):
    pages = [guest.pages[0], guest.pages[-1]]
    assert_frames_hold_pages(agent, guest.domid, [page.gfn for page in pages], pages)


@check(guests=["pvh", "hvm"], xen=">=4.17", kernel=">=6.1", caps=["hap"])
def test_negative_control_swapped_frames_are_caught(guest, agent):
    # The same assertion, fed a fault: each page's frame swapped with the other's.
    pages = [guest.pages[0], guest.pages[-1]]
    swapped = [pages[1].gfn, pages[0].gfn]
    with pytest.raises(AssertionError, match="2 of 2 frames differ") as caught:
        assert_frames_hold_pages(agent, guest.domid, swapped, pages)
    # Both swapped frames must map: a frame that did not map says nothing about content.
    assert "did not map" not in str(caught.value), f"the control shows nothing:\\n{caught.value}"
'''

NAME = re.compile(r"[a-z][a-z0-9_]*")


class ScaffoldError(ValueError):
    """The plugin cannot be written; the message says why."""


def write_plugin(name: str, directory: Path | None = None) -> Path:
    """Write ``directory/name.py`` (``plugins/`` by default) from :data:`TEMPLATE`; never
    overwrite a file."""
    directory = Path(PLUGINS_DIR) if directory is None else directory
    if not NAME.fullmatch(name) or keyword.iskeyword(name):
        raise ScaffoldError(f"plugin name {name!r}: use a lowercase Python identifier (a-z, 0-9, _, "
                            f"starting with a letter): pytest collects {PLUGINS_DIR}/[a-z]*.py")
    if not directory.is_dir():
        raise ScaffoldError(f"{directory}/ is not a directory: run this in the repository's root "
                            "or pass --dir DIR")
    path = directory / f"{name}.py"
    try:
        with path.open("x") as out:
            out.write(TEMPLATE)
    except FileExistsError:
        raise ScaffoldError(f"{path} exists; choose another name") from None
    return path


def next_steps(path: Path) -> str:
    """What to do after :func:`write_plugin`, as printed by the command."""
    in_plugins = path.parent.resolve() == (Path.cwd() / PLUGINS_DIR).resolve()
    steps = [
        f"wrote {path}: a check on PVH and HVM guests and its negative control",
        "next:",
        "  1. change the checks to prove what your plugin is about; keep, for every check, "
        "a negative control that feeds its assertion a fault and expects it to fail",
        f"  2. run them: tox -e nested-xen -- -k {path.stem}",
    ]
    if in_plugins:
        steps.append("  3. add a row for it to the table of checks in README.md")
    else:
        steps.append("  3. outside plugins/, the module runs once its package names it in the "
                     "nested_xen.plugins entry-point group (README.md, Writing a plugin)")
    return "\n".join(steps)
