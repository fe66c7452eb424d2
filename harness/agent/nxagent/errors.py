"""The agent's two kinds of failure (a bad request, a machine that cannot run the call)."""

from __future__ import annotations

import errno
import signal


class RequestError(Exception):
    """The request is malformed: answer {"ok": false, "error": ...}, exit 2."""


class EnvironmentProblem(Exception):
    """The machine cannot run the call (no device, mmap refused...): ok=false, exit 0."""

    def __init__(self, stage: str, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.err = err

    def to_answer(self) -> dict:
        # Own keys, so the failing syscall's errno is never read as the ioctl's.
        return {
            "ok": False,
            "error": str(self),
            "error_stage": self.stage,
            "error_errno": self.err,
            "error_errno_name": errno_name(self.err),
        }


def errno_name(value: int | None) -> str | None:
    """'ENOENT' for 2 or -2; None for 0, None or an unknown number."""
    if not value:
        return None
    return errno.errorcode.get(abs(value))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


