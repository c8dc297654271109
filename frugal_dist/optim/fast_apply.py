"""The bandwidth-lean parts of the FRUGAL apply phase, routed through ``frugal_dist.kernels``.

``kernels`` (the optimizer option) picks the implementation: ``"auto"`` = the Triton kernels on
CUDA tensors and the plain torch code on the CPU (bit-identical to the pre-kernel step);
``"triton"`` = Triton wherever a kernel applies (CUDA, or the CPU under ``TRITON_INTERPRET=1``,
for tests); ``"torch"`` = never Triton.

* ``fused_parts`` / ``run_fused``: items whose state phase runs inside the apply kernel
  (``Item.fused``; the parts, the kernels' fixed arguments, are kept between refreshes):
  whole-tensor AdamW (AdamW groups, active blocks) through ``kernels.elementwise.adamw_apply_``
  on CUDA (one kernel reads W, G, m, v and writes W, m, v, decoupled weight decay inside: 28 B per
  float32 parameter; step counts are the host counts ``Item.sf_t``), ``torch._fused_adamw_`` with
  the CPU counters on the CPU (``fused=True``); ``columns`` / ``rows`` coordinate items through
  ``coordinate_adamw_apply_`` (one kernel per same-shape batch: AdamW on the selected entries,
  the state-free rule elsewhere, decay inside; see ``coordinate_fusable``).
* ``free_parts`` / ``run_free``: pure state-free updates W <- W (1 - lr wd) - lr s F(G)
  (signSGD / SGD groups, inactive blocks, rho = 0 coordinates / projections) through
  ``free_apply_``: one Triton pass reading W and G and writing W (decay folded), or foreach
  kernels in bounded chunks.
* ``voted_parts`` / ``run_voted``: state-free updates whose F is the sign vote still packed
  (``Item.vote_bits``: inactive blocks, signSGD groups under ``residual_comm="sign"`` /
  ``"hierarchical"``): W <- W (1 - lr wd) - (lr s_p) s_i F through
  ``kernels.vote_apply.vote_apply_``: one pass reading the W voters' bits and W, writing W
  (8 + W/8 B per float32 entry; the float32 vote, 4 B written and read again, is never made).
* ``apply_coordinate_batch`` / ``apply_projection_batch``: the remaining coordinate / projection
  items with a signSGD residual: foreach sign and add over many tensors; only the scatter of U
  (coordinates) or the two GEMMs (projections) stay per tensor. (Batched projection GEMMs:
  ``optim.projection_batch``.)

Which item goes where is its kind's ``route`` (``optim.kinds``); ``can_batch`` is the common
precondition. On the step plan's steps the Triton-eligible ``run_fused`` / ``run_free`` parts
do not come here: ``optim.plan_launches`` launches them from tables built once per plan (same
kernels, same arguments, no per-tensor Python per step).

Weight decay: the callers run the group's ``W *= 1 - lr wd`` only on tensors that take none of
the decay-folding paths above (``run_fused``, ``run_free``, ``run_voted``, ``projection_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from frugal_dist.kernels.elementwise import (
    adamw_apply_,
    coordinate_adamw_apply_,
    coordinate_positions,
    free_apply_,
    matrix_shape,
    runs_of,
)
from frugal_dist.kernels.vote_apply import vote_apply_
from frugal_dist.optim.step_items import Item

KERNELS = ("auto", "torch", "triton")
FREE_CHUNK = 1 << 25  # elements per batched signSGD apply (bounds its temporaries)


def can_batch(it: Item) -> bool:
    """Whether an item's update may join a batch of this module: F(R) not decided by a sign
    vote already, float32 data (one dtype per list), not empty. Each kind decides which batch
    (``route`` of ``optim.kinds``)."""
    return not it.free_done and it.view.data.dtype == torch.float32 and it.view.data.numel() > 0


def free_parts(batch: list[tuple[Item, str, float]]) -> list[tuple[str, float, list[Item],
                                                                    list[Tensor]]]:  # fmt: skip
    """The ``free`` batch grouped by (rule, scale), with each group's params: the fixed
    arguments of ``run_free`` between refreshes."""
    by_key: dict[tuple[str, float], list[Item]] = {}
    for it, rule, scale in batch:
        by_key.setdefault((rule, scale), []).append(it)
    return [(rule, scale, its, [c.view.data for c in its]) for (rule, scale), its in by_key.items()]


def run_free(parts: list[tuple[str, float, list[Item], list[Tensor]]], lr: float, wd: float,
             kernels: str) -> None:  # fmt: skip
    """One ``free_apply_`` call per (rule, scale) with the current gradients (``Item.g``), lr
    and decay (decay folded; ``rule="none"`` still decays)."""
    for rule, scale, its, data in parts:
        if rule == "none" and wd == 0.0:
            continue
        grads = [
            _param_shaped(c, c.g) if c.kind.matrix_grad else _shaped(c.g, d)
            for c, d in zip(its, data)
        ]
        free_apply_(data, grads, lr * scale, rule=rule, decay=lr * wd, impl=kernels)


VotedPart = tuple[tuple[float, float], Tensor, list[Item], list[Tensor], list[int]]


def voted_parts(batch: list[tuple[Item, tuple[float, float]]]) -> list[VotedPart]:
    """The ``voted`` batch grouped by ((s_p, s_i), gathered buffer): each group's items, params
    and byte offsets (``Item.vote_bits``), the arguments of one ``vote_apply_`` call."""
    by_key: dict[tuple, VotedPart] = {}
    for it, factors in batch:
        gathered, offset = it.vote_bits
        key = (factors, id(gathered))
        part = by_key.get(key)
        if part is None:
            part = by_key[key] = (factors, gathered, [], [], [])
        part[2].append(it)
        part[3].append(it.view.data)
        part[4].append(offset)
    return list(by_key.values())


def run_voted(parts: list[VotedPart], lr: float, wd: float, kernels: str) -> None:
    """W <- W (1 - lr wd) - (lr s_p) s_i F for every voted part (F read from the packed bits;
    ``(lr s_p) s_i`` as ``apply_one`` rounds it), then the items' temporaries are dropped."""
    for (s_p, s_i), gathered, its, data, offsets in parts:
        vote_apply_(data, gathered, offsets, lr * s_p * s_i, decay=lr * wd, impl=kernels)
        for it in its:
            it.release()


def apply_coordinate_batch(its: list[Item], lr: float, s_p: float, s_i: float) -> None:
    """W += -lr s_p D with D = U on the selected coordinates and s_i sign(G) elsewhere, for many
    coordinate items at once: one foreach sign (and scale), one ``index_copy_`` of U per item,
    one foreach add. Temporaries are bounded to ``FREE_CHUNK`` elements at a time."""
    for chunk in runs_of(its, _numel, FREE_CHUNK):
        full = torch._foreach_sign([it.g for it in chunk])
        if s_i != 1.0:
            torch._foreach_mul_(full, s_i)
        for it, f in zip(chunk, full):
            it.sel.scatter_(f, it.u)  # selected: up(U); others: s_i F(R)
            it.free = it.u = it.g_sf = None
        directions = [_param_shaped(it, f) for it, f in zip(chunk, full)]
        torch._foreach_add_([it.view.data for it in chunk], directions, alpha=-lr * s_p)


def apply_projection_batch(its: list[Item], lr: float, s_p: float, s_i: float) -> None:
    """W += -lr s_p (s_i sign(G - up(G_sf)) + up(U)) for many projection items: the two GEMMs
    per item (residual, ``up_add_``) stay per tensor, the sign and the update are one foreach
    op each. Temporaries are bounded to ``FREE_CHUNK`` elements at a time."""
    for chunk in runs_of(its, _numel, FREE_CHUNK):
        full = [it.sel.residual(it.g, it.g_sf) for it in chunk]
        torch._foreach_sign_(full)
        for it, f in zip(chunk, full):
            it.sel.up_add_(f, it.u, beta=s_i)  # s_i F(R) + up(U), in place in F(R)'s buffer
            it.free = it.u = it.g_sf = None
        directions = [_param_shaped(it, f) for it, f in zip(chunk, full)]
        torch._foreach_add_([it.view.data for it in chunk], directions, alpha=-lr * s_p)


def _numel(it: Item) -> int:
    return it.view.data.numel()


def coordinate_fusable(it: Item, kernels: str, sharded: bool, sign_vote: bool) -> bool:
    """A coordinate item for ``coordinate_adamw_apply_`` (its state phase runs in the apply
    kernel): Triton selected (``kernels="auto"`` on CUDA, or ``"triton"``), a selection of
    whole columns / rows (one with an ``axis``), rule ``adamw``, a whole (unsharded) float32
    matrix with a non-empty selection, the owner holding the state (no ``shard_state`` split)
    and the whole reduced gradient (no sign vote). Everything else keeps the per-phase path."""
    data = it.view.data
    return (
        kernels != "torch"
        and (kernels == "triton" or data.device.type == "cuda")
        and not sharded
        and not sign_vote
        and it.sel.axis is not None
        and it.kind.rule(it.group) == "adamw"
        and it.span.is_full
        and data.dtype == torch.float32
        and data.numel() > 0
        and it.sel.numel > 0
    )


@dataclass
class FusedParts:
    """The fixed arguments of a group's fused apply between refreshes (``fused_parts``): per lr
    scale the whole-tensor AdamW items, their params and moments; per matrix shape the coordinate
    items, their params as (m, n) matrices (``coordinate_matrix``), moments, selections and
    ``coordinate_positions``."""

    whole: list[tuple[float, list[Item], list[Tensor], list[Tensor], list[Tensor]]]
    coords: list[tuple[list[Item], list[Tensor], list[Tensor], list[Tensor], list[Tensor],
                       list[Tensor]]]  # fmt: skip


def fused_parts(
    its: list[Item], group: dict, positions: dict[str, tuple[Tensor, Tensor]]
) -> FusedParts:
    """Group ``its`` (fused items of ``group``) for ``run_fused``. ``positions``: the caller's
    cache of ``coordinate_positions`` per parameter name (rebuilt when the selection changes)."""
    by_scale: dict[float, list[Item]] = {}
    coords: dict[tuple, list[tuple[Item, Tensor]]] = {}
    for it in its:
        if it.kind.matrix_grad:  # coordinates (``coordinate_fusable``)
            w = coordinate_matrix(it)
            coords.setdefault(tuple(w.shape), []).append((it, w))
        else:  # whole tensors: AdamW groups (scale 1), active blocks (s_p)
            by_scale.setdefault(it.kind.lr_scale(group), []).append(it)
    whole = [
        (scale, sub, [it.view.data for it in sub], [it.st["exp_avg"] for it in sub],
         [it.st["exp_avg_sq"] for it in sub])
        for scale, sub in by_scale.items()
    ]  # fmt: skip
    parts = []
    for pairs in coords.values():
        sub = [it for it, _ in pairs]
        dim = sub[0].sel.axis_length
        parts.append((
            sub, [w for _, w in pairs], [it.st["exp_avg"] for it in sub],
            [it.st["exp_avg_sq"] for it in sub], [it.sel.index for it in sub],
            [_positions(positions, it, dim) for it in sub],
        ))  # fmt: skip
    return FusedParts(whole, parts)


def run_fused(parts: FusedParts, lr: float, wd: float, group: dict, kernels: str) -> None:
    """The fused items' updates with the current gradients (``Item.g``), lr and decay.
    Whole-tensor AdamW items use lr * s_p and wd / s_p for active blocks (same product
    lr * wd)."""
    b1, b2 = group["betas"]
    for scale, sub, data, m, v in parts.whole:
        grads = [_shaped(it.g, d) for it, d in zip(sub, data)]
        if data[0].device.type == "cpu" and kernels != "triton":  # fused=True on the CPU
            torch._fused_adamw_(
                data, grads, m, v, [], [it.st["sf_step"] for it in sub], lr=lr * scale,
                beta1=b1, beta2=b2, weight_decay=wd / scale, eps=group["eps"], amsgrad=False,
                maximize=False,
            )  # fmt: skip
            continue
        adamw_apply_(data, grads, m, v, [it.sf_t for it in sub], lr=lr * scale,
                     betas=(b1, b2), eps=group["eps"], weight_decay=wd / scale,
                     impl=kernels)  # fmt: skip
    s_p, s_i = group["proj_params_lr_scale"], group["inactive_lr_scale"]
    for sub, data, m, v, index, pos in parts.coords:
        coordinate_adamw_apply_(
            data, [it.g for it in sub], m, v, index, [it.sf_t for it in sub], lr=lr, scale=s_p,
            free_scale=s_i, betas=(b1, b2), eps=group["eps"], decay=lr * wd,
            free_rule=group["state_free"], axis=sub[0].sel.axis, positions=pos, impl=kernels,
        )  # fmt: skip


def coordinate_matrix(it: Item) -> Tensor:
    """The item's parameter data as the coordinate kernel reads it: a matrix whose (dim 0, the
    rest) view is the selection's (m, n). Dense data is passed as it is (an (m, ...) parameter);
    a layout's 1-D fragment (a whole parameter at ``span.is_full``, ``coordinate_fusable``) is
    viewed as (m, n), so the batch key, the compact moments and the positions all refer to the
    parameter's matrix and not to a (1, m n) row (no copy: the fragment is contiguous)."""
    data = it.view.data
    m, n = it.span.m, it.span.n
    return data if matrix_shape(data) == (m, n) else data.view(m, n)


def _positions(cache: dict[str, tuple[Tensor, Tensor]], it: Item, dim: int) -> Tensor:
    """``coordinate_positions`` of the item's selection, built once per selection."""
    hit = cache.get(it.name)
    if hit is not None and hit[0] is it.sel.index:
        return hit[1]
    pos = coordinate_positions(it.sel.index, dim)
    cache[it.name] = (it.sel.index, pos)
    return pos


def _shaped(g: Tensor, like: Tensor) -> Tensor:
    """``g`` viewed with ``like``'s shape (itself when it already has it: no view op)."""
    return g if g.shape == like.shape else g.reshape(like.shape)


def _param_shaped(it: Item, local: Tensor) -> Tensor:
    """``it.span.unpad(local)`` shaped like the parameter data (no view op for a whole tensor
    whose local matrix already has its shape)."""
    data = it.view.data
    if it.span.is_full and local.shape == data.shape:
        return local
    return _shaped(it.span.unpad(local), data)


def local_matrix(view, g: Tensor) -> Tensor:
    """``view.span.pad(g.reshape(-1))``, skipping both views when ``g`` is already the whole
    (m, n) matrix."""
    span = view.span
    if span.is_full and g.dim() == 2 and g.shape[0] == span.m and g.shape[1] == span.n:
        return g
    return span.pad(g.reshape(-1))
