"""The lint size budget (tests/size_budget.py) fails on a module or function over it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("size_budget", Path(__file__).parents[1] / "size_budget.py")
budget = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(budget)


def test_the_repository_is_within_budget() -> None:
    assert budget.offences(Path(__file__).parents[2]) == []


def test_a_long_module_and_a_long_function_are_named(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "big.py").write_text("x = 1\n" * 501)
    body = "".join("    y = 1\n" for _ in range(60))
    (tmp_path / "harness" / "fn.py").write_text(f"def long():\n{body}\n\ndef fine():\n    pass\n")
    monkeypatch.setitem(budget.MODULE_EXCEPTIONS, "harness/listed.py", "a listed exception")
    (tmp_path / "harness" / "listed.py").write_text("x = 1\n" * 900)  # the exception
    found = budget.offences(tmp_path)
    assert found == ["harness/big.py: 501 lines (budget 500): split it along its seams",
                     "harness/fn.py:1: long() is 61 lines (budget 60)"]
    assert budget.main(["size_budget", str(tmp_path)]) == 1
