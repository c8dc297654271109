"""Per-rank functions of ``test_refresh_schedule_dist.py``: the loss-driven refresh interval
(``refresh_policy="loss"``, ``optim.refresh_schedule``) on real processes."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from frugal_dist import FRUGAL
from tests.distributed.workers import (
    groups,
    mean_grads,
    named_params,
    set_synthetic_grads,
    synthetic_setup,
)

COMMON = dict(lr=1e-2, density=0.4, update_gap=2, weight_decay=0.01, refresh_policy="loss",
              update_gap_max=8, refresh_threshold=0.02)  # fmt: skip


def rank_loss(step: int, rank: int, world: int) -> float:
    """Rank ``rank``'s loss at ``step``: falls fast, then flattens (T grows 2 -> 4 -> 8); the
    ranks' offsets cancel in the mean, and every value is dyadic, so the mean over ranks is the
    same bits in any order."""
    return 4.0 + 8.0 * 0.5 ** (step // 2) + (rank - (world - 1) / 2) * 0.25


def mean_loss(step: int, world: int) -> float:
    return sum(rank_loss(step, r, world) for r in range(world)) / world


def loss_run(rank: int, world: int, steps: int, opt_kw: dict, mode: str) -> dict[str, Any]:
    """``mode``: "optimizer" (each rank's own gradients, FRUGAL reduces them, sharded state),
    "ddp" (mean gradients, sharded state) or "single" (one process, mean gradients). The loss
    observed is the all-reduced mean of the ranks' losses (as the train loop logs it), or the
    same mean computed in one process."""
    split, params, opt = synthetic_setup(mode, opt_kw)
    refreshes: list[list[int]] = [[] for _ in split]
    for step in range(steps):
        set_synthetic_grads(params, step, rank, world, mode)
        before = [int(opt.state[p]["refresh_k"].item()) if p in opt.state else -1 for p in split]
        opt.step()
        for i, p in enumerate(split):
            if int(opt.state[p]["refresh_k"].item()) != before[i]:
                refreshes[i].append(step)
        if mode == "single":
            opt.observe_loss(mean_loss(step, world))
        else:
            loss = torch.tensor([rank_loss(step, rank, world)], dtype=torch.float64)
            dist.all_reduce(loss)
            opt.observe_loss(loss / world)
    return {"params": [p.detach().clone() for p in params], "refreshes": refreshes,
            "gaps": [int(opt.state[p]["refresh_gap"].item()) for p in split]}  # fmt: skip


def unreduced_losses(rank: int, world: int) -> str:
    """Each rank observes its own loss (rank 0 flat: T grows; rank 1 falling: T stays): the
    ranks decide differently at a refresh, and the refresh's fingerprint comparison refuses it
    there instead of the ranks refreshing at different steps."""
    split, full = named_params()
    params = split + full
    shapes = [tuple(p.shape) for p in params]
    opt = FRUGAL(groups(split, full), subspace="coordinate", **COMMON)
    try:
        for step in range(12):
            for p, g in zip(params, mean_grads(step, world, shapes)):
                p.grad = g.clone()
            opt.step()
            opt.observe_loss(4.0 if rank == 0 else 100.0 * 0.5**step)
    except RuntimeError as exc:
        return f"step {step}: {exc}"
    return "no error"
