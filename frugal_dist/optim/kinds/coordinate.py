"""Coordinate subspaces: S = ``coordinate_count(dim, rho)`` random columns / rows / entries of
the (m, n) matrix view, redrawn from (seed, name, k) at each refresh (rho = rho(k) when the
density decays, ``optim.density_schedule``):

    G_sf = G[S]    U = StateFull(G_sf)     W <- W (1 - lr wd) - lr s_p D,
    D = U on S, s_i F(G) elsewhere          state: compact (m, k) / (k, n) / (k,) tensors

On a fragment the selection is restricted to the rows it touches (``local_coordinates``); its
compact state is the slice of the global compact tensor for those rows (``state_role``
"coordinate").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.core.fragments import local_coordinates
from frugal_dist.core.rules import state_free_direction
from frugal_dist.core.seeding import coordinate_seed
from frugal_dist.core.subspaces import (
    CoordinateSelection,
    coordinate_count,
    coordinate_selection,
    matrix_shape,
    tensor_fingerprint,
)
from frugal_dist.optim.density_schedule import density_at
from frugal_dist.optim.fast_apply import can_batch, coordinate_fusable, local_matrix
from frugal_dist.optim.free_scale import item_scale, matched
from frugal_dist.optim.kinds.base import SubspaceKind
from frugal_dist.optim.param_groups import refuse_in_out
from frugal_dist.optim.sign_reduce import votes_residual
from frugal_dist.optim.step_items import Item, apply_update

if TYPE_CHECKING:
    from frugal_dist.layouts.base import ParamView
    from frugal_dist.optim.phases import ApplyBatches, StepContext


class Coordinate(SubspaceKind):
    name = "coordinate"
    matrix_grad = True

    def state_numel(self, shape: tuple[int, ...], group: dict[str, Any], k: int = 0) -> int:
        m, n = matrix_shape(shape)
        rho = density_at(group, k)
        choice = group["coord_choice"]
        if choice == "columns":
            return m * coordinate_count(n, rho)
        if choice == "rows":
            return coordinate_count(m, rho) * n
        return coordinate_count(m * n, rho)

    def compact_shape(self, it: Item) -> tuple[int, ...]:
        return tuple(it.sel.compact_shape)

    def row_aligned_state(self, group: dict[str, Any]) -> bool:
        # columns: (m, k), one row per parameter row; rows / randk: a slot per selected row /
        # entry, on whichever rank holds it at this refresh
        return group["coord_choice"] == "columns"

    def check_group(self, group: dict[str, Any], where: str) -> None:
        if group["coord_choice"] in ("columns", "rows"):  # randk does not depend on it
            refuse_in_out(group, where, f"coord_choice={group['coord_choice']!r}")

    def state_role(self, group: dict[str, Any], shape: tuple[int, ...], key: str) -> str:
        return "coordinate"

    def current_selection(
        self, view: ParamView, group: dict[str, Any], k: int, ctx: StepContext
    ) -> CoordinateSelection:
        return global_selection(ctx, view, k, group)

    def prepare(self, it: Item, ctx: StepContext) -> None:
        view = it.view
        it.g = local_matrix(view, it.g)
        it.gsel = global_selection(ctx, view, it.k, it.group)
        it.sel = _local_selection(ctx, view, it.k, it.gsel)
        self.reset_at_refresh(it, ctx)

    def sign_parts(self, it: Item) -> tuple[Tensor | None, Tensor | None] | None:
        compact = it.sel.gather(it.g)
        resid = None
        if self.free_rule(it.group) != "none":
            resid = it.sel.fill_(it.g.clone(), 0.0)
        return compact, resid

    def whole_vote_scale(self, it: Item) -> tuple[float, float] | None:
        # rho = 0 on a whole matrix with s_i = 1: W <- W (1 - lr wd) - lr s_p F(G), the voted
        # residual (G, nothing selected) entry for entry the data; otherwise ``apply_one``
        group = it.group
        if it.sel.numel == 0 and it.span.is_full and group["inactive_lr_scale"] == 1.0:
            return group["proj_params_lr_scale"], 1.0
        return None

    def fingerprint(self, it: Item) -> int | None:
        return tensor_fingerprint(it.gsel.index)

    def fuses(self, it: Item, ctx: StepContext) -> bool:
        if matched(it.group):  # the kernel takes a host scale s_i (optim.free_scale)
            return False
        return coordinate_fusable(it, ctx.kernels, ctx.sharded, votes_residual(ctx))

    def down(self, its: list[Item], ctx: StepContext) -> None:
        for it in its:
            if it.g_sf is None and not it.fused:  # fused: the apply kernel gathers G itself
                it.g_sf = it.sel.gather(it.g)

    def free_direction(self, it: Item) -> Tensor | None:
        if it.free_done:
            return it.free
        # F(G) everywhere; the selected entries are overwritten with U in ``apply``
        return state_free_direction(self.free_rule(it.group), it.g)

    def route(self, it: Item, ctx: StepContext, batches: ApplyBatches) -> None:
        group = it.group
        if matched(group):  # a per-tensor device scale: the per-item path (optim.free_scale)
            batches.rest.append(it)
            return
        if can_batch(it):
            if group["inactive_lr_scale"] == 1.0 and it.sel.numel == 0:  # rho = 0: s_p F(G)
                batches.free.append((it, self.free_rule(group), group["proj_params_lr_scale"]))
                return
            if it.u is not None and self.free_rule(group) == "signsgd":
                batches.coords.append(it)
                return
        batches.rest.append(it)

    def apply_one(self, it: Item, ctx: StepContext) -> None:
        group = it.group
        s_p, s_i = group["proj_params_lr_scale"], group["inactive_lr_scale"]
        free = self.free_direction(it)
        full = free if free is not None else torch.zeros_like(it.g)
        if free is not None and matched(group):
            full.mul_(item_scale(it, full, ctx))  # s_i s_t (optim.free_scale)
        elif free is not None and s_i != 1.0:
            full.mul_(s_i)
        it.sel.scatter_(full, it.u)  # selected: up(U); others: s_i F(R)
        apply_update(it.view.data, it.span.unpad(full), -group["lr"] * s_p)

    def matched_sizes(self, it: Item) -> tuple[int, int]:
        m, n = it.span.m, it.span.n
        n_u = self.state_numel(it.view.shape, it.group, it.k)
        return n_u, m * n - n_u

    def update_sumsq(self, it: Item, ctx: StepContext) -> Tensor:
        # the local compact slice: phantom entries of boundary rows hold exactly 0 (their
        # gradient is 0, so are their moments), every global entry is non-zero on one rank only
        return torch.linalg.vector_norm(it.u.float()).square()

    def free_sumsq(self, it: Item, free: Tensor) -> Tensor:
        it.sel.fill_(free, 0.0)  # the selected entries take U (F there: the vote's +-1)
        return torch.linalg.vector_norm(it.span.unpad(free).float()).square()


def global_selection(
    ctx: StepContext, view: ParamView, k: int, group: dict[str, Any]
) -> CoordinateSelection:
    """The global coordinate subspace of ``view``'s parameter at refresh k (cached)."""
    cached = ctx.cache.selections.get(view.name)
    if cached is None or cached[0] != k:
        sel = coordinate_selection(
            matrix_shape(view.shape), density_at(group, k), group["coord_choice"],
            coordinate_seed(group["seed"], view.name, k),
        ).to(view.data.device)  # fmt: skip
        ctx.cache.selections[view.name] = (k, sel)
        return sel
    return cached[1]


def _local_selection(
    ctx: StepContext, view: ParamView, k: int, gsel: CoordinateSelection
) -> CoordinateSelection:
    """``local_coordinates`` of a fragment, cached per refresh (it indexes with a mask, which
    would sync the device every step)."""
    if view.span.is_full:
        return gsel
    cached = ctx.cache.local_selections.get(view.name)
    if cached is not None and cached[0] == k and cached[1] == view.span:
        return cached[2]
    sel = local_coordinates(gsel, view.span)
    ctx.cache.local_selections[view.name] = (k, view.span, sel)
    return sel
