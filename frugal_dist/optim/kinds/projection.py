"""Projection subspaces (GaLore-style): S = span of an orthonormal basis P with
r = ``projection_rank`` columns (``core.subspaces``; of rho(k) when the density decays,
``optim.density_schedule``), right (P: n x r) or left (P: m x r):

    G_sf = down(G)     U = StateFull(G_sf)     R = G - up(G_sf)
    W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(R))        state: (m, r) right / (r, n) left

Bases: ``random`` / ``randperm`` are redrawn from (seed, name, k) on every rank; ``svd`` bases are
the top-r singular vectors of the gradient at the refresh, computed once by an owner rank and
broadcast (``svd_refresh``), and kept in the state as ``proj_basis``.

Fragments (flat layouts, FSDP2 rows): a right projection's rows are local except rows cut between
ranks, whose partial products are summed; a left projection's (r, n) product is summed over all
ranks (``sum_partial_projections``: one coalesced all-reduce).

Kernels: whole float32 matrices go through ``optim.projection_batch`` (batched down and fused
apply per (shape, side, rank), ``proj_precision``); svd bases through ``optim.svd_refresh``
(``svd_method``, batched per shape); random bases on CUDA through ``kernels.refresh``, one
batched draw per (dim, r) at a refresh (``draw_random_bases``). The
per-item path (fragments, sign vote, other dtypes) runs its GEMMs at ``proj_precision`` too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import (
    allreduce_sum_,
    broadcast_from_owners,
    rank_and_world,
    reduce_to_owners,
)
from frugal_dist.core.fragments import local_projection
from frugal_dist.core.rules import (
    MATRIX_FREE_RULES,
    state_free_direction,
    state_free_direction_,
    state_full_keys,
)
from frugal_dist.core.seeding import projection_seed
from frugal_dist.core.subspaces import (
    ProjectionSelection,
    matrix_shape,
    projection_rank,
    projection_selection,
    resolve_side,
    tensor_fingerprint,
)
from frugal_dist.kernels.refresh import random_bases
from frugal_dist.optim.density_schedule import density_at
from frugal_dist.optim.engine_hooks import logical_shape
from frugal_dist.optim.fast_apply import can_batch, local_matrix
from frugal_dist.optim.free_scale import fragments, item_scale, matched
from frugal_dist.optim.kinds.base import SubspaceKind
from frugal_dist.optim.matrix_free import whole_matrix
from frugal_dist.optim.moment_transfer import basis_change, rotate_moments
from frugal_dist.optim.param_groups import refuse_in_out
from frugal_dist.optim.projection_batch import (
    down_batched,
    gemm_precision,
    projection_backend,
    state_batched,
)
from frugal_dist.optim.sharding import assign_owners
from frugal_dist.optim.step_items import Item, apply_update
from frugal_dist.optim.svd_refresh import basis_shape, owner_bases

if TYPE_CHECKING:
    from frugal_dist.layouts.base import ParamView
    from frugal_dist.optim.phases import ApplyBatches, StepContext


class Projection(SubspaceKind):
    name = "projection"
    matrix_grad = True
    has_basis = True

    def state_numel(self, shape: tuple[int, ...], group: dict[str, Any], k: int = 0) -> int:
        m, n = matrix_shape(shape)
        rho = density_at(group, k)
        r = projection_rank((m, n), rho, group["proj_side"], group["proj_type"])
        return r * (n if resolve_side(group["proj_side"], (m, n)) == "left" else m)

    def compact_shape(self, it: Item) -> tuple[int, ...]:
        group = it.group
        shape = matrix_shape(it.view.shape)
        side = resolve_side(group["proj_side"], shape)
        r = projection_rank(shape, density_at(group, it.k), side, group["proj_type"])
        return (r, shape[1]) if side == "left" else (it.span.rows_touched, r)

    def state_role(self, group: dict[str, Any], shape: tuple[int, ...], key: str) -> str:
        if key == "proj_basis" or resolve_side(group["proj_side"], matrix_shape(shape)) == "left":
            return "replicated"
        return "right"

    def check_group(self, group: dict[str, Any], where: str) -> None:
        for name, p in zip(group["names"], group["params"]):
            if len(logical_shape(p)) < 2:  # real shape under zero.Init / FSDP1
                raise ValueError(
                    f"subspace='projection' needs 2-D (or higher) tensors, but {name!r} in "
                    f"{where} has shape {tuple(p.shape)}; put it in an algorithm='adamw' group "
                    "(build_param_groups does) or use subspace='block'/'coordinate'"
                )
        if group["proj_side"] in ("left", "right"):  # auto does not depend on it
            refuse_in_out(group, where, f"proj_side={group['proj_side']!r}")

    def hands_over(self, group: dict[str, Any]) -> bool:
        return group["proj_type"] == "svd"

    def prepare_group(self, its: list[Item], ctx: StepContext) -> None:
        # moment_transfer="rotate": the bases the moments live in, before the refresh replaces
        # them (optim.moment_transfer)
        for it, basis in previous_bases(its, ctx):
            it.prev_basis = basis
        draw_random_bases(its, ctx)  # on-device random bases: one batched draw per shape
        for it in its:
            self.prepare(it, ctx)

    def reset_at_refresh(self, it: Item, ctx: StepContext) -> None:
        if it.prev_basis is None:  # else: rotated into the new basis in the select phase
            super().reset_at_refresh(it, ctx)

    def prepare(self, it: Item, ctx: StepContext) -> None:
        view, group = it.view, it.group
        it.g = local_matrix(view, it.g)
        if not (it.refresh and group["proj_type"] == "svd"):  # svd: chosen in the select phase
            it.gsel = global_basis(ctx, view, it.k, group)
            it.sel = local_projection(it.gsel, view.span)
        self.reset_at_refresh(it, ctx)

    def sign_parts(self, it: Item) -> tuple[Tensor | None, Tensor | None] | None:
        if it.sel is None:  # svd refresh: the basis needs the exact gradient
            return None
        with gemm_precision(it.group, it.g.device):
            compact = it.sel.down(it.g)
            resid = it.g - it.sel.up(compact) if self.free_rule(it.group) != "none" else None
        return compact, resid

    def whole_vote_scale(self, it: Item) -> tuple[float, float] | None:
        # rank 0 on a whole matrix with s_i = 1: W <- W (1 - lr wd) - lr s_p F(G - up(0)), the
        # voted residual entry for entry the data; otherwise ``apply_one``
        group = it.group
        sel = it.sel
        if (
            sel is not None
            and sel.rank == 0
            and it.span.is_full
            and group["inactive_lr_scale"] == 1.0
        ):
            return group["proj_params_lr_scale"], 1.0
        return None

    def gemm_context(self, group: dict[str, Any], device: Any) -> Any:
        return gemm_precision(group, device)

    def select(self, its: list[Item], ctx: StepContext) -> None:
        pending = [it for it in its if it.sel is None]
        if pending:
            svd_refresh(pending, ctx)
        for it in its:  # moment_transfer="rotate": every new basis is known now
            if it.prev_basis is not None:
                c = basis_change(it.gsel.basis, it.prev_basis)
                rotate_moments(it.st, self.rule(it.group), it.gsel.side, c)
                it.prev_basis = None

    def fingerprint(self, it: Item) -> int | None:
        return tensor_fingerprint(it.gsel.basis)

    def down(self, its: list[Item], ctx: StepContext) -> None:
        # whole matrices: batched GEMMs (optim.projection_batch); per item where the ranks sum
        # partial products (a bound layout at world > 1: every rank takes part)
        fragments = ctx.layout is not None and ctx.world > 1
        done = (set() if fragments else
                down_batched(its, ctx.kernels, ctx.cache.kernel_cache, ctx.batch_memo))  # fmt: skip
        if len(done) == len(its):  # all batched (done holds ids of its items only)
            return
        partial: list[Item] = []
        for it in its:
            if it.g_sf is None and id(it) not in done:
                with gemm_precision(it.group, it.g.device):
                    it.g_sf = it.sel.down(it.g)
                if fragments:
                    partial.append(it)
        if partial:
            sum_partial_projections(partial, ctx)

    def state_batched(
        self, its: list[Item], ctx: StepContext, clip: Tensor | None = None
    ) -> set[int]:
        # whole matrices of an AdamW group: one fused kernel per batch (optim.projection_batch);
        # matched on fragments: the per-item apply reads float32 U (optim.free_scale)
        if matched(its[0].group) and fragments(ctx):
            return set()
        return state_batched(its, ctx.kernels, sharded=ctx.sharded, memo=ctx.batch_memo,
                             clip=clip)  # fmt: skip

    def free_direction(self, it: Item) -> Tensor | None:
        if it.free_done:
            return it.free
        rule = self.free_rule(it.group)
        if rule in MATRIX_FREE_RULES:  # the whole (m, n) residual (optim.matrix_free)
            resid = it.g if it.sel.rank == 0 else it.sel.residual(it.g, it.g_sf)
            return state_free_direction(rule, whole_matrix(it, resid))
        if it.sel.rank == 0:  # rho = 0: R = G, no projection at all
            return state_free_direction(rule, it.g)
        return state_free_direction_(rule, it.sel.residual(it.g, it.g_sf))

    def route(self, it: Item, ctx: StepContext, batches: ApplyBatches) -> None:
        group = it.group
        batchable = can_batch(it)
        if self.free_rule(group) in MATRIX_FREE_RULES:
            batches.rest.append(it)  # a whole-matrix F (optim.matrix_free): the per-item path
        elif matched(group) and (fragments(ctx) or projection_backend(it, ctx.kernels) is None):
            batches.rest.append(it)  # the per-item scale (optim.free_scale)
        elif batchable and group["inactive_lr_scale"] == 1.0 and it.sel.rank == 0:  # rho = 0
            batches.free.append((it, self.free_rule(group), group["proj_params_lr_scale"]))
        elif projection_backend(it, ctx.kernels) is not None:
            batches.kernel_projs.append(it)
        elif (
            batchable
            and self.free_rule(group) == "signsgd"
            and it.u is not None
            and it.g_sf is not None
            and it.sel.rank > 0
        ):
            batches.projs.append(it)
        else:
            batches.rest.append(it)

    def apply_one(self, it: Item, ctx: StepContext) -> None:
        group = it.group
        s_p, s_i = group["proj_params_lr_scale"], group["inactive_lr_scale"]
        free = self.free_direction(it)
        if free is None:
            full = it.sel.up(it.u)
        elif matched(group):  # s_i s_t F(R) + up(U) (optim.free_scale)
            full = it.sel.up_add_(free.mul_(item_scale(it, free, ctx)), it.u)
        else:  # s_i F(R) + up(U), in place in F(R)'s buffer
            full = it.sel.up_add_(free, it.u, beta=s_i)
        apply_update(it.view.data, it.span.unpad(full), -group["lr"] * s_p)

    def matched_sizes(self, it: Item) -> tuple[int, int]:
        m, n = it.span.m, it.span.n
        return self.state_numel(it.view.shape, it.group, it.k), m * n

    def update_sumsq(self, it: Item, ctx: StepContext) -> Tensor:
        u = it.u.float()
        if ctx.layout is None or ctx.world == 1:
            return torch.linalg.vector_norm(u).square()
        if it.sel.side == "left":  # (r, n) U replicated on every rank (whatever its fragment,
            # the whole tensor's included): counted by rank 0
            total = torch.linalg.vector_norm(u).square()
            return total if ctx.rank == 0 else torch.zeros_like(total)
        # right: one U row per touched row; a boundary row's is held by both of its ranks and
        # counted by the one holding its first entry (not this one when the span starts mid-row)
        first = 1 if it.span.offset != 0 else 0
        return torch.linalg.vector_norm(u[first:]).square()

    def free_sumsq(self, it: Item, free: Tensor) -> Tensor:
        # the fragment's entries only: phantom entries of boundary rows hold -up(G_sf) there
        return torch.linalg.vector_norm(it.span.unpad(free).float()).square()


def global_basis(
    ctx: StepContext, view: ParamView, k: int, group: dict[str, Any]
) -> ProjectionSelection:
    """The global basis at refresh k: drawn from (seed, name, k), or the svd basis kept in the
    state (svd refreshes themselves happen in ``svd_refresh``). Cached per refresh; on-device
    random bases are put in the cache by ``draw_random_bases`` (plan phase, batched)."""
    cached = ctx.cache.selections.get(view.name)
    if cached is not None and cached[0] == k:
        return cached[1]
    shape = matrix_shape(view.shape)
    if group["proj_type"] == "svd":
        if "proj_basis" not in view.state:
            raise RuntimeError(f"svd basis of {view.name!r} missing from the optimizer state")
        sel = ProjectionSelection(resolve_side(group["proj_side"], shape), view.state["proj_basis"])
    elif group["proj_type"] == "random" and _random_on_device(ctx, view):
        raise RuntimeError(f"on-device random basis of {view.name!r} at refresh {k} was not "
                           "drawn in the plan phase (draw_random_bases)")  # fmt: skip
    else:
        sel = projection_selection(
            shape, density_at(group, k), group["proj_type"], group["proj_side"],
            projection_seed(group["seed"], view.name, k),
        )  # fmt: skip
        sel = ProjectionSelection(sel.side, sel.basis.to(view.data.device))
    ctx.cache.selections[view.name] = (k, sel)
    return sel


def previous_bases(its: list[Item], ctx: StepContext) -> list[tuple[Item, Tensor]]:
    """``moment_transfer="rotate"``: for each item that refreshes with moments to carry (its
    owner, buffers present), the global basis they live in. svd: the kept ``proj_basis``;
    random / randperm: the cached basis of the last refresh, or, after a cache invalidation,
    the one of refresh k - 1 drawn again (on-device random bases: the group's whole batch at
    k - 1, as it was drawn then, so the bits are the same). Communication: none."""
    group = its[0].group if its else None
    if group is None or group["moment_transfer"] != "rotate":
        return []
    keys = state_full_keys(its[0].kind.rule(group))
    carry = [it for it in its if it.refresh and it.k > 0 and it.owner == ctx.rank
             and "sf_step" in it.st and all(key in it.st for key in keys)]  # fmt: skip
    out: list[tuple[Item, Tensor]] = []
    missing: list[Item] = []
    for it in carry:
        if group["proj_type"] == "svd":
            if "proj_basis" not in it.st:
                raise RuntimeError(
                    f"moment_transfer='rotate': the svd basis of {it.name!r} that its moments "
                    "live in is missing from the optimizer state"
                )
            out.append((it, it.st["proj_basis"]))
            continue
        cached = ctx.cache.selections.get(it.name)
        if cached is not None and cached[0] < it.k:
            out.append((it, cached[1].basis))
        elif _random_on_device(ctx, it.view) and group["proj_type"] == "random":
            missing.append(it)
        else:
            out.append((it, global_basis(ctx, it.view, it.k - 1, group).basis))
    if missing:
        batch = [it for it in its if it.k > 0 and _random_on_device(ctx, it.view)]
        drawn = _draw_random(batch, [it.k - 1 for it in batch], group)
        out.extend((it, drawn[it.name].basis) for it in missing)
    return out


def _draw_random(
    its: list[Item], ks: list[int], group: dict[str, Any]
) -> dict[str, ProjectionSelection]:
    """The on-device random bases of ``its`` at refreshes ``ks``: one ``random_bases`` call per
    (dim, r, device), items ordered by name (``draw_random_bases`` says why)."""
    batches: dict[tuple, list[tuple[str, str, int]]] = {}
    for it, k in sorted(zip(its, ks), key=lambda e: e[0].name):
        shape = matrix_shape(it.view.shape)
        side = resolve_side(group["proj_side"], shape)
        dim = shape[0] if side == "left" else shape[1]
        r = projection_rank(shape, density_at(group, k), side, "random")
        seed = projection_seed(group["seed"], it.name, k)
        batches.setdefault((dim, r, it.view.data.device), []).append((it.name, side, seed))
    out: dict[str, ProjectionSelection] = {}
    for (dim, r, device), entries in batches.items():
        bases = random_bases(dim, r, [seed for _, _, seed in entries], device)
        for (name, side, _), basis in zip(entries, bases.unbind(0)):
            out[name] = ProjectionSelection(side, basis)
    return out


def draw_random_bases(its: list[Item], ctx: StepContext) -> None:
    """The on-device ``random`` bases of one group's items (``proj_qr_device``), drawn in one
    ``kernels.refresh.random_bases`` call per (dim, r, device) and put in
    ``ctx.cache.selections``; nothing is drawn while every item's basis at its refresh k is
    cached (between refreshes).

    Rank consistency: a batched draw's bits for one matrix may depend on the batch it is in
    (its size and position: chunking, the kernels a batched GEMM / Cholesky picks). So the
    batch is always *every* on-device random item of the group -- all ranks hold an item for
    every logical parameter of a stepping group (layouts give empty fragments a view and an
    empty gradient) -- ordered by name, each with its own seed ``projection_seed(seed, name,
    k)``: the same batches on every rank whatever fragments it holds, on every engine and
    world size, and after a cache invalidation. Communication: none."""
    group = its[0].group if its else None
    if group is None or group["proj_type"] != "random":
        return
    mine = [it for it in its if _random_on_device(ctx, it.view)]
    if all((c := ctx.cache.selections.get(it.name)) is not None and c[0] == it.k for it in mine):
        return
    drawn = _draw_random(mine, [it.k for it in mine], group)
    for it in mine:
        ctx.cache.selections[it.name] = (it.k, drawn[it.name])


def _random_on_device(ctx: StepContext, view: ParamView) -> bool:
    """``proj_qr_device``: ``auto`` = on the device for CUDA parameters (the CPU keeps the
    float64 path), ``param`` = always on the parameter's device, ``cpu`` = never."""
    if ctx.proj_qr_device == "auto":
        return view.data.device.type == "cuda"
    return ctx.proj_qr_device == "param"


def svd_refresh(pending: list[Item], ctx: StepContext) -> None:
    """New svd bases: each is computed once, by an owner rank, from the full gradient.

    Owners balance m*n over the agreement group (``assign_owners``; HSDP: every rank of every
    replica). Communication (world > 1): fragments (a bound layout): the owner's shard group
    (its replica) reduces the zero-padded full gradients onto it over ``process_group``, one
    coalesced ``reduce`` per (owner, dtype), 4 B x m x n each (``svd_gather``); then one
    ``broadcast`` per owner of its bases over the agreement group, 4 B x dim x r each
    (``basis_broadcast``; bounded in time, ``comm.participants``). Every rank then stores the
    basis as ``proj_basis`` and selects with it. The bases themselves: ``owner_bases``
    (``optim.svd_refresh``: ``svd_method``, batched over same-shape matrices).
    """
    arank, aworld = rank_and_world(ctx.agreement_pg)
    if aworld > 1:
        owners = assign_owners({it.name: it.span.m * it.span.n for it in pending}, aworld).owner
    else:
        owners = {it.name: 0 for it in pending}
    peer = getattr(ctx.layout, "shard_peer", None)  # agreement rank -> my shard group's, or None
    fragments = ctx.layout is not None and ctx.world > 1
    full_grads: list[Tensor] = []
    gathered: list[list[Tensor]] = [[] for _ in range(ctx.world)]
    for it in pending:
        # The gradient in its own precision (float32 at least): SVD bases are sensitive to
        # last-bit differences when singular values are close.
        raw = it.view.grad
        dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
        owner = owners[it.name]
        dst = owner if peer is None else peer(owner)  # None: the owner is in another replica
        if fragments and dst is not None:  # zero-padded; the owner receives the sum of them
            sp = it.span
            buf = torch.zeros(sp.m * sp.n, device=it.g.device, dtype=dtype)
            buf[sp.start : sp.start + sp.numel] = raw.reshape(-1).to(dtype)
            gathered[dst].append(buf)
            full_grads.append(buf.view(sp.m, sp.n))
        else:
            full_grads.append(it.span.pad(raw.reshape(-1).to(dtype)))
    if fragments:
        reduce_to_owners(gathered, ctx.pg, ctx.comm, "svd_gather")
    # the owner's bases, batched over same-shape matrices (optim.svd_refresh: svd_method; the
    # previous basis, if any, is still it.st["proj_basis"])
    mine = [(it, g) for it, g in zip(pending, full_grads) if owners[it.name] == arank]
    computed = dict(zip((id(it) for it, _ in mine),
                        owner_bases([it for it, _ in mine], [g for _, g in mine])))  # fmt: skip
    per_rank: list[list[Tensor]] = [[] for _ in range(aworld)]
    for it in pending:
        basis = computed.get(id(it))
        if basis is None:
            dim, r = basis_shape(it)
            basis = torch.empty(dim, r, device=it.g.device)
        per_rank[owners[it.name]].append(basis)
        it.st["proj_basis"] = basis
    broadcast_from_owners(per_rank, ctx.agreement_pg, ctx.comm, "basis_broadcast", bounded=True)
    for it in pending:
        side = resolve_side(it.group["proj_side"], matrix_shape(it.view.shape))
        it.gsel = ProjectionSelection(side, it.st["proj_basis"])
        it.sel = local_projection(it.gsel, it.span)
        ctx.cache.selections[it.name] = (it.k, it.gsel)


def sum_partial_projections(its: list[Item], ctx: StepContext) -> None:
    """Fragments' partial G_sf summed over ranks in one all-reduce (``fragment_projection``):
    right projections send only their cut rows (known to every rank from the layout,
    ``split_rows``), 4 B x r per cut row; left ones their (r, n) product, 4 B x r x n."""
    chunks: list[Tensor] = []
    slots: list[tuple[Item, list[tuple[int, int]]]] = []
    for it in its:
        if it.sel.side == "left":
            chunks.append(it.g_sf.reshape(-1))
            slots.append((it, []))
            continue
        rows = ctx.layout.split_rows(it.name)
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
    allreduce_sum_(flat, ctx.pg, ctx.comm, "fragment_projection")
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
