"""Input errors at launch: one line naming the file, the field and the fix, printed once (rank 0),
exit code 2 on every rank.

A bad config key, a corrupt YAML or DeepSpeed JSON, a missing data file: every rank of a launch
reads the same inputs and fails the same way, so N tracebacks of the same mistake help nobody.

* ``input_errors()`` -- a context manager around start-up (config, data, model, optimizer,
  checkpoint lookup): a ``ValueError`` / ``FileNotFoundError`` / ``IsADirectoryError`` /
  ``yaml.YAMLError`` raised inside it is marked as an input error and re-raised unchanged (so
  ``train()``'s callers still catch e.g. ``RankMismatchError``); ``is_input_error(exc)`` tells.
  Errors inside training steps are not marked and keep their tracebacks.
* ``exit_on_input_error(exc)`` -- rank 0 prints ``error: <line>`` to stderr and exits 2 a moment
  (``LEAD_S``) later, so that it is the launcher's root cause. Any other rank waits up to
  ``GRACE_S`` for the launcher's SIGTERM (torchrun, the DeepSpeed launcher, Open MPI stop the
  remaining ranks when one fails) and exits 2 on it, silently; a rank that is not stopped (its
  error was its own, rank 0 did not fail) prints its line, prefixed with its rank, and exits 2.
  Nothing waits longer than ``GRACE_S``. Under MPICH's ``mpirun``, which stops no rank, the
  other ranks exit 2 at once and silently (an error of one rank other than 0 alone is then only
  visible in the exit code).

``FRUGAL_DIST_TRACEBACK=1`` prints the full traceback instead (for debugging frugal_dist itself).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import yaml

EXIT_CODE = 2  # argparse's and the shell's convention for a usage error
GRACE_S = 10.0  # how long a rank other than 0 waits for the launcher to stop it
LEAD_S = 1.0  # rank 0 leaves this long after printing, once the others wait for their SIGTERM


def one_line(text: str) -> str:
    """``text`` with its lines joined (YAML and pydantic messages span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(exc: BaseException) -> str:
    """One line for an input exception (a YAML error with its position)."""
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return one_line(f"not valid YAML{where}: {problem}")
    if isinstance(exc, (FileNotFoundError, IsADirectoryError)) and exc.filename is not None:
        return one_line(f"{exc.filename}: {exc.strerror or exc}")
    return one_line(str(exc))


INPUT_EXCEPTIONS = (ValueError, FileNotFoundError, IsADirectoryError, yaml.YAMLError)


_MARK = "_frugal_dist_input_error"


@contextmanager
def input_errors() -> Iterator[None]:
    """Mark the input exceptions raised inside (see the module docstring)."""
    try:
        yield
    except INPUT_EXCEPTIONS as exc:
        setattr(exc, _MARK, True)
        raise


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside ``input_errors()``."""
    return bool(getattr(exc, _MARK, False))


def _rank() -> int:
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _launcher_stops_ranks() -> bool:
    """Whether the launcher stops the other ranks when one fails: torchrun, the DeepSpeed launcher
    and Open MPI do; MPICH's hydra (``PMI_RANK``) lets them run to their own end."""
    env = os.environ
    return not ("PMI_RANK" in env and "TORCHELASTIC_RUN_ID" not in env)


def _world() -> int:
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def exit_on_input_error(exc: BaseException, grace_s: float = GRACE_S) -> NoReturn:
    """Report ``exc`` once and leave with ``EXIT_CODE`` (see the module docstring)."""
    if os.environ.get("FRUGAL_DIST_TRACEBACK") == "1":
        raise exc
    rank = _rank()
    line = describe(exc)
    if rank != 0 and not _launcher_stops_ranks():  # MPICH's mpirun waits for every rank
        os._exit(EXIT_CODE)
    if rank != 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_CODE))
        time.sleep(grace_s)  # the launcher stops us (rank 0 failed the same way) ...
        line = f"[rank {rank}] {line}"  # ... or this error was this rank's own
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if rank == 0 and _world() > 1:
        time.sleep(LEAD_S)  # the other ranks reach their SIGTERM handler: they exit 2, not -15
    os._exit(EXIT_CODE)  # no interpreter-exit destructors (gloo teardown, see launchers/train.py)
