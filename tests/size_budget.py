"""The size budget, checked by `tox -e lint`: no module of the harness or its plugins over
500 lines, no function over 60. A module or function over it is split along its seams, not
granted an exception; an exception, if one is ever granted, is listed below with its reason.

    python tests/size_budget.py [ROOT]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MODULE_LINES = 500
FUNCTION_LINES = 60
TREES = ("harness", "plugins", "benchmarks", "conftest.py")
# path -> why it may be longer (each function in it still keeps the function budget)
# (none: the dom0 agent, once the one, is a package built into one file, harness/agent/build.py)
MODULE_EXCEPTIONS: dict[str, str] = {}


def offences(root: Path) -> list[str]:
    found = []
    for tree in TREES:
        base = root / tree
        for path in sorted([base] if base.is_file() else base.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            text = path.read_text()
            lines = len(text.splitlines())
            if lines > MODULE_LINES and rel not in MODULE_EXCEPTIONS:
                found.append(f"{rel}: {lines} lines (budget {MODULE_LINES}): split it along its seams")
            for node in ast.walk(ast.parse(text, rel)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > FUNCTION_LINES:
                        found.append(f"{rel}:{node.lineno}: {node.name}() is {length} lines "
                                     f"(budget {FUNCTION_LINES})")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    found = offences(root)
    for line in found:
        print(line)
    print(f"size budget: {len(found)} over (modules <= {MODULE_LINES} lines, functions <= {FUNCTION_LINES}; "
          f"exceptions: {', '.join(MODULE_EXCEPTIONS) or 'none'})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
