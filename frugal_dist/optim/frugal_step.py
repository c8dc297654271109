"""The FRUGAL step as a pipeline of phases over per-parameter work items.

    plan      counters, refresh decisions, coordinate / random-projection selections, state resets
    reduce    (reduce_gradients, world > 1) exact: one mean all-reduce of every gradient;
              sign: full all-reduce only where exactness is needed (AdamW params, active blocks,
              svd refreshes), a mean all-reduce of the *compact* state-full gradients, and a 1-bit
              majority vote of the local state-free residual signs
    select    svd refreshes: the owner computes the basis, then broadcasts it; at every refresh the
              ranks compare selection fingerprints (one small all-gather)
    split     G_sf = down(G) and the state-free direction F(R) where not already communicated
    state     owners advance the state-full rule (``torch._foreach_*``) -> directions U
    exchange  (shard_state, world > 1) each owner broadcasts the U it computed
    apply     W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(R))

At world size 1 every collective is skipped and the pipeline is the plain FRUGAL step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import (
    allreduce_mean_,
    broadcast_from_owners,
    check_agreement,
    rank_and_world,
    sign_majority,
)
from frugal_dist.core.rules import state_free_direction, state_full_directions
from frugal_dist.core.seeding import projection_seed
from frugal_dist.core.subspaces import (
    ProjectionSelection,
    matrix_shape,
    projection_rank,
    projection_selection,
    resolve_side,
    tensor_fingerprint,
)


@dataclass
class Item:
    """One parameter's work in one step."""

    p: Tensor
    name: str
    group: dict[str, Any]
    st: dict[str, Tensor]
    kind: str  # adamw | free | block | coordinate | projection
    refresh: bool
    k: int
    active: bool  # has a state-full part this step
    owner: int  # rank holding the state-full buffers (computes U)
    g: Tensor  # float32 gradient (matrix view for coordinate / projection)
    sel: Any = None
    g_sf: Tensor | None = None
    free: Tensor | None = None  # state-free direction (param-matrix shaped), None if none
    free_done: bool = False
    u: Tensor | None = None


def apply_update(p: Tensor, direction: Tensor, alpha: float) -> None:
    """``p += alpha * direction``; 16-bit params are updated through float32 (one rounding)."""
    d = direction.view(p.shape)
    if p.dtype in (torch.bfloat16, torch.float16):
        p.copy_(p.float().add_(d, alpha=alpha))
    else:
        p.add_(d.to(p.dtype), alpha=alpha)


def compact_shape(it: Item) -> tuple[int, ...]:
    if it.kind in ("adamw", "block"):
        return tuple(it.p.shape)
    if it.kind == "coordinate":
        return tuple(it.sel.compact_shape)
    shape = matrix_shape(it.p.shape)
    side = resolve_side(it.group["proj_side"], shape)
    r = projection_rank(shape, it.group["density"])
    return (r, shape[1]) if side == "left" else (shape[0], r)


class FrugalStepMixin:
    """The phases of ``FRUGAL.step`` (mixed into ``FRUGAL``; see the module docstring)."""

    # provided by FRUGAL
    state: Any
    param_groups: list[dict[str, Any]]
    comm: Any
    _pg: Any

    def _run_step(self) -> None:
        self.comm.begin_step()
        rank, world = rank_and_world(self._pg)
        items: list[Item] = []
        for group in self.param_groups:
            items.extend(self._plan_group(group, rank, world))
        if not items:
            return
        if self.reduce_gradients and world > 1:
            self._reduce(items, world)
        self._select(items, rank, world)
        self._split(items)
        self._state_full(items, rank)
        if self.shard_state and world > 1:
            self._exchange(items, rank, world)
        self._apply(items)

    # ---------------------------------------------------------------------------------- plan
    def _plan_group(self, group: dict[str, Any], rank: int, world: int) -> list[Item]:
        algo = group["algorithm"]
        kind = {"adamw": "adamw", "signsgd": "free", "sgd": "free"}.get(algo, group["subspace"])
        gap, rule, reset = group["update_gap"], group["state_full"], group["reset_statistics"]
        if kind == "adamw":
            rule = "adamw"
        schedule = self._schedule(group) if kind == "block" else None
        out = []
        for idx, (p, name) in enumerate(zip(group["params"], group["names"])):
            if p.grad is None:
                continue
            st = self.state[p]
            s = self._advance(st)
            k, refresh = s // gap, s % gap == 0
            if kind == "block":
                owner = self._block_owner(group, idx, k, rank, world)
            else:
                owner = self._state_owner(name, rank, world)
            mine = owner == rank
            g = p.grad.float()
            it = Item(p, name, group, st, kind, refresh, k, kind != "free", owner, g)
            if kind == "adamw":
                if mine and "sf_step" not in st:
                    self._reset_buffers(st, rule, tuple(p.shape), p.device)
            elif kind == "block":
                it.active = idx in schedule.active(k)
                if refresh:
                    if not (it.active and mine):
                        self._drop_buffers(st, rule)
                    elif reset or "sf_step" not in st:
                        self._reset_buffers(st, rule, tuple(p.shape), p.device)
            elif kind in ("coordinate", "projection"):
                it.g = g.reshape(matrix_shape(p.shape))
                if kind == "coordinate":
                    it.sel = self._coordinate(p, name, k, group)
                elif not (refresh and group["proj_type"] == "svd"):
                    it.sel = self._projection(p, name, k, group, None)
                if refresh and mine and (reset or "sf_step" not in st):
                    self._reset_buffers(st, rule, compact_shape(it), p.device)
            if it.active and mine:
                st["sf_step"] += 1
            out.append(it)
        return out

    # ---------------------------------------------------------------------------------- reduce
    def _reduce(self, items: list[Item], world: int) -> None:
        if self.residual_comm == "exact":
            allreduce_mean_([it.g for it in items], self._pg, self.comm, "grad_full")
            return
        full, compact, signs, sign_items = [], [], [], []
        for it in items:
            free_rule = it.group["state_free"] if it.kind != "free" else it.group["algorithm"]
            needs_full = (
                it.kind == "adamw"
                or (it.kind == "block" and it.active)
                or (it.kind == "projection" and it.sel is None)  # svd refresh: exact gradient
                or (it.kind == "free" and free_rule == "sgd")
            )
            if needs_full:
                full.append(it.g)
                continue
            if it.kind in ("coordinate", "projection"):
                local = it.sel.gather(it.g) if it.kind == "coordinate" else it.sel.down(it.g)
                if free_rule != "none":
                    if it.kind == "coordinate":
                        resid = it.sel.fill_(it.g.clone(), 0.0)
                    else:
                        resid = it.g - it.sel.up(local)
                    signs.append(resid)
                    sign_items.append(it)
                it.g_sf = local
                compact.append(local)
            elif free_rule != "none":  # inactive block or a signsgd group: signs only
                signs.append(it.g)
                sign_items.append(it)
            it.free_done = True
        allreduce_mean_(full, self._pg, self.comm, "grad_full")
        allreduce_mean_(compact, self._pg, self.comm, "grad_projected")
        for it, vote in zip(sign_items, sign_majority(signs, self._pg, self.comm)):
            it.free = vote

    # ---------------------------------------------------------------------------------- select
    def _select(self, items: list[Item], rank: int, world: int) -> None:
        pending = [it for it in items if it.kind == "projection" and it.sel is None]
        if pending:
            per_rank: list[list[Tensor]] = [[] for _ in range(world)]
            for it in pending:
                shape = matrix_shape(it.p.shape)
                owner = self._plan_owner(it.name, rank, world)
                if owner == rank:
                    sel = projection_selection(
                        shape, it.group["density"], "svd", it.group["proj_side"],
                        projection_seed(it.group["seed"], it.name, it.k), grad=it.g,
                    )  # fmt: skip
                    basis = sel.basis
                else:
                    side = resolve_side(it.group["proj_side"], shape)
                    dim = shape[0] if side == "left" else shape[1]
                    basis = torch.empty(dim, projection_rank(shape, it.group["density"]),
                                        device=it.g.device)  # fmt: skip
                it.st["proj_basis"] = basis
                per_rank[owner].append(basis)
            broadcast_from_owners(per_rank, self._pg, self.comm, "basis_broadcast")
            for it in pending:
                side = resolve_side(it.group["proj_side"], matrix_shape(it.p.shape))
                it.sel = ProjectionSelection(side, it.st["proj_basis"])
                self._selections[it.p] = (it.k, it.sel)
        if world > 1 and self.check_agreement:
            refreshing = [it for it in items if it.refresh and it.kind not in ("adamw", "free")]
            fps = []
            for it in refreshing:
                if it.kind == "block":
                    fps.append(it.k * 2 + int(it.active))
                elif it.kind == "coordinate":
                    fps.append(tensor_fingerprint(it.sel.index))
                else:
                    fps.append(tensor_fingerprint(it.sel.basis))
            check_agreement([it.name for it in refreshing], fps, self._pg, self.comm, "subspace")

    # ---------------------------------------------------------------------------------- split
    def _split(self, items: list[Item]) -> None:
        for it in items:
            if it.kind == "free":
                if not it.free_done:
                    it.free = state_free_direction(it.group["algorithm"], it.g)
                continue
            rule = it.group["state_free"]
            if it.kind in ("adamw",) or (it.kind == "block" and it.active):
                it.g_sf = it.g
            elif it.kind == "block":
                if not it.free_done:
                    it.free = state_free_direction(rule, it.g)
            elif it.kind == "coordinate":
                if it.g_sf is None:
                    it.g_sf = it.sel.gather(it.g)
                if not it.free_done:
                    it.free = state_free_direction(rule, it.g)  # selected entries overwritten
            else:
                if it.g_sf is None:
                    it.g_sf = it.sel.down(it.g)
                if not it.free_done:
                    it.free = state_free_direction(rule, it.g - it.sel.up(it.g_sf))

    # ---------------------------------------------------------------------------------- state
    def _state_full(self, items: list[Item], rank: int) -> None:
        by_group: dict[int, list[Item]] = {}
        for it in items:
            if it.active and it.owner == rank:
                by_group.setdefault(id(it.group), []).append(it)
        for its in by_group.values():
            group = its[0].group
            rule = "adamw" if its[0].kind == "adamw" else group["state_full"]
            dirs = state_full_directions(
                rule, [it.g_sf for it in its], [it.st for it in its],
                [int(it.st["sf_step"].item()) for it in its], group["betas"], group["eps"],
            )  # fmt: skip
            for it, d in zip(its, dirs):
                it.u = d

    def _exchange(self, items: list[Item], rank: int, world: int) -> None:
        per_rank: list[list[Tensor]] = [[] for _ in range(world)]
        for it in items:
            if not it.active:
                continue
            if it.u is None:
                it.u = torch.empty(compact_shape(it), dtype=torch.float32, device=it.g.device)
            per_rank[it.owner].append(it.u)
        broadcast_from_owners(per_rank, self._pg, self.comm, "update_broadcast")

    # ---------------------------------------------------------------------------------- apply
    def _apply(self, items: list[Item]) -> None:
        by_group: dict[int, list[Item]] = {}
        for it in items:
            by_group.setdefault(id(it.group), []).append(it)
        for its in by_group.values():
            group = its[0].group
            lr, wd = group["lr"], group["weight_decay"]
            if wd != 0.0:
                torch._foreach_mul_([it.p for it in its], 1.0 - lr * wd)
            s_p, s_i = group["proj_params_lr_scale"], group["inactive_lr_scale"]
            for it in its:
                if it.kind == "adamw":
                    apply_update(it.p, it.u, -lr)
                elif it.kind == "free":
                    if it.free is not None:
                        apply_update(it.p, it.free, -lr)
                elif it.kind == "block":
                    if it.active:
                        apply_update(it.p, it.u, -lr * s_p)
                    elif it.free is not None:
                        apply_update(it.p, it.free, -lr * s_p * s_i)
                elif it.kind == "coordinate":
                    full = it.free if it.free is not None else torch.zeros_like(it.g)
                    if it.free is not None and s_i != 1.0:
                        full = full * s_i
                    it.sel.scatter_(full, it.u)  # selected: up(U); others: s_i F(R)
                    apply_update(it.p, full, -lr * s_p)
                else:
                    up_u = it.sel.up(it.u)
                    if it.free is None:
                        full = up_u
                    else:
                        full = it.free * s_i if s_i != 1.0 else it.free
                        full = full + up_u
                    apply_update(it.p, full, -lr * s_p)
