"""Process helpers shared by layers that must not import each other."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` exist (whoever owns it)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
