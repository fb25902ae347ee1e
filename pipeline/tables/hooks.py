"""Test hooks that make fault tests deterministic: a kill or a pause at a named step.

Both read one environment variable each and cost one dict lookup when unset; production runs
never set them. Steps are named where they are called (`before_group`, `actor_batch`, ...).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_ENV = "IFCN_TEST_KILL_AT"  # "<step>:<n>" SIGKILLs the process the n-th time it reaches step
PAUSE_ENV = "IFCN_TEST_PAUSE_AT"  # "<step>:<n>:<gate>" holds the n-th and later visits until file <gate> exists

_COUNTS: dict[str, int] = {}


def _visit(env: str, step: str) -> tuple[int, list[str]] | None:
    at, *rest = os.environ.get(env, "").split(":", 2)
    if at != step:
        return None
    key = f"{env}:{step}"
    _COUNTS[key] = _COUNTS.get(key, 0) + 1
    return _COUNTS[key], rest


def kill_point(step: str) -> None:
    """SIGKILL this process the n-th time it reaches `step` (KILL_ENV="<step>:<n>")."""
    if (seen := _visit(KILL_ENV, step)) and seen[0] == int((seen[1] or ["1"])[0] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(step: str) -> None:
    """Hold the n-th and later visits of `step` until the gate file exists (PAUSE_ENV="<step>:<n>:<gate>"):
    a test can then kill a process that is certainly mid-work, and open the gate for the rest."""
    if (seen := _visit(PAUSE_ENV, step)) and seen[0] >= int(seen[1][0]):
        gate = Path(seen[1][1])
        while not gate.exists():
            time.sleep(0.01)
