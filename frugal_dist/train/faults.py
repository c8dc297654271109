"""Fault injection for crash-resume tests: a real ``SIGKILL`` of one rank at a chosen step.

Set ``FRUGAL_DIST_KILL_AT_STEP=S`` (and optionally ``FRUGAL_DIST_KILL_RANK=R``, default 0): rank
R kills itself with SIGKILL right after finishing optimizer step S (after that step's checkpoint,
if any). Nothing happens when the variable is unset.
"""

from __future__ import annotations

import os
import signal
import sys

from frugal_dist.train.logs import logger


def maybe_kill(step: int, rank: int) -> None:
    """SIGKILL this process if the environment asks for it at ``step`` on ``rank``."""
    at = os.environ.get("FRUGAL_DIST_KILL_AT_STEP")
    if at is None or int(at) != step or int(os.environ.get("FRUGAL_DIST_KILL_RANK", "0")) != rank:
        return
    logger.warning(f"fault injection: rank {rank} SIGKILLs itself after step {step}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
