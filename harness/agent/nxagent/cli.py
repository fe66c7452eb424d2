"""The program: one JSON request on stdin, one JSON answer on stdout, the exit status."""

from __future__ import annotations

import json
import sys
import traceback

from .abi import AGENT_VERSION
from .commands import COMMANDS, run_command
from .errors import RequestError


def _read_request(stream) -> object:
    text = stream.read()
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RequestError(f"stdin is not valid JSON: {exc}") from None


def _emit(answer: dict) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def main(argv: list | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise RequestError(
                "usage: nxagent.py COMMAND < request.json; commands: "
                + ", ".join(sorted(COMMANDS))
            )
        answer = run_command(args[0], _read_request(sys.stdin))
    except RequestError as exc:
        _emit({"ok": False, "error": str(exc), "agent_version": AGENT_VERSION})
        return 2
    except Exception as exc:
        _emit({"ok": False, "error": f"internal error: {exc!r}",
               "traceback": traceback.format_exc(), "agent_version": AGENT_VERSION})
        return 1
    answer.setdefault("agent_version", AGENT_VERSION)
    _emit(answer)
    return 0

