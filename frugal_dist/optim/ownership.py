"""Which rank owns a parameter's state-full work (mixed into ``FRUGAL``).

Ownership matters only for replicated parameters (DDP, plain torchrun) with ``shard_state=True``
(ZeRO-1 for the state-full buffers) and for one-off work done by a single rank (the svd refresh).
The plan is a pure function of parameter names, shapes and group options, so every rank computes
the same owners without communicating:

* the weight of a parameter is its expected float32 state-full bytes (``expected_state_bytes``):
  (#buffers of the rule) x 4 B x (whole tensor for AdamW / block groups, the compact subspace
  size for coordinate and projection groups; 0 for state-free groups);
* ``frugal_dist.optim.sharding.assign_owners`` balances these weights longest-first;
* block tensors with ``reset_statistics=True`` are re-balanced over the *active* set at every
  refresh (their statistics restart there anyway); with ``reset_statistics=False`` they keep the
  static owner so kept moments never move between ranks.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from frugal_dist.comm.collectives import rank_and_world
from frugal_dist.core.rules import state_full_keys
from frugal_dist.core.subspaces import (
    coordinate_count,
    matrix_shape,
    projection_rank,
    resolve_side,
)
from frugal_dist.optim.sharding import ShardPlan, assign_owners
from frugal_dist.optim.step_items import item_kind, whole_rule


class ShardOwnershipMixin:
    """Owner ranks of parameters and active blocks (mixed into ``FRUGAL``, which provides
    ``_schedule(group)``, the group's block schedule)."""

    param_groups: list[dict[str, Any]]
    state: Any
    shard_state: bool
    _pg: Any
    _plan: ShardPlan | None
    _block_owners: dict[tuple, dict[int, int]]

    def _shard_plan(self, world: int) -> ShardPlan:
        """The static plan over every parameter (cached until the groups or world size change)."""
        if self._plan is None or len(self._plan.load) != world:
            weights: dict[str, int] = {}
            for group in self.param_groups:
                for p, name in zip(group["params"], group["names"]):
                    weights[name] = expected_state_bytes(p, group)
            self._plan = assign_owners(weights, world)
        return self._plan

    def _plan_owner(self, name: str, rank: int, world: int) -> int:
        """Rank that computes one-off work for ``name`` (e.g. its svd refresh)."""
        return 0 if world == 1 else self._shard_plan(world).owner[name]

    def _state_owner(self, name: str, rank: int, world: int) -> int:
        """Rank that holds ``name``'s state-full buffers (every rank unless ``shard_state``)."""
        if not self.shard_state or world == 1:
            return rank
        return self._shard_plan(world).owner[name]

    def _block_owner(self, group: dict[str, Any], idx: int, k: int, rank: int, world: int) -> int:
        """Owner of block tensor ``idx`` during refresh ``k``: the active set is balanced anew at
        each refresh (LPT by size) because statistics restart there anyway. With
        ``reset_statistics=False`` ownership stays static so kept moments never move."""
        if not self.shard_state or world == 1:
            return rank
        if not group["reset_statistics"]:
            return self._shard_plan(world).owner[group["names"][idx]]
        key = (id(group), k, world)
        if key not in self._block_owners:
            active = sorted(self._schedule(group).active(k))
            weights = {str(i): group["params"][i].numel() for i in active}
            plan = assign_owners(weights, world)
            self._block_owners = {key: {int(i): r for i, r in plan.owner.items()}}
        return self._block_owners[key].get(idx, rank)

    def release_unowned_state(self) -> int:
        """Drop the state-full buffers (and ``sf_step``) this rank does not own under
        ``shard_state`` at the current world size; keep every ``step`` counter (and svd bases,
        which every rank holds). For state loaded from a merged, world-size-free state dict
        (``frugal_dist.train.checkpoint_engines``). Returns the number of parameters pruned; a
        no-op without ``shard_state`` or at world size 1."""
        rank, world = rank_and_world(self._pg)
        if not self.shard_state or world == 1:
            return 0
        pruned = 0
        state = self.state
        for group in self.param_groups:
            kind = item_kind(group)
            if kind == "free":
                continue
            rule = whole_rule(group)
            for idx, (p, name) in enumerate(zip(group["params"], group["names"])):
                st = state.get(p)
                if not st or "sf_step" not in st:
                    continue
                if kind == "block":
                    done = int(st["step"].item()) if "step" in st else 0
                    k = max(done - 1, 0) // group["update_gap"]
                    owner = self._block_owner(group, idx, k, rank, world)
                else:
                    owner = self._state_owner(name, rank, world)
                if owner != rank:
                    for key in (*state_full_keys(rule), "sf_step"):
                        st.pop(key, None)
                    pruned += 1
        return pruned

    def shard_report(self) -> dict[str, Any]:
        """The ownership plan: expected state bytes per rank and the imbalance (max / mean)."""
        _, world = rank_and_world(self._pg)
        plan = self._shard_plan(world)
        return {"world_size": world, "sharded": self.shard_state, "load_bytes": list(plan.load),
                "imbalance": plan.imbalance}  # fmt: skip


def expected_state_bytes(p: Tensor, group: dict[str, Any]) -> int:
    """Float32 state-full bytes of ``p`` under ``group``'s options (the sharding weight)."""
    algo = group["algorithm"]
    if algo in ("signsgd", "sgd"):
        return 0
    per = 4 * len(state_full_keys("adamw" if algo == "adamw" else group["state_full"]))
    if algo in ("adamw", "state_full") or group["subspace"] == "block":
        return per * p.numel()
    m, n = matrix_shape(p.shape)
    rho = group["density"]
    if group["subspace"] == "coordinate":
        choice = group["coord_choice"]
        count = {"columns": m * coordinate_count(n, rho),
                 "rows": coordinate_count(m, rho) * n,
                 "randk": coordinate_count(m * n, rho)}[choice]  # fmt: skip
        return per * count
    r = projection_rank((m, n), rho, group["proj_side"], group["proj_type"])
    side = resolve_side(group["proj_side"], (m, n))
    return per * r * (n if side == "left" else m)
