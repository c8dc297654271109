"""``free_scale``: how large the state-free step of a split parameter is.

A project addition beyond the FRUGAL paper (issue 19), off by default (the paper-faithful
presets keep ``"fixed"``):

* ``"fixed"``   -- the paper: W <- W - lr s_p up(U) - lr s_p s_i F(R), one global
                   s_i = ``inactive_lr_scale``.
* ``"matched"`` -- magnitude-matched: per tensor and step, the state-free direction is scaled to
                   the root mean square of the state-full update U,

                       s_t = RMS(U) / RMS(F),   RMS(U) = sqrt(sum U^2 / N_U),
                                                RMS(F) = sqrt(sum F^2 / N_F)
                       W <- W - lr s_p up(U) - lr s_p s_i s_t F(R)

                   over the entries each part touches: U is the compact state-full direction
                   (coordinate: the N_U = |S| selected entries; projection: r x n (left) or
                   m x r (right)); F the state-free direction on the entries outside S
                   (coordinate: N_F = m n - |S|; projection: N_F = m n, the residual is dense).
                   For signSGD sum F^2 is the number of non-zero signs, so RMS(sign(R)) =
                   sqrt(fraction of non-zero entries) (1 unless R has exact zeros, or the sign
                   vote ties). ``inactive_lr_scale`` still multiplies (s_i = 1: the state-free
                   entries move with the state-full ones' RMS; s_i < 1 keeps them smaller).
                   Edge cases: sum F^2 = 0 -> s_t = 0 (F is zero anyway); an empty state-full
                   part (a tensor too small for its count, e.g. int(rho n) = 0 columns) ->
                   s_t = 1, the ``fixed`` step of that tensor.

Origin: Fira (Chen et al., arXiv 2410.01623) trains GaLore's residual G - P R with the factor
phi = ||psi(R)|| / ||R|| (Adam's output norm over its input norm in the low-rank space, per
column in its code) times the raw residual. FRUGAL's state-free direction is already normalised
(sign), so the analogous rule matches the *step size* instead: the residual step gets the state-
full step's RMS. Fira also caps the step-to-step growth of its residual step's norm at
gamma = 1.01 (a norm-growth limiter against loss spikes). It is not used here: Fira's residual
step is an unbounded multiple of the raw gradient, while s_t F has a bounded size -- |U| entries
of AdamW are at most (1 - b1) / sqrt(1 - b2) ~ 3.2 for the default betas, and RMS(U) = 1 on the
first step after a reset (sign of G_sf), the same jump the state-full part takes at a refresh.
``matched`` keeps no state (nothing to checkpoint).

Subspaces: ``coordinate`` and ``projection``. ``block`` is refused (``check_free_scale``): an
inactive block has no state-full part of its own; a group-level ratio would need every active
block's U before any inactive block is applied (and the fused active-block kernels never form
U). ``density=0`` has no state-full part at all and is refused too.

Engines: s_t needs global sums over a sharded tensor. Replicated parameters (single process,
DDP, fairscale OSS, ``shard_state`` after the U broadcast, ``reduce_gradients``) hold everything
locally: no communication. Fragments (ZeRO-1/2/3 flat partitions, FSDP1 slices, FSDP2 / HSDP row
shards: a bound layout at world > 1) sum (sum U^2 counted once, sum F^2) over
``process_group`` in one coalesced all-reduce before the apply phase, 8 B per tensor
(``free_scale`` in ``comm_stats``). Each global entry is counted once: fragments are disjoint,
coordinate phantom entries are exactly zero, a right projection's boundary row (its U row is
held by both ranks) is counted by the rank holding the row's first entry, and a left projection's
replicated (r, n) U by rank 0 only. F itself is computed twice on fragments (for the sums, then
for the update) so that no full-size temporary is kept across parameters.

Speed: s_t is computed on the device (no host sync) on every path.

* Projections, whole float32 matrices with a ``signsgd`` (or ``none``) residual, replicated
  (not fragments), on CUDA with Triton (``kernels="auto"``, every ``proj_precision``: fp32 too,
  which the ``fixed`` scale runs as ``bmm``) or with ``kernels="triton"``: the batched path of
  ``optim.projection_batch`` (batched down, fused AdamW state, fused apply), the apply kernel
  reading ||U_b|| from a device array and counting the exact zeros of sign(R) in the same pass,
  then a correction launch that exits on the device unless a matrix had zeros
  (``kernels.projection_matched``: the equation, why it is exact, its cost -- per batch one
  ``vector_norm`` over the compact U, one counter memset, one early-exit launch).
* The per-item torch path (``apply_one``) elsewhere: coordinates (the fused
  ``coordinate_adamw_apply_`` takes the host scale s_i), an ``sgd`` residual (sum R^2 is needed
  before any entry is applied: a separate pass over R), the sign vote
  (``residual_comm="sign"`` / ``"hierarchical"``: G_sf and the residual's voted signs are
  precomputed per item, and vote ties give zeros often), fragments (the sums are all-reduced
  across ranks by ``reduce_scales``, before the apply), other dtypes, rank 0, the CPU with
  ``kernels="auto"`` (unchanged, the comparison for the batched path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import allreduce_sum_

if TYPE_CHECKING:
    from frugal_dist.optim.phases import GroupApply, StepContext
    from frugal_dist.optim.step_items import Item

FREE_SCALES = ("fixed", "matched")


def matched(group: Mapping[str, Any]) -> bool:
    """The group's split parameters take the magnitude-matched state-free step."""
    return group.get("free_scale") == "matched" and group.get("algorithm") == "frugal"


def fragments(ctx: StepContext) -> bool:
    """A bound layout at world > 1: ``matched`` items take the per-item path there
    (``reduce_scales`` all-reduces their sums, walking the per-item lists on every rank)."""
    return ctx.layout is not None and ctx.world > 1


def check_free_scale(group: Mapping[str, Any], where: str) -> None:
    """``free_scale="matched"`` needs a state-full part to match: refused (``ValueError``
    naming the field and the fix) for ``subspace="block"`` and ``density=0``."""
    if not matched(group):
        return
    if group["subspace"] == "block":
        raise ValueError(
            f"free_scale='matched' (in {where}) scales each tensor's state-free step by its own "
            "state-full update, but subspace='block' leaves inactive tensors without one; use "
            "subspace='coordinate' or 'projection', or free_scale='fixed' with "
            "inactive_lr_scale"
        )
    if group["density"] == 0:
        raise ValueError(
            f"free_scale='matched' (in {where}) scales the state-free step by the state-full "
            "update's RMS, but density=0 has no state-full part; use free_scale='fixed' (with "
            "inactive_lr_scale) or density > 0"
        )


def local_stats(it: Item, free: Tensor, ctx: StepContext) -> Tensor:
    """(sum U^2, sum F^2) of this rank's share of the item, float32 on its device: summed over
    the ranks of a layout they are the tensor's global sums (module docstring)."""
    return torch.stack((it.kind.update_sumsq(it, ctx), it.kind.free_sumsq(it, free)))


def scale_from(it: Item, stats: Tensor) -> Tensor:
    """s_i * s_t from the global (sum U^2, sum F^2): a 0-dim float32 device tensor."""
    n_u, n_f = it.kind.matched_sizes(it)
    s_i = float(it.group["inactive_lr_scale"])
    if n_u == 0:  # no state-full entries in this tensor: the fixed step
        return stats.new_full((), s_i)
    su, sf = stats[0], stats[1]
    ratio = torch.sqrt(su * (n_f / n_u) / torch.where(sf > 0, sf, 1.0))
    return torch.where(sf > 0, ratio, 0.0) * s_i


def item_scale(it: Item, free: Tensor, ctx: StepContext) -> Tensor:
    """The factor s_i * s_t of the item's F(R): reduced over the ranks already
    (``reduce_scales``), or from this rank's entries (the whole tensor is here)."""
    if it.free_scale is not None:
        return it.free_scale
    return scale_from(it, local_stats(it, free, ctx))


def reduce_scales(ctx: StepContext, routed: list[GroupApply]) -> None:
    """Fragments (a bound layout at world > 1): every ``matched`` item's s_i * s_t from one
    coalesced all-reduce(sum) of the (sum U^2, sum F^2) pairs over ``process_group``,
    8 B per tensor; stored in ``Item.free_scale``. Every rank walks the same items (layouts give
    empty fragments a view). A no-op elsewhere."""
    if not fragments(ctx):
        return
    its = [it for ga in routed if matched(ga.group) for it in ga.batches.rest]
    if not its:
        return
    stats = []
    for it in its:
        free = it.kind.free_direction(it)
        stats.append(local_stats(it, free if free is not None else torch.zeros_like(it.g), ctx))
    flat = torch.cat(stats)
    allreduce_sum_(flat, ctx.pg, ctx.comm, "free_scale")
    for i, it in enumerate(its):
        it.free_scale = scale_from(it, flat[2 * i : 2 * i + 2])
