"""The phases of ``FRUGAL.step``, each a plain function of the step's context and its items.

    check     (nonfinite != "ignore") one fused inf/nan test of every local gradient, the flag
              all-reduced (4 B); with ``step(grad_norm=...)`` only isfinite(grad_norm), no
              gradient read, no collective; a bad step returns here with nothing touched
    plan      step counters, refresh decisions, owners, active sets; per kind (``prepare``):
              selections restricted to the local rows, state resets, float32 gradients. Host
              cost per parameter is kept small (the step is launch-bound on a GPU): whole-tensor
              views are cached, the CPU counters are read with ``item()`` and advanced with
              ``fill_`` (no device sync)
    reduce    (reduce_gradients, world > 1) exact: one mean all-reduce of every gradient
              (4 B x params, ``grad_full``); sign: full mean all-reduce only where exactness is
              needed (whole-tensor state-full params, active blocks, svd refreshes, SGD groups),
              a mean all-reduce of the *compact* state-full gradients (``grad_projected``), and a
              1-bit majority vote of the local state-free residual signs (``sign_allgather``);
              hierarchical: exact mean inside each node, then sign across nodes
              (``optim.sign_reduce``); ``FRUGAL.step_ranks``: the same reduce over simulated
              ranks in this process (``optim.simulated_ranks``)
    select    per kind: svd refreshes (the owner gets the full gradient -- one coalesced
              ``reduce`` per owner over ``process_group`` for fragments -- computes its bases
              batched by shape (``optim.svd_refresh``, ``svd_method``) and broadcasts them,
              4 B x dim x r); at every refresh the ranks compare selection
              fingerprints (one all-gather of 8 B per refreshing parameter,
              ``agreement_check``). Both go over the layout's ``agreement_group`` (HSDP: every
              replica too)
    down      per kind: G_sf = down(G) (whole projection matrices batched by shape through
              ``kernels.projection.project_down``); fragments' partial projections summed in one
              coalesced all-reduce (right: 4 B x r per cut row; left: 4 B x r x n,
              ``fragment_projection``)
    state     owners advance the state-full rule (``torch._foreach_*``) -> directions U
    exchange  (shard_state, world > 1) each owner broadcasts the U it computed (4 B x |S|,
              ``update_broadcast``)
    apply     W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(R)) per kind; fragments drop phantom
              entries. Each kind routes its items to ``ApplyBatches``: fused items run their
              state phase in the apply kernel (whole-tensor AdamW, columns / rows coordinates),
              pure state-free updates go through ``free_apply_``, whole projection matrices
              through ``apply_projection`` per (shape, side, rank) batch -- these fold the weight
              decay; the rest decays first, then applies (``optim.fast_apply``,
              ``optim.projection_batch``). ``free_scale="matched"``: whole projection
              matrices on the Triton path are batched (device scale,
              ``kernels.projection_matched``), the other items go per item; on fragments
              their scales first take one all-reduce of 8 B per tensor (``optim.free_scale``)

At world size 1 every collective is skipped and the pipeline is the plain FRUGAL step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import (
    allreduce_mean_,
    broadcast_from_owners,
    check_agreement,
    rank_and_world,
)
from frugal_dist.comm.stats import CommStats
from frugal_dist.core.rules import state_full_directions
from frugal_dist.layouts.base import ParamView
from frugal_dist.optim.clipping import COMPACT, clip_mode, scaled_compact
from frugal_dist.optim.fast_apply import (
    FusedParts,
    VotedPart,
    apply_coordinate_batch,
    apply_projection_batch,
    free_parts,
    fused_parts,
    run_free,
    run_fused,
    run_voted,
    voted_parts,
)
from frugal_dist.optim.free_scale import reduce_scales
from frugal_dist.optim.kinds import SubspaceKind, kind_for
from frugal_dist.optim.nonfinite import (
    FiniteCheck,
    first_bad_local,
    grads_are_finite,
    norm_is_finite,
)
from frugal_dist.optim.projection_batch import apply_batched
from frugal_dist.optim.refresh_schedule import (
    check_observed,
    clocks,
    fold_fingerprint,
    follows_loss,
)
from frugal_dist.optim.sign_reduce import reduce_signs
from frugal_dist.optim.simulated_ranks import reduce_simulated
from frugal_dist.optim.step_cache import StepCache
from frugal_dist.optim.step_items import Item, increment_counters


@dataclass
class StepContext:
    """What the phases read besides the items: this rank, the process group, the optimizer's
    step options, its caches and its bound layout (None: whole tensors)."""

    optimizer: Any
    rank: int
    world: int
    pg: Any  # the ranks whose fragments make up the parameters (``process_group``)
    agreement_pg: Any  # the ranks that must agree on seeds, options, subspaces, svd bases
    comm: CommStats
    cache: StepCache
    layout: Any
    param_groups: list[dict[str, Any]]
    shard_state: bool
    reduce_gradients: bool
    residual_comm: str
    check_agreement: bool
    fused: bool | None
    proj_qr_device: str
    kernels: str
    by_kind: dict[SubspaceKind, list[Item]] = field(default_factory=dict)  # filled by ``plan``
    memo: dict[Any, Any] = field(default_factory=dict)  # per-step lookups (block active sets)
    # the step plan's lookups kept between its steps (``projection_batch.batches``); None on
    # full steps
    batch_memo: dict[Any, Any] | None = None
    # ``FRUGAL.step_ranks``: the simulated ranks' gradients (``optim.simulated_ranks``), whose
    # reduce runs in this process; None: the real ranks of ``pg``
    simulated: Any = None
    # a plan step's pending clip coefficient for the ``COMPACT`` items (``optim.clipping``): the
    # state phase reads c G_sf; None: no clip, or the gradients were scaled (full steps)
    clip_compact: Tensor | None = None

    @property
    def agreement_world(self) -> int:
        """Ranks in the agreement group (HSDP: every replica of every shard)."""
        return self.world if self.agreement_pg is self.pg else rank_and_world(self.agreement_pg)[1]

    @property
    def sharded(self) -> bool:
        """State-full buffers split over ranks (``shard_state`` at world size > 1)."""
        return self.shard_state and self.world > 1

    @property
    def reduced_here(self) -> bool:
        """FRUGAL reduces the gradients itself this step (over real or simulated ranks)."""
        return self.reduce_gradients and (self.world > 1 or self.simulated is not None)


@dataclass
class ApplyBatches:
    """Where each item's update goes in the apply phase (filled by the kinds' ``route``):

    * ``fused``: state phase inside the apply kernel (``fast_apply.run_fused``), decay folded;
    * ``free``: pure state-free updates (``fast_apply.run_free``), decay folded;
    * ``voted``: state-free updates from the packed sign vote (``Item.vote_bits``;
      ``fast_apply.run_voted``), decay folded;
    * ``kernel_projs``: whole projection matrices (``projection_batch.apply_batched``), decay
      folded;
    * ``coords`` / ``projs``: foreach batches with a signSGD residual, after the group's decay;
    * ``rest``: one update per item (``kind.apply_one``), after the group's decay."""

    fused: list[Item] = field(default_factory=list)
    free: list[tuple[Item, str, float]] = field(default_factory=list)  # (item, rule, scale)
    voted: list[tuple[Item, tuple[float, float]]] = field(default_factory=list)  # (s_p, s_i)
    kernel_projs: list[Item] = field(default_factory=list)
    coords: list[Item] = field(default_factory=list)
    projs: list[Item] = field(default_factory=list)
    rest: list[Item] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- check
def gradients_finite(
    ctx: StepContext, views: list[tuple[dict, list[ParamView]]], mode: str,
    grad_norm: Tensor | float | None = None,
) -> bool:  # fmt: skip
    """One fused inf/nan check of every local gradient (``optim.nonfinite``); False: skip this
    step (nothing touched). ``mode="raise"`` raises ``FloatingPointError`` instead.

    Replicated gradients (DDP-reduced, or one rank alone) are equal on every rank: the local
    answer is every rank's, with no collective. Fragments (a layout) and gradients FRUGAL
    reduces itself differ per rank: the flag is all-reduced over the group (4 B per rank,
    ``comm_stats()`` key ``nonfinite_flag``). ``grad_norm`` (the caller's global total norm,
    checked): the verdict is its finiteness; no gradient read, no collective."""
    names = [v.name for _, vs in views for v in vs]
    if grad_norm is not None:
        return check_finite(ctx, names, [v.grad for _, vs in views for v in vs], mode,
                            grad_norm=grad_norm)  # fmt: skip
    if ctx.simulated is not None:  # FRUGAL.step_ranks: any simulated rank's inf/nan skips
        ctx.simulated.count_flag(ctx.comm)  # the 4 B flag a real rank all-reduces
        per_rank = ctx.simulated.grads_of([v.data for _, vs in views for v in vs])
        return all(check_finite(ctx, names, grads, mode) for grads in per_rank)
    grads = [v.grad for _, vs in views for v in vs]
    return check_finite(ctx, names, grads, mode)


def check_finite(
    ctx: StepContext, names: list[str], grads: list[Tensor | None], mode: str,
    check: FiniteCheck | None = None, grad_norm: Tensor | float | None = None,
) -> bool:  # fmt: skip
    """``gradients_finite`` over explicit lists (``check``: the cached
    ``nonfinite.FiniteCheck`` of gradients shaped like these, a step plan's; ``grad_norm``:
    the verdict from the caller's norm instead, the gradients read only to name the parameter
    for ``"raise"``)."""
    if grad_norm is not None:
        if norm_is_finite(grad_norm):  # one 4 B read, no collective
            return True
        if mode != "raise":
            return False
        first = first_bad_local(names, grads)
        where = (
            f"first in parameter {first!r}" if first is not None else
            "in no local gradient (on another rank, or all finite and the norm overflowed)"
        )  # fmt: skip
        raise FloatingPointError(
            f"FRUGAL.step: grad_norm={float(grad_norm)} is not finite, non-finite (inf/nan) "
            f"gradient {where}; nothing was updated. Use nonfinite='skip' to skip such steps"
        )
    per_rank = ctx.layout is not None or ctx.reduce_gradients
    world = ctx.world if per_rank else 1
    ok, first = grads_are_finite(names, grads, ctx.pg, world, check, ctx.kernels, ctx.comm)
    if ok:
        return True
    if mode == "raise":
        where = f"first in parameter {first!r}" if first is not None else "on another rank"
        raise FloatingPointError(
            f"FRUGAL.step: non-finite (inf/nan) gradient, {where}; nothing was updated. "
            "Use nonfinite='skip' to skip such steps (e.g. under fp16 loss scaling)"
        )
    return False


# ---------------------------------------------------------------------------------------- plan
def plan(ctx: StepContext, views: list[tuple[dict, list[ParamView]]]) -> list[Item]:
    """One ``Item`` per parameter with a gradient, in group order (also listed by kind in
    ``ctx.by_kind``, kinds in order of first appearance: the same on every rank)."""
    items: list[Item] = []
    for group, group_views in views:
        its = _plan_group(ctx, group, group_views)
        if its:
            ctx.by_kind.setdefault(its[0].kind, []).extend(its)
        items.extend(its)
    return items


def _plan_group(ctx: StepContext, group: dict[str, Any], views: list[ParamView]) -> list[Item]:
    kind = kind_for(group)
    sharded, rank = ctx.sharded, ctx.rank
    keep_dtype = not ctx.reduced_here
    live = [view for view in views if view.grad is not None]
    out: list[Item] = []
    bumped: list[Item] = []  # items whose sf_step this step increments
    states = [view.state for view in live]
    if follows_loss(group):  # a refresh due without an observed loss: refused, nothing moved
        check_observed(group, states, [view.name for view in live])
    steps = _advance_steps(states)
    times, created = clocks(group, states, steps)  # (k, refresh): optim.refresh_schedule
    if created:
        ctx.cache.loss_slots = None
    kind.plan_group(ctx, group, views, times)  # block gradnorm: the refresh's choice
    for view, (k, refresh) in zip(live, times):
        owner = kind.owner(ctx, group, view.index, view.name, k) if sharded else rank
        active = kind.is_active(ctx, group, view, k)
        # State-free-only tensors need no float32 copy of a 16-bit gradient (sign and the
        # promoted add give the same result), unless FRUGAL reduces the gradients itself.
        g = view.grad if (not active and keep_dtype) else view.grad.float()
        out.append(Item(view, group, kind, refresh, k, active, owner, g))
    kind.prepare_group(out, ctx)
    for it in out:
        if it.active and it.owner == rank:
            bumped.append(it)
            it.fused = kind.fuses(it, ctx)
    for it, t in zip(bumped, increment_counters([it.st for it in bumped], "sf_step")):
        it.sf_t = t
    return out


def _advance_steps(states: list) -> list[int]:
    """Increment every state's ``step`` counter (created at 0 if missing); return the number of
    steps each took *before* this one."""
    for st in states:
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
    return [v - 1 for v in increment_counters(states, "step")]


# ---------------------------------------------------------------------------------------- reduce
def reduce(ctx: StepContext, items: list[Item]) -> None:
    """Mean of the gradients over ranks (``reduce_gradients``; see the module docstring)."""
    if not ctx.reduced_here:
        return
    if ctx.simulated is not None:  # FRUGAL.step_ranks: the same reduce, in this process
        reduce_simulated(ctx, items)
        return
    if ctx.residual_comm == "exact":
        allreduce_mean_([it.g for it in items], ctx.pg, ctx.comm, "grad_full")
        return
    reduce_signs(ctx, items)  # sign / hierarchical: optim.sign_reduce


# ---------------------------------------------------------------------------------------- select
def select(ctx: StepContext, items: list[Item]) -> None:
    """Selections that need the reduced gradient (svd), then the refresh fingerprint check."""
    for kind, its in ctx.by_kind.items():
        kind.select(its, ctx)
    if ctx.check_agreement and ctx.agreement_world > 1:
        names: list[str] = []
        fps: list[int] = []
        for it in items:
            # loss policy: the next refresh step folded in too (refresh_schedule)
            fp = fold_fingerprint(it.group, it.st, it.kind.fingerprint(it)) if it.refresh else None
            if fp is not None:
                names.append(it.name)
                fps.append(fp)
        check_agreement(names, fps, ctx.agreement_pg, ctx.comm, "subspace")


# ---------------------------------------------------------------------------------------- down
def down(ctx: StepContext, items: list[Item]) -> None:
    """G_sf = down(G) for every active item (kind by kind; fragments summed over ranks)."""
    for kind, its in ctx.by_kind.items():
        kind.down([it for it in its if it.active], ctx)


def down_lists(ctx: StepContext) -> list[tuple[SubspaceKind, list[Item]]]:
    """Per kind, the active items whose G_sf a later phase reads: fused items gather G inside
    their apply kernel (``fast_apply.run_fused``), so the cached step plan leaves them out."""
    out = []
    for kind, its in ctx.by_kind.items():
        need = [it for it in its if it.active and not it.fused]
        if need:
            out.append((kind, need))
    return out


# ---------------------------------------------------------------------------------------- state
def state(ctx: StepContext, items: list[Item]) -> None:
    """U = StateFull(G_sf) on the owner of each active item: what the kind batches itself
    (``state_batched``: whole projection matrices, one fused kernel per batch), then one foreach
    call per group for the rest (fused AdamW items wait for the apply phase)."""
    run_state(ctx, state_batches(ctx, items))


def state_batches(ctx: StepContext, items: list[Item]) -> list[list[Item]]:
    """The items of each group whose owner advances their state-full rule here (not fused)."""
    by_group: dict[int, list[Item]] = {}
    for it in items:
        if it.active and it.owner == ctx.rank and not it.fused:
            by_group.setdefault(id(it.group), []).append(it)
    return list(by_group.values())


def run_state(ctx: StepContext, batches: list[list[Item]]) -> None:
    """Per batch of ``state_batches``: the kind's fused ``state_batched`` kernels, then one
    ``state_full_directions`` call for the rest; sets ``Item.u``. ``ctx.clip_compact``: the
    ``COMPACT`` items' rule reads c G_sf (``optim.clipping``; G_sf stays unscaled)."""
    for its in batches:
        group = its[0].group
        clip = ctx.clip_compact
        if clip is not None and clip_mode(its[0]) != COMPACT:  # one mode per group's batch
            clip = None
        done = its[0].kind.state_batched(its, ctx, clip)  # fused kernels (projection batches)
        if len(done) == len(its):  # all of them (``done``: ids of ``its`` items)
            continue
        its = [it for it in its if id(it) not in done]
        if not its:
            continue
        dirs = state_full_directions(
            its[0].kind.rule(group), [scaled_compact(it.g_sf, clip) for it in its],
            [it.st for it in its], [it.sf_t for it in its], group["betas"], group["eps"],
        )  # fmt: skip
        for it, d in zip(its, dirs):
            it.u = d


# ---------------------------------------------------------------------------------------- exchange
def exchange(ctx: StepContext, items: list[Item]) -> None:
    """(shard_state, world > 1) every owner broadcasts the U it computed (one broadcast per
    owner rank, 4 B x compact size)."""
    if not ctx.sharded:
        return
    per_rank: list[list[Tensor]] = [[] for _ in range(ctx.world)]
    for it in items:
        if not it.active:
            continue
        if it.u is None:
            shape = it.kind.compact_shape(it)
            it.u = torch.empty(shape, dtype=torch.float32, device=it.g.device)
        per_rank[it.owner].append(it.u)
    broadcast_from_owners(per_rank, ctx.pg, ctx.comm, "update_broadcast")


# ---------------------------------------------------------------------------------------- apply
@dataclass
class GroupApply:
    """One group's routed apply work (``route_apply``): its kind, batches, the fused batch's
    fixed kernel arguments, the tensors that take the group's own ``W *= 1 - lr wd`` and the
    device of its per-item GEMMs."""

    group: dict[str, Any]
    kind: SubspaceKind
    batches: ApplyBatches
    fused: FusedParts | None
    free: list[tuple[str, float, list[Item], list[Tensor]]]
    voted: list[VotedPart]
    decayed: list[Tensor]
    device: Any


def apply(ctx: StepContext, items: list[Item]) -> None:
    """Each item's update, group by group (no communication): the kinds route every item to a
    batch (``ApplyBatches``); the batches that fold the weight decay run as they are, the others
    after one ``W *= 1 - lr wd`` over their tensors."""
    run_apply(ctx, route_apply(ctx, items))


def route_apply(ctx: StepContext, items: list[Item]) -> list[GroupApply]:
    """Every item's batch, group by group (the kinds' ``route``; fused items: ``fused``)."""
    by_group: dict[int, list[Item]] = {}
    for it in items:
        by_group.setdefault(id(it.group), []).append(it)
    out = []
    for its in by_group.values():
        batches = ApplyBatches()
        for it in its:
            if it.fused:
                batches.fused.append(it)
            elif it.vote_bits is not None:  # the packed vote (optim.sign_reduce)
                batches.voted.append((it, it.kind.whole_vote_scale(it)))
            else:
                it.kind.route(it, ctx, batches)
        decayed = [it.view.data for it in (*batches.rest, *batches.coords, *batches.projs)
                   if it.view.data.numel()]  # fmt: skip
        group = its[0].group
        fused = None
        if batches.fused:
            fused = fused_parts(batches.fused, group, ctx.cache.coord_positions)
        free = free_parts(batches.free)
        voted = voted_parts(batches.voted)
        out.append(GroupApply(group, its[0].kind, batches, fused, free, voted, decayed,
                              its[0].g.device))  # fmt: skip
    return out


def run_apply(ctx: StepContext, routed: list[GroupApply]) -> None:
    """The routed updates with the groups' current lr and weight decay (fused / free /
    kernel_projs fold the decay into their kernels; the other lists are decayed first)."""
    reduce_scales(ctx, routed)  # free_scale="matched" on fragments: one all-reduce, 8 B x tensors
    for ga in routed:
        group, kind, batches = ga.group, ga.kind, ga.batches
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0.0 and ga.decayed:
            torch._foreach_mul_(ga.decayed, 1.0 - lr * wd)
        if ga.fused is not None:
            run_fused(ga.fused, lr, wd, group, ctx.kernels)
        run_free(ga.free, lr, wd, ctx.kernels)
        run_voted(ga.voted, lr, wd, ctx.kernels)
        if batches.kernel_projs:
            apply_batched(batches.kernel_projs, lr, wd, ctx.kernels, ctx.cache.kernel_cache,
                          ctx.batch_memo)  # fmt: skip
        if not (batches.rest or batches.coords or batches.projs):
            continue  # no per-item work: no GEMM precision context to enter and leave
        with kind.gemm_context(group, ga.device):  # per-item projection GEMMs
            for it in batches.rest:
                kind.apply_one(it, ctx)
                it.release()  # this item's temporaries, now
            s_p, s_i = group["proj_params_lr_scale"], group["inactive_lr_scale"]
            if batches.coords:
                apply_coordinate_batch(batches.coords, lr, s_p, s_i)
            if batches.projs:
                apply_projection_batch(batches.projs, lr, s_p, s_i)
