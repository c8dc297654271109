"""Collective timeouts: a stalled or dead rank becomes a clear error, never a silent hang.

``process_group_timeout(seconds)`` is what ``init_process_group(timeout=...)`` receives. What the
timeout does depends on the backend:

* **gloo** (CPU): every collective waits at most ``timeout`` for its peers, then raises
  ``RuntimeError("... Timed out waiting 5000ms for recv operation to complete")`` on the ranks
  that are waiting; a rank whose peer already gave up sees ``"Connection closed by peer"``.
  Nothing else is needed.
* **NCCL** (GPU): collectives are asynchronous; the ProcessGroupNCCL watchdog thread checks them
  against the timeout. Measured on 2 x H200, torch 2.11, NCCL 2.28, rank 1 stalling before an
  all-reduce with a 5 s timeout:

  - at 5 s the waiting rank logs ``Watchdog caught collective operation timeout:
    WorkNCCL(SeqNum=2, OpType=ALLREDUCE, ..., Timeout(ms)=5000)`` and every rank dumps debug
    info; no Python exception is raised, and if the stalled rank arrives within about a minute
    the collective simply completes;
  - about 60 s later the communicator is aborted: the waiting stream is released (the output
    tensor keeps its stale contents) and the watchdog ends the process with SIGABRT
    (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, default 3; setting 1 or ``TORCH_NCCL_BLOCKING_WAIT=1``
    or ``TORCH_NCCL_DUMP_ON_TIMEOUT=0`` changed neither the missing exception nor the delay);
    torchrun / deepspeed / mpirun then stop the other ranks. So a stalled NCCL job dies roughly
    ``collective_timeout_s + 60 s`` after the stall, with the reason in the watchdog's log line,
    but ``explain_timeouts`` cannot add its message. Do not set
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0`` (no teardown, per the torch docs: nothing ends a job
    whose rank stalled);
  - only ``work = dist.all_reduce(t, async_op=True); work.wait(timeout=...)`` raises in Python
    (``DistBackendError: ... Watchdog caught collective operation timeout``, at the timeout),
    which ``explain_timeouts`` turns into ``CollectiveTimeoutError``.

``explain_timeouts(timeout_s)`` re-raises a backend timeout as ``CollectiveTimeoutError`` saying
what the job was doing (``set_phase``) and how to raise the limit; a lost peer becomes
``PeerRankLostError``. Both subclass ``CollectiveError`` (a ``RuntimeError``) and chain the
backend's original exception.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, TypeVar

DEFAULT_TIMEOUT_S = 600.0
KNOB = "collective_timeout_s"

_PHASE: ContextVar[str] = ContextVar("frugal_dist_collective_phase", default="start-up")
_TIMEOUT = re.compile(r"timed out|operation timeout|deadline exceeded", re.IGNORECASE)
_PEER_LOST = re.compile(
    r"connection (closed|reset) by peer|broken pipe|remote worker crash", re.IGNORECASE
)

F = TypeVar("F", bound=Callable[..., Any])


class CollectiveError(RuntimeError):
    """A collective failed because another rank did not take part in time."""


class CollectiveTimeoutError(CollectiveError):
    """A collective waited longer than the process group's timeout for a peer rank."""


class PeerRankLostError(CollectiveError):
    """A peer rank closed its connection (it crashed, or gave up after its own timeout)."""


def process_group_timeout(seconds: float | None) -> timedelta | None:
    """``timedelta`` for ``init_process_group(timeout=...)``; None keeps torch's default.

    Raises ``ValueError`` unless ``seconds`` is a finite number > 0.
    """
    if seconds is None:
        return None
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if not ok or not (0 < seconds < float("inf")):
        raise ValueError(
            f"{KNOB} must be a finite number of seconds > 0 (e.g. 600), got {seconds!r}"
        )
    return timedelta(seconds=float(seconds))


def set_phase(text: str) -> None:
    """Record what the job is doing now (named in the error if a collective fails)."""
    _PHASE.set(text)


def current_phase() -> str:
    return _PHASE.get()


def classify(exc: BaseException) -> type[CollectiveError] | None:
    """``CollectiveTimeoutError`` / ``PeerRankLostError`` when ``exc`` is a backend failure of
    that kind (gloo ``RuntimeError``, ``DistBackendError``, ...), else None."""
    if isinstance(exc, CollectiveError) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if _TIMEOUT.search(text):
        return CollectiveTimeoutError
    if _PEER_LOST.search(text):
        return PeerRankLostError
    return None


def explain(exc: BaseException, timeout_s: float | None, phase: str | None = None) -> BaseException:
    """The ``CollectiveError`` to raise for backend failure ``exc`` (``exc`` itself otherwise)."""
    kind = classify(exc)
    if kind is None:
        return exc
    phase = phase or current_phase()
    limit = f"{timeout_s:g} s" if timeout_s is not None else "the backend's default timeout"
    if kind is CollectiveTimeoutError:
        msg = (
            f"a collective timed out during {phase}: some rank did not join it within {limit} "
            f"({KNOB}). Another rank is stalled, crashed or much slower (data loading, checkpoint "
            "I/O, a debugger); check the other ranks' logs. If this step legitimately takes "
            f"longer, raise the limit, e.g. --{KNOB}=1800. Backend error: {exc}"
        )
    else:
        msg = (
            f"a peer rank left a collective during {phase} (it crashed, or gave up after its own "
            f"{KNOB} = {limit} ran out); the first error is in the other ranks' logs. Backend "
            f"error: {exc}"
        )
    return kind(msg)


@contextmanager
def explain_timeouts(timeout_s: float | None, phase: str | None = None) -> Iterator[None]:
    """Re-raise backend timeouts / lost peers inside the block as ``CollectiveError`` naming the
    current phase (``phase`` or the last ``set_phase``) and the ``timeout_s`` knob."""
    try:
        yield
    except RuntimeError as exc:
        new = explain(exc, timeout_s, phase)
        if new is exc:
            raise
        raise new from exc


def explain_collective_timeouts(fn: F) -> F:
    """Decorator for ``fn(cfg, ...)`` whose ``cfg`` has ``collective_timeout_s``: runs it under
    ``explain_timeouts`` with the phase reset to start-up."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        token = _PHASE.set("start-up (process group, agreement checks, model and optimizer)")
        try:
            with explain_timeouts(getattr(cfg, KNOB, None)):
                return fn(cfg, *args, **kwargs)
        finally:
            _PHASE.reset(token)

    return wrapper  # type: ignore[return-value]
