"""Kinds without a subspace: the whole tensor state-full, or the whole tensor state-free.

* ``WholeStateFull`` (``algorithm="adamw"``: AdamW; ``"state_full"``: the group's ``state_full``
  rule):  W <- W (1 - lr wd) - lr U(G), state shaped like W (embeddings, LM head, norms);
* ``WholeFree`` (``algorithm="signsgd"`` / ``"sgd"``):  W <- W (1 - lr wd) - lr F(G), no state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor

from frugal_dist.core.rules import state_free_direction
from frugal_dist.optim.fast_apply import can_batch
from frugal_dist.optim.kinds.base import SubspaceKind, fused_adamw_ok
from frugal_dist.optim.step_items import Item, apply_update, reset_buffers

if TYPE_CHECKING:
    from frugal_dist.optim.phases import ApplyBatches, StepContext


class WholeStateFull(SubspaceKind):
    """The group's state-full rule on every entry."""

    name = "adamw"

    def rule(self, group: dict[str, Any]) -> str:
        return "adamw" if group["algorithm"] == "adamw" else group["state_full"]

    def state_numel(self, shape: tuple[int, ...], group: dict[str, Any], k: int = 0) -> int:
        return math.prod(shape)

    def fuses(self, it: Item, ctx: StepContext) -> bool:
        return self.rule(it.group) == "adamw" and fused_adamw_ok(it, ctx)

    def lr_scale(self, group: dict[str, Any]) -> float:
        return 1.0

    def prepare(self, it: Item, ctx: StepContext) -> None:
        if it.owner == ctx.rank and "sf_step" not in it.st:
            reset_buffers(
                it.st, self.rule(it.group), tuple(it.view.data.shape), it.view.data.device
            )

    def free_direction(self, it: Item) -> Tensor | None:
        return None

    def apply_one(self, it: Item, ctx: StepContext) -> None:
        apply_update(it.view.data, it.u, -it.group["lr"])


class WholeFree(SubspaceKind):
    """The state-free rule (``algorithm`` = signsgd | sgd) on every entry; no state."""

    name = "free"

    def free_rule(self, group: dict[str, Any]) -> str:
        return group["algorithm"]

    def state_numel(self, shape: tuple[int, ...], group: dict[str, Any], k: int = 0) -> int:
        return 0

    def is_active(self, ctx: StepContext, group: dict[str, Any], view: Any, k: int) -> bool:
        return False

    def sign_parts(self, it: Item) -> tuple[Tensor | None, Tensor | None] | None:
        rule = self.free_rule(it.group)
        if rule == "sgd":  # plain SGD needs the exact mean gradient
            return None
        return None, (it.g if rule != "none" else None)

    def whole_vote_scale(self, it: Item) -> tuple[float, float] | None:
        return 1.0, 1.0  # W <- W (1 - lr wd) - lr F

    def free_direction(self, it: Item) -> Tensor | None:
        if it.free_done:
            return it.free
        return state_free_direction(self.free_rule(it.group), it.g)

    def route(self, it: Item, ctx: StepContext, batches: ApplyBatches) -> None:
        if can_batch(it):
            batches.free.append((it, self.free_rule(it.group), 1.0))
        else:
            batches.rest.append(it)

    def apply_one(self, it: Item, ctx: StepContext) -> None:
        free = self.free_direction(it)
        if free is not None:
            apply_update(it.view.data, free, -it.group["lr"])
