"""The FRUGAL step as a pipeline of phases over per-parameter work items.

    check     (nonfinite != "ignore") one fused inf/nan test of every local gradient, the flag
              all-reduced; a bad step returns here with nothing touched
    plan      views of every parameter (whole tensors, or fragments from a bound layout), step
              counters, refresh decisions, coordinate / random-projection selections restricted to
              the local rows, state resets. Host cost per parameter is kept small (the step is
              launch-bound on a GPU): whole-tensor views are cached per group, the CPU counters
              are read with ``item()`` and advanced with ``fill_`` (no device sync)
    reduce    (reduce_gradients, dense, world > 1) exact: one mean all-reduce of every gradient;
              sign: full all-reduce only where exactness is needed (AdamW params, active blocks,
              svd refreshes), a mean all-reduce of the *compact* state-full gradients, and a 1-bit
              majority vote of the local state-free residual signs
    select    svd refreshes: the owner gets the full gradient (local, or one ``reduce`` of the
              fragments over ``process_group``), computes its bases batched by shape
              (``optim.svd_refresh``, ``svd_method``) and broadcasts them; at every
              refresh the ranks compare selection fingerprints (one small all-gather). Both go
              over the layout's ``agreement_group`` (HSDP: every replica too)
    down      G_sf = down(G): whole matrices batched by (shape, side, rank) through
              ``kernels.projection.project_down`` (``optim.projection_batch``); for fragments,
              partial projections are summed over ranks in one coalesced all-reduce (right:
              boundary rows only; left: the (r, n) products)
    state     owners advance the state-full rule (``torch._foreach_*``) -> directions U
    exchange  (shard_state, world > 1) each owner broadcasts the U it computed
    apply     W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(R)); fragments drop phantom entries.
              Fused items run their state phase inside the apply kernel (``optim.fast_apply``:
              whole-tensor AdamW, columns / rows coordinates); pure state-free updates (signSGD /
              SGD groups, inactive blocks, rho = 0) go through ``free_apply_`` over all tensors
              at once; whole projection matrices through ``apply_projection`` per (shape, side,
              rank) batch. These fold the weight decay; the rest decays first, then applies

At world size 1 every collective is skipped and the pipeline is the plain FRUGAL step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from frugal_dist.comm.collectives import (
    allreduce_mean_,
    broadcast_from_owners,
    check_agreement,
    global_rank,
    rank_and_world,
    sign_majority,
)
from frugal_dist.comm.participants import probe
from frugal_dist.comm.preflight import check_optimizer_agreement
from frugal_dist.core.fragments import local_coordinates, local_projection
from frugal_dist.core.rules import (
    state_free_direction,
    state_free_direction_,
    state_full_directions,
)
from frugal_dist.core.subspaces import (
    ProjectionSelection,
    matrix_shape,
    resolve_side,
    tensor_fingerprint,
)
from frugal_dist.layouts.base import ParamView
from frugal_dist.optim.fast_apply import (
    apply_coordinate_batch,
    apply_free_batch,
    apply_fused,
    apply_projection_batch,
    batchable_coordinate,
    batchable_free,
    batchable_projection,
    coordinate_fusable,
    local_matrix,
)
from frugal_dist.optim.nonfinite import grads_are_finite
from frugal_dist.optim.projection_batch import (
    apply_batched,
    down_batched,
    gemm_precision,
    projection_backend,
)
from frugal_dist.optim.sharding import assign_owners
from frugal_dist.optim.step_items import (
    Item,
    apply_update,
    compact_shape,
    increment_counters,
    item_kind,
    whole_rule,
)
from frugal_dist.optim.svd_refresh import basis_shape, owner_bases


class FrugalStepMixin:
    """The phases of ``FRUGAL.step`` (mixed into ``FRUGAL``; see the module docstring)."""

    state: Any
    param_groups: list[dict[str, Any]]
    comm: Any
    _pg: Any
    _layout: Any

    def _run_step(self) -> None:
        self.comm.begin_step()
        # Views first: the first one may bind a layout (FSDP2), which sets the process group.
        views = [(group, self._views(group)) for group in self.param_groups]
        rank, world = rank_and_world(self._pg)
        agreement = self._agreement_pg()
        if rank_and_world(agreement)[1] > 1 and not getattr(self, "_agreed", False):
            # once (and after a new group / layout / loaded state): every rank compares the
            # options, group hyper-parameters and parameter names (+ shapes) -- one int64
            # all-gather when they agree; a mismatch raises on every rank naming the field.
            # Without that check, an optimizer that will issue collectives probes (4 B) that
            # every rank of its group is here. Both bounded in time (comm.participants).
            if self.check_agreement:
                check_optimizer_agreement(self, agreement)
            elif self._issues_collectives():
                probe(agreement, "first step (check_agreement=False)")
            self._agreed = True
        if self.nonfinite != "ignore" and not self._check_finite(views, world):
            return
        items: list[Item] = []
        for group, group_views in views:
            items.extend(self._plan_group(group, group_views, rank, world))
        if not items:
            return
        if self.reduce_gradients and world > 1:
            self._reduce(items)
        self._select(items, rank, world)
        self._down(items, world)
        self._state_full(items, rank)
        if self.shard_state and world > 1:
            self._exchange(items, world)
        self._apply(items)

    def _issues_collectives(self) -> bool:
        """Whether steps communicate at world size > 1 beyond the agreement checks: a layout,
        FRUGAL's own reduction or state sharding, or svd bases handed over by their owner."""
        return (
            self._layout is not None
            or self.reduce_gradients
            or self.shard_state
            or any(g["algorithm"] == "frugal" and g["subspace"] == "projection"
                   and g["proj_type"] == "svd" for g in self.param_groups)
        )  # fmt: skip

    def _agreement_pg(self) -> Any:
        """The ranks that must agree on seeds, options, subspaces and svd bases: the layout's
        ``agreement_group`` (HSDP: every mesh dim), else ``process_group``."""
        return getattr(self._layout, "agreement_group", self._pg)

    def _check_finite(self, views: list[tuple[dict, list[ParamView]]], world: int) -> bool:
        """One fused inf/nan check of every local gradient (see ``optim.nonfinite``); False:
        skip this step (nothing touched)."""
        names = [v.name for _, vs in views for v in vs]
        grads = [v.grad for _, vs in views for v in vs]
        # Replicated gradients (DDP-reduced, or one rank alone) are equal on every rank: the
        # local answer is every rank's, with no collective. Fragments (a layout) and gradients
        # FRUGAL reduces itself differ per rank: the flag is all-reduced over the group.
        if not (self._layout is not None or self.reduce_gradients):
            world = 1
        ok, first = grads_are_finite(names, grads, self._pg, world)
        if ok:
            return True
        if self.nonfinite == "raise":
            where = f"first in parameter {first!r}" if first is not None else "on another rank"
            raise FloatingPointError(
                f"FRUGAL.step: non-finite (inf/nan) gradient, {where}; nothing was updated. "
                "Use nonfinite='skip' to skip such steps (e.g. under fp16 loss scaling)"
            )
        self._skipped += 1
        return False

    # ---------------------------------------------------------------------------------- plan
    def _plan_group(
        self, group: dict[str, Any], views: list[ParamView], rank: int, world: int
    ) -> list[Item]:
        kind = item_kind(group)
        gap, rule, reset = group["update_gap"], whole_rule(group), group["reset_statistics"]
        schedule = self._schedule(group) if kind == "block" else None
        sharded = self.shard_state and world > 1
        reduced_here = self.reduce_gradients and world > 1
        fused_ok = rule == "adamw" and not sharded and kind in ("adamw", "block")
        fused_ok = fused_ok and (kind == "adamw" or group["proj_params_lr_scale"] > 0)
        live = [view for view in views if view.grad is not None]
        out: list[Item] = []
        bumped: list[Item] = []  # items whose sf_step this step increments
        active_sets: dict[int, frozenset[int]] = {}
        fusable = False
        for view, s in zip(live, self._advance_all([view.state for view in live])):
            st = view.state
            k, refresh = s // gap, s % gap == 0
            if kind == "block":
                owner = self._block_owner(group, view.index, k, rank, world)
                act = active_sets.get(k)
                if act is None:
                    act = active_sets[k] = schedule.active(k)
                active = view.index in act
            else:
                owner = self._state_owner(view.name, rank, world)
                active = kind != "free"
            mine = owner == rank
            # State-free-only tensors need no float32 copy of a 16-bit gradient (sign and the
            # promoted add give the same result), unless FRUGAL reduces the gradients itself.
            g = view.grad if (not active and not reduced_here) else view.grad.float()
            it = Item(view, group, kind, refresh, k, active, owner, g)
            dev = view.data.device
            if kind == "adamw":
                if mine and "sf_step" not in st:
                    self._reset_buffers(st, rule, tuple(view.data.shape), dev)
            elif kind == "block":
                if refresh:
                    if not (active and mine):
                        self._drop_buffers(st, rule)
                    elif reset or "sf_step" not in st:
                        self._reset_buffers(st, rule, tuple(view.data.shape), dev)
            elif kind in ("coordinate", "projection"):
                it.g = local_matrix(view, g)
                if kind == "coordinate":
                    it.gsel = self._coordinate(view, k, group)
                    it.sel = self._local_selection(view, k, it.gsel)
                    sign_vote = reduced_here and self.residual_comm == "sign"
                    fusable = coordinate_fusable(it, self.kernels, sharded, sign_vote)
                elif not (refresh and group["proj_type"] == "svd"):
                    it.gsel = self._projection(view, k, group)
                    it.sel = local_projection(it.gsel, view.span)
                if refresh and mine and (reset or "sf_step" not in st):
                    self._reset_buffers(st, rule, compact_shape(it), dev)
            if active and mine:
                bumped.append(it)
                it.fused = fusable if kind == "coordinate" else fused_ok and self._fused_for(view)
            out.append(it)
        counts = increment_counters([it.st for it in bumped], "sf_step")
        for it, t in zip(bumped, counts):
            it.sf_t = t
        return out

    def _fused_for(self, view: ParamView) -> bool:
        """Use ``torch._fused_adamw_`` for this whole-tensor AdamW item: float32 data and
        gradient (the kernel wants one dtype for params, grads and moments), non-empty, and
        ``fused=True`` or (``fused=None`` and a CUDA tensor or ``kernels="triton"``)."""
        if self.fused is False or view.data.numel() == 0:
            return False
        if view.data.dtype != torch.float32 or view.grad.dtype != torch.float32:
            return False
        return bool(self.fused) or view.data.device.type == "cuda" or self.kernels == "triton"

    def _local_selection(self, view: ParamView, k: int, gsel: Any) -> Any:
        """``local_coordinates`` of a fragment, cached per refresh (it indexes with a mask,
        which would sync the device every step)."""
        if view.span.is_full:
            return gsel
        cached = self._local_sel.get(view.name)
        if cached is not None and cached[0] == k and cached[1] == view.span:
            return cached[2]
        sel = local_coordinates(gsel, view.span)
        self._local_sel[view.name] = (k, view.span, sel)
        return sel

    # ---------------------------------------------------------------------------------- reduce
    def _reduce(self, items: list[Item]) -> None:
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
            if it.kind == "coordinate":
                local = it.sel.gather(it.g)
                if free_rule != "none":
                    signs.append(it.sel.fill_(it.g.clone(), 0.0))
                    sign_items.append(it)
                it.g_sf = local
                compact.append(local)
            elif it.kind == "projection":
                with gemm_precision(it.group, it.g.device):
                    local = it.sel.down(it.g)
                    resid = it.g - it.sel.up(local) if free_rule != "none" else None
                if resid is not None:
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
            self._svd_refresh(pending, rank, world)
        agreement = self._agreement_pg()
        if rank_and_world(agreement)[1] > 1 and self.check_agreement:
            refreshing = [it for it in items if it.refresh and it.kind not in ("adamw", "free")]
            fps = []
            for it in refreshing:
                if it.kind == "block":
                    fps.append(it.k * 2 + int(it.active))
                elif it.kind == "coordinate":
                    fps.append(tensor_fingerprint(it.gsel.index))
                else:
                    fps.append(tensor_fingerprint(it.gsel.basis))
            check_agreement([it.name for it in refreshing], fps, agreement, self.comm, "subspace")

    def _svd_refresh(self, pending: list[Item], rank: int, world: int) -> None:
        """Each basis is computed once, by an owner, from the full gradient, then broadcast.

        Owners are balanced over the agreement group (HSDP: every rank of every replica). With a
        layout, the owner's shard group (its replica) reduces the gradient fragments onto it
        (``process_group``); the owner's broadcast then reaches every rank of every replica."""
        sharded = self._layout is not None
        agreement = self._agreement_pg()
        arank, aworld = rank_and_world(agreement)
        peer = getattr(self._layout, "shard_peer", None)  # agreement rank -> my shard group's
        if aworld > 1:
            weights = {it.name: it.span.m * it.span.n for it in pending}
            owners = assign_owners(weights, aworld).owner
        else:
            owners = {it.name: 0 for it in pending}
        per_rank: list[list[Tensor]] = [[] for _ in range(aworld)]
        mine: list[tuple[Item, Tensor]] = []
        for it in pending:
            shape = matrix_shape(it.view.shape)
            owner = owners[it.name]
            # The gradient in its own precision (float32 at least): SVD bases are sensitive to
            # last-bit differences when singular values are close.
            raw = it.view.grad
            dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
            full_g = it.span.pad(raw.reshape(-1).to(dtype))
            dst = owner if peer is None else peer(owner)
            if sharded and world > 1 and dst is not None:  # fragments onto the owner only
                buf = torch.zeros(shape[0] * shape[1], device=it.g.device, dtype=dtype)
                sp = it.span
                buf[sp.start : sp.start + sp.numel] = raw.reshape(-1).to(dtype)
                dist.reduce(buf, dst=global_rank(self._pg, dst), group=self._pg)
                self.comm.add("svd_gather", buf.nbytes, buf.nbytes)
                full_g = buf.view(shape)
            if owner == arank:
                mine.append((it, full_g))
        # the owner's bases, batched over same-shape matrices (optim.svd_refresh: svd_method)
        computed = dict(zip((id(it) for it, _ in mine),
                            owner_bases([it for it, _ in mine], [g for _, g in mine])))  # fmt: skip
        for it in pending:
            basis = computed.get(id(it))
            if basis is None:
                dim, r = basis_shape(it)
                basis = torch.empty(dim, r, device=it.g.device)
            per_rank[owners[it.name]].append(basis)
            it.st["proj_basis"] = basis
        broadcast_from_owners(per_rank, agreement, self.comm, "basis_broadcast", bounded=True)
        for it in pending:
            side = resolve_side(it.group["proj_side"], matrix_shape(it.view.shape))
            it.gsel = ProjectionSelection(side, it.st["proj_basis"])
            it.sel = local_projection(it.gsel, it.span)
            self._selections[it.name] = (it.k, it.gsel)

    # ---------------------------------------------------------------------------------- down
    def _down(self, items: list[Item], world: int) -> None:
        partial: list[Item] = []
        # batched GEMMs for whole matrices (optim.projection_batch); per item below where the
        # ranks sum partial products (a bound layout at world > 1: every rank takes part)
        fragments = self._layout is not None and world > 1
        done = set() if fragments else down_batched(items, self.kernels, self._kernel_cache)
        for it in items:
            if it.kind in ("adamw", "free") or (it.kind == "block" and it.active):
                if it.kind != "free":
                    it.g_sf = it.g
            elif it.kind == "coordinate" and it.g_sf is None and not it.fused:
                it.g_sf = it.sel.gather(it.g)
            elif it.kind == "projection" and it.g_sf is None and id(it) not in done:
                with gemm_precision(it.group, it.g.device):
                    it.g_sf = it.sel.down(it.g)
                if self._layout is not None and world > 1:
                    partial.append(it)
        if partial:
            self._sum_partial_projections(partial)

    @staticmethod
    def _free_direction(it: Item) -> Tensor | None:
        """F(R) of one item, computed when it is applied (one full-size temporary at a time)."""
        if it.free_done:
            return it.free
        rule = it.group["algorithm"] if it.kind == "free" else it.group["state_free"]
        if it.kind == "free" or (it.kind == "block" and not it.active) or it.kind == "coordinate":
            return state_free_direction(rule, it.g)  # coordinate: selected entries overwritten
        if it.kind == "projection":
            if it.sel.rank == 0:  # rho = 0: R = G, no projection at all
                return state_free_direction(rule, it.g)
            return state_free_direction_(rule, it.sel.residual(it.g, it.g_sf))
        return None

    def _sum_partial_projections(self, items: list[Item]) -> None:
        """Fragments' partial G_sf summed over ranks in one all-reduce: right projections send
        only their boundary rows (known to every rank from the layout), left ones (r, n)."""
        chunks: list[Tensor] = []
        slots: list[tuple[Item, list[tuple[int, int]]]] = []
        for it in items:
            if it.sel.side == "left":
                chunks.append(it.g_sf.reshape(-1))
                slots.append((it, []))
                continue
            rows = self._layout.split_rows(it.name)
            r = it.g_sf.shape[1]
            buf = it.g_sf.new_zeros(len(rows), r)
            mine = []
            for j, row in enumerate(rows):
                local = row - it.span.first_row
                if it.span.numel and 0 <= local < it.span.rows_touched:
                    buf[j] = it.g_sf[local]
                    mine.append((j, local))
            chunks.append(buf.reshape(-1))
            slots.append((it, mine))
        flat = torch.cat(chunks) if chunks else None
        if flat is None or flat.numel() == 0:
            return
        dist.all_reduce(flat, group=self._pg)
        _, world = rank_and_world(self._pg)
        self.comm.add("fragment_projection", flat.nbytes, 2 * (world - 1) / world * flat.nbytes)
        offset = 0
        for (it, mine), chunk in zip(slots, chunks):
            n = chunk.numel()
            summed = flat[offset : offset + n]
            offset += n
            if it.sel.side == "left":
                it.g_sf = summed.view(it.g_sf.shape).clone()
            else:
                rows = summed.view(-1, it.g_sf.shape[1])
                for j, local in mine:
                    it.g_sf[local] = rows[j]

    # ---------------------------------------------------------------------------------- state
    def _state_full(self, items: list[Item], rank: int) -> None:
        by_group: dict[int, list[Item]] = {}
        for it in items:
            if it.active and it.owner == rank and not it.fused:
                by_group.setdefault(id(it.group), []).append(it)
        for its in by_group.values():
            group = its[0].group
            rule = whole_rule(group)
            dirs = state_full_directions(
                rule, [it.g_sf for it in its], [it.st for it in its],
                [it.sf_t for it in its], group["betas"], group["eps"],
            )  # fmt: skip
            for it, d in zip(its, dirs):
                it.u = d

    def _exchange(self, items: list[Item], world: int) -> None:
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
            s_p, s_i = group["proj_params_lr_scale"], group["inactive_lr_scale"]
            fused: list[Item] = []
            batch: list[tuple[Item, str, float]] = []
            coords: list[Item] = []
            projs: list[Item] = []
            kernel_projs: list[Item] = []
            rest: list[Item] = []
            for it in its:
                how = None if it.fused else batchable_free(it)
                if it.fused:
                    fused.append(it)
                elif how is not None:
                    batch.append((it, *how))
                elif projection_backend(it, self.kernels) is not None:
                    kernel_projs.append(it)
                elif batchable_coordinate(it):
                    coords.append(it)
                elif batchable_projection(it):
                    projs.append(it)
                else:
                    rest.append(it)
            if wd != 0.0:  # the kernels of fused / batch / kernel_projs fold the decay
                data = [it.view.data for it in (*rest, *coords, *projs) if it.view.data.numel()]
                if data:
                    torch._foreach_mul_(data, 1.0 - lr * wd)
            if fused:
                apply_fused(fused, lr, wd, group, self.kernels, self._coord_positions)
            apply_free_batch(batch, lr, wd, self.kernels)
            if kernel_projs:
                apply_batched(kernel_projs, lr, wd, self.kernels, self._kernel_cache)
            with gemm_precision(group, its[0].g.device):  # per-item projection GEMMs
                self._apply_per_item(rest, coords, projs, lr, s_p, s_i)

    def _apply_per_item(
        self, rest: list[Item], coords: list[Item], projs: list[Item], lr: float, s_p: float,
        s_i: float,
    ) -> None:  # fmt: skip
        """Items no kernel batch takes (each its own update), then the foreach coordinate /
        projection batches (decay already applied by the caller)."""
        for it in rest:
            data = it.view.data
            if it.kind == "adamw":
                apply_update(data, it.u, -lr)
                continue
            if it.kind == "block" and it.active:
                apply_update(data, it.u, -lr * s_p)
                continue
            free = self._free_direction(it)
            if it.kind == "free":
                if free is not None:
                    apply_update(data, free, -lr)
            elif it.kind == "block":
                if free is not None:
                    apply_update(data, free, -lr * s_p * s_i)
            elif it.kind == "coordinate":
                full = free if free is not None else torch.zeros_like(it.g)
                if free is not None and s_i != 1.0:
                    full.mul_(s_i)
                it.sel.scatter_(full, it.u)  # selected: up(U); others: s_i F(R)
                apply_update(data, it.span.unpad(full), -lr * s_p)
            else:
                if free is None:
                    full = it.sel.up(it.u)
                else:  # s_i F(R) + up(U), in place in F(R)'s buffer
                    full = it.sel.up_add_(free, it.u, beta=s_i)
                apply_update(data, it.span.unpad(full), -lr * s_p)
            it.free = it.u = it.g_sf = None  # release this item's temporaries now
        if coords:
            apply_coordinate_batch(coords, lr, s_p, s_i)
        if projs:
            apply_projection_batch(projs, lr, s_p, s_i)
