"""Block subspaces (BAdam-style): S = whole tensors; ``block_count(n, rho)`` of a group's n
tensors are active during refresh k (``core.subspaces.BlockSchedule``; rho = rho(k) when the
density decays, ``optim.density_schedule``):

    active:   W <- W (1 - lr wd) - lr s_p U(G)          state shaped like W, reset at refresh
    inactive: W <- W (1 - lr wd) - lr s_p s_i F(G)      no state

(``state_free="swan"`` whitens the whole matrix of an inactive tensor: ``optim.matrix_free``; its
items take the per-item path.)

The schedule is drawn over the group's names (or the layout's full list, ``schedule_names``:
fairscale OSS), so every rank and engine activates the same tensors. ``block_order="gradnorm"``
chooses the active tensors from the gradient at each refresh instead (``plan_group``,
``optim.block_gradnorm``: the same choice on every rank, kept in the state as ``block_active``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor

from frugal_dist.core.rules import MATRIX_FREE_RULES, state_free_direction
from frugal_dist.core.seeding import block_seed
from frugal_dist.core.subspaces import BlockSchedule, block_count
from frugal_dist.optim import block_gradnorm, density_schedule
from frugal_dist.optim.density_schedule import density_at
from frugal_dist.optim.fast_apply import can_batch
from frugal_dist.optim.kinds.base import SubspaceKind, fused_adamw_ok
from frugal_dist.optim.matrix_free import whole_matrix
from frugal_dist.optim.ownership import block_owner
from frugal_dist.optim.step_items import Item, apply_update, drop_buffers, reset_buffers

if TYPE_CHECKING:
    from frugal_dist.layouts.base import ParamView
    from frugal_dist.optim.phases import ApplyBatches, StepContext


class Block(SubspaceKind):
    name = "block"

    def state_numel(self, shape: tuple[int, ...], group: dict[str, Any], k: int = 0) -> int:
        return math.prod(shape)  # while active (the sharding weight of a block tensor)

    def owner(self, ctx: StepContext, group: dict[str, Any], index: int, name: str, k: int) -> int:
        return block_owner(ctx, group, index, k)

    def check_group(self, group: dict[str, Any], where: str) -> None:
        """``block_order="mirror"`` needs an even active count, round(density x tensors): refused
        when the group is added, not at its first step (a layout that schedules over a longer
        name list, fairscale OSS, is checked again there)."""
        n = len(group["params"])
        if group.get("block_order") == "mirror" and n and block_count(n, group["density"]) % 2:
            try:
                BlockSchedule(n, group["density"], "mirror", 0)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None

    def plan_group(
        self, ctx: StepContext, group: dict[str, Any], views: list[ParamView],
        clocks: list[tuple[int, bool]],
    ) -> None:  # fmt: skip
        if block_gradnorm.uses_gradnorm(group):
            block_gradnorm.refresh_choice(ctx, group, views, clocks)

    def is_active(self, ctx: StepContext, group: dict[str, Any], view: ParamView, k: int) -> bool:
        if block_gradnorm.uses_gradnorm(group):
            return block_gradnorm.flag_of(view.state)
        key = ("block-active", id(group), k)  # looked up once per group and refresh per step
        active = ctx.memo.get(key)
        if active is None:
            active = ctx.memo[key] = static_active(ctx, group, k)
        return view.index in active

    def fuses(self, it: Item, ctx: StepContext) -> bool:
        group = it.group
        adamw = group["state_full"] == "adamw" and group["proj_params_lr_scale"] > 0
        return adamw and fused_adamw_ok(it, ctx)

    def prepare(self, it: Item, ctx: StepContext) -> None:
        if not it.refresh:
            return
        rule = self.rule(it.group)
        if not (it.active and it.owner == ctx.rank):
            drop_buffers(it.st, rule)
        elif it.group["reset_statistics"] or "sf_step" not in it.st:
            reset_buffers(it.st, rule, tuple(it.view.data.shape), it.view.data.device)

    def sign_parts(self, it: Item) -> tuple[Tensor | None, Tensor | None] | None:
        if it.active:
            return None
        return None, (it.g if self.free_rule(it.group) != "none" else None)

    def whole_vote_scale(self, it: Item) -> tuple[float, float] | None:
        if it.active:
            return None
        return it.group["proj_params_lr_scale"], it.group["inactive_lr_scale"]

    def fingerprint(self, it: Item) -> int | None:
        # the refresh, whether this tensor is active, and the refresh's active count (its size)
        n = len(it.group["names"])
        count = block_count(n, density_at(it.group, it.k))
        return (it.k * 2 + int(it.active)) * (n + 1) + count

    def free_direction(self, it: Item) -> Tensor | None:
        if it.free_done:
            return it.free
        rule = self.free_rule(it.group)
        if rule in MATRIX_FREE_RULES:
            return state_free_direction(rule, whole_matrix(it, it.g))
        return state_free_direction(rule, it.g)

    def route(self, it: Item, ctx: StepContext, batches: ApplyBatches) -> None:
        elementwise = self.free_rule(it.group) not in MATRIX_FREE_RULES
        if not it.active and elementwise and can_batch(it):
            scale = it.group["proj_params_lr_scale"] * it.group["inactive_lr_scale"]
            batches.free.append((it, self.free_rule(it.group), scale))
        else:
            batches.rest.append(it)

    def apply_one(self, it: Item, ctx: StepContext) -> None:
        group = it.group
        lr, s_p = group["lr"], group["proj_params_lr_scale"]
        if it.active:
            apply_update(it.view.data, it.u, -lr * s_p)
            return
        s_i = group["inactive_lr_scale"]
        free = self.free_direction(it)
        if free is not None:
            apply_update(it.view.data, free, -lr * s_p * s_i)


def active_blocks(ctx: StepContext, group: dict[str, Any], k: int) -> frozenset[int]:
    """Positions of the group's tensors active during refresh ``k``: the schedule's, or under
    ``gradnorm`` the choice stored at that refresh (every tensor's state on this rank:
    replicated parameters, as ``shard_state`` ownership needs)."""
    if block_gradnorm.uses_gradnorm(group):
        return block_gradnorm.active_positions(ctx, group)
    return static_active(ctx, group, k)


def static_active(ctx: StepContext, group: dict[str, Any], k: int) -> frozenset[int]:
    """The active positions of a static order at refresh ``k``: the group's ``BlockSchedule``,
    or, when the density decays, the count of that refresh (``optim.density_schedule``)."""
    if not density_schedule.decays(group):
        return schedule(ctx, group).active(k)
    names = schedule_names(ctx, group)
    return density_schedule.active_blocks(len(names), group, block_seed(group["seed"], names), k)


def schedule_names(ctx: StepContext, group: dict[str, Any]) -> list[str]:
    """The names a group's schedule is drawn over: the layout's full list when the bound layout
    says this group holds a subset (``schedule_names``: fairscale OSS), else the group's."""
    full = getattr(ctx.layout, "schedule_names", None)
    return full(ctx.optimizer, group) if full is not None else group["names"]


def schedule(ctx: StepContext, group: dict[str, Any]) -> BlockSchedule:
    """The group's block schedule, rebuilt only when its options change (not every step: the
    seed hashes every name of the group). It is drawn over the layout's full name list when the
    bound layout says this group holds a subset (``schedule_names``: fairscale OSS), so every
    rank picks the blocks the unsharded run picks."""
    names = schedule_names(ctx, group)
    key = (id(group), len(names), group["density"], group["block_order"], group["seed"])
    cache = ctx.cache.schedules
    if key not in cache:
        cache[key] = BlockSchedule(key[1], key[2], key[3], block_seed(group["seed"], names))
    return cache[key]
