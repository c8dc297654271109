"""Collective timeouts: a stalled or dead rank becomes a clear error, never a silent hang.

``process_group_timeout(seconds)`` is what ``init_process_group(timeout=...)`` receives. What the
timeout does depends on the backend:

* **gloo** (CPU): every collective waits at most ``timeout`` for its peers, then raises
  ``RuntimeError("... Timed out waiting 5000ms for recv operation to complete")`` on the ranks
  that are waiting; a rank whose peer already gave up sees ``"Connection closed by peer"``.
  Nothing else is needed.
* **NCCL** (GPU): collectives are asynchronous; a watchdog thread checks them against the
  timeout. With ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (the default since torch 2.2; ``1`` on older
  versions) the watchdog tears the process down when a collective times out -- the job dies and
  the launcher (torchrun / deepspeed / mpirun) reports it, but no Python exception is raised, so
  ``explain_timeouts`` below cannot add its message. Set ``TORCH_NCCL_BLOCKING_WAIT=1`` to make
  the waiting call itself raise ``DistBackendError`` after the timeout instead (slower: every
  collective is waited on from the host). ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0`` disables error
  handling and a stalled rank then hangs the job forever: do not use it.

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
