"""The README example's control, which `nested-xen new-plugin` writes into every new plugin
(harness/scaffold.py TEMPLATE, equal to README.md's example): it catches swapped frames only
when both MAP and their content differs, and FAILS when a swapped frame maps nothing (an
unmapped frame counted as "differs" was the flaw plugins/translation.py fixed). The module
is the template itself, run with a fake agent (the real MapResult); nothing else is faked."""

from __future__ import annotations

import hashlib
import types
from types import SimpleNamespace

import pytest

from harness.guests import ProbePageInfo
from harness.scaffold import TEMPLATE
from tests.unit.test_plugin_controls import MemoryAgent  # the real MapResult over a fake memory


def _sha(index: int) -> str:
    return hashlib.sha256(bytes([index]) * 4096).hexdigest()


def _template() -> types.ModuleType:
    module = types.ModuleType("readme_example")
    exec(compile(TEMPLATE, "readme_example.py", "exec"), module.__dict__)
    return module


def _example_guest() -> SimpleNamespace:
    pages = [ProbePageInfo(i, 0x100 + i, _sha(i)) for i in range(8)]
    return SimpleNamespace(domid=5, pages=pages)


def test_readme_example_and_its_control_pass_on_a_faithful_translation() -> None:
    example, guest = _template(), _example_guest()
    agent = MemoryAgent({p.gfn: p.sha256 for p in guest.pages})
    example.test_first_and_last_probe_pages_map(guest, agent)
    example.test_negative_control_swapped_frames_are_caught(guest, agent)


def test_readme_example_control_fails_when_a_swapped_frame_does_not_map() -> None:
    """The flaw translation.py fixed: an unmapped frame counted as "differs", so the control
    passed without showing that the comparison looks at content."""
    example, guest = _template(), _example_guest()
    agent = MemoryAgent({p.gfn: p.sha256 for p in guest.pages[:-1]})  # the last page's gfn maps nothing
    with pytest.raises(AssertionError, match="the control shows nothing"):
        example.test_negative_control_swapped_frames_are_caught(guest, agent)


def test_readme_example_control_fails_when_swapped_frames_hold_the_same_content() -> None:
    example, guest = _template(), _example_guest()
    guest.pages[-1].sha256 = guest.pages[0].sha256
    agent = MemoryAgent({p.gfn: p.sha256 for p in guest.pages})
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        example.test_negative_control_swapped_frames_are_caught(guest, agent)
