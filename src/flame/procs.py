"""Process liveness, for the watchdogs that end helper processes once the process they serve is gone."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
