"""Which rank owns a parameter's state-full work.

Ownership matters only for replicated parameters (DDP, plain torchrun) with ``shard_state=True``
(ZeRO-1 for the state-full buffers); one-off work done by a single rank (the svd refresh) balances
its own owners (``kinds.projection.svd_refresh``). The plan is a pure function of parameter
names, shapes and group options, so every rank computes the same owners without communicating:

* the weight of a parameter is its expected float32 state-full bytes
  (``SubspaceKind.expected_state_bytes``: #buffers of the rule x 4 B x the whole tensor for
  state-full / block groups, the compact subspace size for coordinate and projection groups, 0
  for state-free groups);
* ``frugal_dist.optim.sharding.assign_owners`` balances these weights longest-first;
* block tensors with ``reset_statistics=True`` are re-balanced over the *active* set at every
  refresh (their statistics restart there anyway); with ``reset_statistics=False`` they keep the
  static owner so kept moments never move between ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from frugal_dist.optim.refresh_schedule import refresh_of_last_step
from frugal_dist.optim.sharding import ShardPlan, assign_owners
from frugal_dist.optim.step_items import drop_buffers

if TYPE_CHECKING:
    from frugal_dist.optim.phases import StepContext


def shard_plan(ctx: StepContext) -> ShardPlan:
    """The static plan over every parameter (cached until the groups or world size change)."""
    from frugal_dist.optim.kinds import kind_for

    plan = ctx.cache.shard_plan
    if plan is None or len(plan.load) != ctx.world:
        weights: dict[str, int] = {}
        for group in ctx.param_groups:
            kind = kind_for(group)
            for p, name in zip(group["params"], group["names"]):
                weights[name] = kind.expected_state_bytes(tuple(p.shape), group)
        plan = ctx.cache.shard_plan = assign_owners(weights, ctx.world)
    return plan


def state_owner(ctx: StepContext, name: str) -> int:
    """Rank that holds ``name``'s state-full buffers (every rank unless ``shard_state``)."""
    if not ctx.sharded:
        return ctx.rank
    return shard_plan(ctx).owner[name]


def block_owner(ctx: StepContext, group: dict[str, Any], idx: int, k: int) -> int:
    """Owner of block tensor ``idx`` during refresh ``k``: the active set is balanced anew at
    each refresh (LPT by size) because statistics restart there anyway. With
    ``reset_statistics=False`` ownership stays static so kept moments never move."""
    from frugal_dist.optim.kinds.block import active_blocks

    if not ctx.sharded:
        return ctx.rank
    if not group["reset_statistics"]:
        return shard_plan(ctx).owner[group["names"][idx]]
    key = (id(group), k, ctx.world)
    owners = ctx.cache.block_owners
    if key not in owners:
        active = sorted(active_blocks(ctx, group, k))
        weights = {str(i): group["params"][i].numel() for i in active}
        plan = assign_owners(weights, ctx.world)
        owners.clear()
        owners[key] = {int(i): r for i, r in plan.owner.items()}
    return owners[key].get(idx, ctx.rank)


def release_unowned_state(ctx: StepContext, state: Any) -> int:
    """Drop the state-full buffers (and ``sf_step``) this rank does not own under
    ``shard_state`` at the current world size; keep every ``step`` counter (and svd bases,
    which every rank holds). For state loaded from a merged, world-size-free state dict
    (``frugal_dist.train.checkpoint_engines``). Returns the number of parameters pruned; a
    no-op without ``shard_state`` or at world size 1."""
    from frugal_dist.optim.kinds import kind_for

    if not ctx.sharded:
        return 0
    pruned = 0
    for group in ctx.param_groups:
        kind = kind_for(group)
        for idx, (p, name) in enumerate(zip(group["params"], group["names"])):
            st = state.get(p)
            if not st or "sf_step" not in st:
                continue
            k = refresh_of_last_step(group, st)  # the refresh of its last step
            if kind.owner(ctx, group, idx, name, k) != ctx.rank:
                drop_buffers(st, kind.rule(group))
                pruned += 1
    return pruned


def shard_report(ctx: StepContext) -> dict[str, Any]:
    """The ownership plan: expected state bytes per rank and the imbalance (max / mean)."""
    plan = shard_plan(ctx)
    return {"world_size": ctx.world, "sharded": ctx.shard_state, "load_bytes": list(plan.load),
            "imbalance": plan.imbalance}  # fmt: skip
