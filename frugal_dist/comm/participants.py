"""Who takes part in an optimizer's collectives, checked in bounded time.

Semantics (``FRUGAL``): the optimizer is collective over its ``process_group`` (default: the whole
world). Every rank of that group builds it with the same settings and calls ``step()`` together.
An optimizer used by some ranks only (e.g. an auxiliary model's, built on rank 0) either passes
``process_group`` = a group of exactly those ranks, or, for replicated parameters (no engine
layout, ``reduce_gradients=False``, ``shard_state=False``, no ``svd`` projection), a fixed
``seed`` and ``check_agreement=False``: it then issues no collective at all. Its inf/nan check
is local, because replicated gradients are equal on every rank.

The collectives that establish who takes part wait at most ``FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S``
seconds (default 300) and then raise ``ParticipantsError`` naming the fixes, instead of hanging:

* ``agree_on_seed_bounded``: ``seed=None``; rank 0's seed to every rank. One all-reduce (sum) of
  one int64 (8 B): every rank contributes, so rank 0 also notices missing ranks (a broadcast's
  sender would not).
* ``all_gather_bounded``: the first step's settings digest and the per-refresh subspace
  fingerprints (one int64 per parameter and rank);
* ``broadcast_bounded``: the svd bases each owner hands over at a refresh (4 B x dim x r).
* ``probe``: one all-reduce of one int32 (4 B) at the first step of an optimizer that will issue
  collectives but skips the agreement check (``check_agreement=False``).

Each of these waits on the host (``work.wait(timeout)``), which the backends honour (gloo raises
``RuntimeError("... timed out ...")``; NCCL ``DistBackendError``). They run once, or once per
refresh, never every step. A peer that leaves the group during such a collective is reported the
same way. After a ``ParticipantsError`` the process group has an unmatched collective pending: do
not keep using it; fix the code that builds or steps the optimizer.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from frugal_dist.comm.stats import CommStats

ENV = "FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0

ProcessGroup = dist.ProcessGroup | None


class ParticipantsError(RuntimeError):
    """Not every rank of the optimizer's process group took part in one of its collectives."""


def participants_timeout_s() -> float:
    """Seconds a participant-establishing collective waits (env ``FRUGAL_DIST_PARTICIPANTS_
    TIMEOUT_S``, default 300). Raises ``ValueError`` naming the variable for a bad value."""
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{ENV} must be a finite number of seconds > 0 (e.g. 300), got {raw!r}")
    return value


def _world(pg: ProcessGroup) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(pg), dist.get_world_size(pg)


def _group_text(pg: ProcessGroup) -> str:
    _, world = _world(pg)
    if pg is None:
        return f"the default process group ({world} ranks)"
    return f"its process group ({world} ranks: {dist.get_process_group_ranks(pg)})"


def _device(pg: ProcessGroup) -> torch.device:
    if "nccl" in str(dist.get_backend(pg)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _message(what: str, pg: ProcessGroup, limit: float, exc: BaseException) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return (
        f"FRUGAL {what}: not every rank of {_group_text(pg)} took part within {limit:g} s "
        f"(this is global rank {rank}). The optimizer is collective over its process_group: "
        "build it and call step() on every rank of that group. For an optimizer used on some "
        "ranks only, pass process_group=dist.new_group(ranks=[...]) (created on every rank) "
        "naming exactly those ranks; or, for replicated parameters on one rank, a fixed seed= and "
        "check_agreement=False (it then issues no collective). If the other ranks are merely "
        f"slower to get here, raise {ENV} (now {limit:g}). Backend error: {exc}"
    )


def wait_bounded(work: Any, what: str, pg: ProcessGroup) -> None:
    """Wait for an ``async_op=True`` collective at most ``participants_timeout_s()`` seconds;
    ``ParticipantsError`` on a timeout or a peer that left."""
    limit = participants_timeout_s()
    try:
        work.wait(timeout=timedelta(seconds=limit))
    except RuntimeError as exc:
        from frugal_dist.comm.timeouts import classify

        if classify(exc) is None:
            raise
        raise ParticipantsError(_message(what, pg, limit, exc)) from exc


def agree_on_seed_bounded(seed: int | None, pg: ProcessGroup = None) -> int:
    """Rank 0's seed on every rank of ``pg`` (rank 0 draws one when ``seed`` is None)."""
    rank, world = _world(pg)
    if seed is None and rank == 0:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if world == 1:
        return int(seed if seed is not None else 0)
    mine = int(seed) if rank == 0 and seed is not None else 0
    t = torch.tensor([mine], dtype=torch.int64, device=_device(pg))
    wait_bounded(dist.all_reduce(t, group=pg, async_op=True), "seed agreement (seed=None)", pg)
    return int(t.item())


def all_gather_bounded(out: list[Tensor], mine: Tensor, pg: ProcessGroup, what: str) -> None:
    """``dist.all_gather(out, mine, group=pg)`` waiting at most the participants timeout."""
    wait_bounded(dist.all_gather(out, mine, group=pg, async_op=True), what, pg)


def broadcast_bounded(t: Tensor, src: int, pg: ProcessGroup, what: str) -> None:
    """``dist.broadcast(t, src, group=pg)`` (``src`` a global rank), bounded in time."""
    wait_bounded(dist.broadcast(t, src=src, group=pg, async_op=True), what, pg)


def probe(pg: ProcessGroup, what: str, stats: CommStats | None = None) -> None:
    """One 4-byte all-reduce: every rank of ``pg`` is here (bounded in time); counted in
    ``stats`` under ``agreement_check`` (payload 4 B, wire 2 (W-1)/W x 4 B)."""
    world = _world(pg)[1]
    if world == 1:
        return
    t = torch.ones(1, dtype=torch.int32, device=_device(pg))
    wait_bounded(dist.all_reduce(t, group=pg, async_op=True), what, pg)
    if stats is not None:
        stats.add("agreement_check", t.nbytes, 2 * (world - 1) / world * t.nbytes)
