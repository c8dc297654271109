"""``block_order="gradnorm"``: the active blocks of a refresh chosen from the gradient.

A project addition beyond the FRUGAL paper (issue 19), off in the paper-faithful presets. At a
refresh (a step where the group's tensors have taken a multiple of ``update_gap`` steps), the
a = ``block_count(n, rho)`` tensors of the group's n with the largest squared Frobenius norm of
the gradient of that step are active until the next refresh (``core.subspaces.top_blocks``):

    s_b = sum_ij G_b,ij^2          (float64; G_b: the gradient the step uses, i.e. the mean
                                    over data-parallel ranks)
    active = the a largest s_b, the lower position first on equal s_b

Not normalised by the tensor's size (``core.subspaces`` says why). Tensors without a gradient
at the refresh count s_b = 0.

Where the s_b come from (every rank computes the same vector, so every rank picks the same
blocks with no further message):

* replicated gradients (one process, DDP, DeepSpeed ZeRO-0, ``shard_state`` without
  ``reduce_gradients``): local, no communication;
* fragments (a bound layout at world > 1: ZeRO-1/2/3 flat partitions, FSDP1 slices, FSDP2 /
  HSDP row shards): each rank sums the squares of its fragments, then ONE all-reduce(sum) of
  the (n,) float64 vector over the optimizer's process group: 8 B x n per refresh
  (``block_gradnorm`` in ``comm_stats()``). Fragments are disjoint, so the sum is the full s_b;
* ``reduce_gradients=True`` (FRUGAL reduces the gradients itself, after this choice is needed:
  ``residual_comm="sign"`` never forms the mean of an inactive block): the group's gradients
  are mean-reduced into temporary copies first, in buckets of at most ``BUCKET`` entries (one
  coalesced float32 all-reduce per bucket, 4 B x the group's entries per refresh,
  ``block_gradnorm_grads``), so the choice is the single-process one for the mean gradient;
  ``step_ranks`` computes the same mean from its simulated ranks (counted alike).

Why float64: a square of a float32 entry is exact in float64, so s_b differs between world sizes
(fragment sums added in another order) only by float64 rounding of the additions, ~1e-16
relative: two blocks swap places across world sizes only if their norms agree to ~1e-13, where
float32 sums (~1e-7) could flip near-ties. Gradients on a binary grid (the tests' dyadic values)
give exact sums whatever the order, so 1, 2, 3 and 4 ranks choose the same blocks bit for bit.
The extra 4 B per tensor per refresh is negligible.

State: the choice is kept as ``block_active`` (a float32 0-dim CPU tensor, 1.0 / 0.0, the same on
every rank, a counter for checkpoints) in every tensor's state, written at each refresh, so a
run resumed between refreshes continues with the blocks chosen before the checkpoint. ``step``
and the fingerprint check at the refresh (``check_agreement``) compare the choice over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import allreduce_mean_, allreduce_sum_
from frugal_dist.core.subspaces import block_count, top_blocks
from frugal_dist.optim.density_schedule import density_at

if TYPE_CHECKING:
    from frugal_dist.layouts.base import ParamView
    from frugal_dist.optim.phases import StepContext

FLAG = "block_active"  # state key of the choice (float32 0-dim: 1.0 active, 0.0 inactive)
BUCKET = 1 << 24  # entries per all-reduce of the mean-gradient copies (64 MB of float32)


def uses_gradnorm(group: dict[str, Any]) -> bool:
    """The group's block tensors are chosen by gradient norm."""
    return group.get("block_order") == "gradnorm" and group.get("algorithm") == "frugal"


def flag_of(state: Any) -> bool:
    """The stored choice of one tensor (False before its first refresh)."""
    return FLAG in state and bool(state[FLAG].item())


def _sumsq(g: Tensor | None) -> Tensor:
    """sum g^2 in float64 (each square exact), on g's device; 0 for None or empty."""
    if g is None or g.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=None if g is None else g.device)
    flat = g.detach().reshape(-1).double()
    return torch.dot(flat, flat)


def _mean_grads(ctx: StepContext, views: list[ParamView]) -> list[Tensor | None]:
    """The mean over ranks of the views' gradients, as float32 copies (``reduce_gradients``)."""
    if ctx.simulated is not None:  # FRUGAL.step_ranks: the ranks' gradients, in rank order
        per_rank = ctx.simulated.grads_of([v.data for v in views])
        world = len(per_rank)
        out: list[Tensor | None] = []
        for i in range(len(views)):
            gs = [rank[i] for rank in per_rank]
            if any(g is None for g in gs):
                out.append(None)
                continue
            total = gs[0].float().clone()
            for g in gs[1:]:
                total.add_(g.float())
            out.append(total.div_(world))
        nbytes = 4 * sum(g.numel() for g in out if g is not None)
        ctx.comm.add("block_gradnorm_grads", nbytes, 2 * (world - 1) / world * nbytes)
        return out
    out = [None if v.grad is None else v.grad.float().clone() for v in views]
    present = [g for g in out if g is not None]
    start = 0
    while start < len(present):  # buckets of at most BUCKET entries (at least one tensor)
        stop, size = start, 0
        while stop < len(present) and (stop == start or size + present[stop].numel() <= BUCKET):
            size += present[stop].numel()
            stop += 1
        allreduce_mean_(present[start:stop], ctx.pg, ctx.comm, "block_gradnorm_grads")
        start = stop
    return out


def block_sumsq(ctx: StepContext, group: dict[str, Any], views: list[ParamView]) -> Tensor:
    """s_b of every tensor of the group (model order), the same (n,) float64 vector on every
    rank (module docstring: local, one all-reduce of 8 B x n, or the mean gradient first)."""
    n = len(group["names"])
    grads = _mean_grads(ctx, views) if ctx.reduced_here else [v.grad for v in views]
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    for view, g in zip(views, grads):
        if g is not None:
            sums[view.index] += _sumsq(g).to(device)
    if ctx.layout is not None and ctx.world > 1:  # fragments: the global sums
        allreduce_sum_(sums, ctx.pg, ctx.comm, "block_gradnorm")
    return sums


def refresh_choice(
    ctx: StepContext, group: dict[str, Any], views: list[ParamView],
    clocks: list[tuple[int, bool]],
) -> None:  # fmt: skip
    """At a step where any of the group's tensors refreshes (``clocks``: (refresh index,
    refreshes now) of each view with a gradient, ``optim.refresh_schedule``), choose the active
    blocks from this step's gradients and store the choice in every view's state. A no-op on
    other steps. Collective on fragments and under ``reduce_gradients`` (every rank reaches it
    at the same step: the schedules are the same on every rank)."""
    if not any(refresh for _, refresh in clocks):
        return
    n = len(group["names"])
    seen = sorted({v.index for v in views})
    if seen != list(range(n)):
        raise ValueError(
            f"block_order='gradnorm' (param group {group.get('name', 'unnamed')!r}) ranks every "
            f"tensor of the group by its gradient norm, but this step() sees {len(seen)} of its "
            f"{n} tensors (DeepSpeed ZeRO-3 steps each sub-group on its own: raise "
            "zero_optimization.sub_group_size above the group's size; fairscale OSS gives each "
            "rank a subset). Use another block_order with this engine."
        )
    k = min(k for k, refresh in clocks if refresh)  # the refresh (optim.density_schedule)
    count = block_count(len(group["names"]), density_at(group, k))
    chosen = top_blocks(block_sumsq(ctx, group, views), count)
    for view in views:
        view.state[FLAG] = torch.tensor(float(view.index in chosen), dtype=torch.float32)


def active_positions(ctx: StepContext, group: dict[str, Any]) -> frozenset[int]:
    """The positions stored as active in the group's state (replicated parameters, where every
    rank holds every tensor's state: ``shard_state`` ownership)."""
    state = ctx.optimizer.state
    return frozenset(i for i, p in enumerate(group["params"]) if p in state and flag_of(state[p]))
