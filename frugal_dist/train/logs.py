"""Console output of training runs through the ``logging`` module (logger ``frugal_dist``).

``setup_console(rank)`` gives the ``frugal_dist`` logger one handler writing
``[frugal_dist] <message>`` lines to the current ``sys.stdout`` (so pytest's capture and
redirections see them): level INFO on rank 0, WARNING on the other ranks, so progress appears
once per job. It does nothing when the application has already given the logger a handler of its
own, so ``logging.getLogger("frugal_dist")`` can be routed, filtered or silenced as usual
(``FRUGAL_DIST_LOG_LEVEL=WARNING`` quiets rank 0 as well).
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("frugal_dist")


class _CurrentStdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - logging reads and flushes self.stream
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_console(rank: int = 0) -> logging.Logger:
    """Route ``frugal_dist`` records to stdout (see the module docstring); returns the logger."""
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        if logger.handlers:  # the application configured it: leave it alone
            return logger
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("[frugal_dist] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    default = "INFO" if rank == 0 else "WARNING"
    logger.setLevel(os.environ.get("FRUGAL_DIST_LOG_LEVEL", default).upper())
    return logger
