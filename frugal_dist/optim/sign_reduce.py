"""The reduce phase of ``residual_comm="sign"`` and ``"hierarchical"`` (``reduce_gradients``).

Each item's kind says what it needs (``SubspaceKind.sign_parts``): its full gradient reduced
exactly (whole-tensor state-full params, active blocks, svd refreshes, SGD groups), or a compact
state-full gradient G_sf (coordinates: the selected entries; projections: P^T G or G P) reduced
exactly plus a residual R (G with G_sf's entries zeroed, G - up(G_sf), or G itself for inactive
blocks / signSGD groups) of which only the sign is sent. With g_r rank r's gradient:

sign (W ranks, one group; bytes per rank handed to each collective, fp32):

    full:     G = mean_r g_r                       all_reduce     4 B x full entries  grad_full
    compact:  G_sf = mean_r down(g_r)              all_reduce     4 B x compact       grad_projected
    residual: F = sign(2 #{r: R(g_r) >= 0} - W)    all_gather     1 bit x residual    sign_allgather

hierarchical (N nodes of L ranks, ``comm.topology``): first the exact node mean over the fast
links, then the sign step above across nodes with the node means as the voters, each of the L
ranks of a node sending 1/L of the payload over its inter group (``comm.hierarchical``):

    node:     g_k = mean_{r in node k} g_r         all_reduce (intra, L ranks)  4 B x every entry
                                                                                grad_intra
    full:     G = mean_k g_k                       all_reduce (inter, N ranks)  4 B x full / L
                                                                                grad_full
    compact:  G_sf = mean_k down(g_k)              all_reduce (inter)           4 B x compact / L
                                                                                grad_projected
    residual: F = sign(2 #{k: R(g_k) >= 0} - N)    all_gather (inter)           bits / L
                                                                                sign_allgather
    slices back together                           all_gather (intra)           intra_gather

Only ``grad_full``, ``grad_projected`` and ``sign_allgather`` cross the slow links: per rank
4 B x (full + compact entries) / L in ring all-reduces (wire 2 (N-1)/N x that) plus
ceil(residual entries / 8) / L bytes all-gathered from the N - 1 other nodes; a node's L ranks
together send the sign mode's per-rank payload once. ``grad_intra`` and ``intra_gather`` use the
fast links. F is +1 / -1, or 0 on a tie (N even, split evenly); coordinates then overwrite
the selected entries with U, as in sign mode.

At one node (N = 1) hierarchical *is* exact mode: one mean all-reduce of every gradient over
the optimizer's group, the same call, so the same bits. At one rank per node (L = 1) it is sign
mode over the N ranks, the same calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import allreduce_mean_, sign_gather
from frugal_dist.comm.hierarchical import node_allreduce_mean_, node_sign_gather
from frugal_dist.comm.stats import CommStats
from frugal_dist.comm.topology import NodeGroups, resolve_node_size
from frugal_dist.kernels.sign_bits import majority_vote, packed_offsets, vote_views

if TYPE_CHECKING:
    from frugal_dist.optim.phases import StepContext
    from frugal_dist.optim.step_items import Item

HIERARCHICAL_UNDER_LAYOUT = (
    "residual_comm='hierarchical' is for replicated parameters whose gradients FRUGAL reduces "
    "itself (reduce_gradients=True: an unwrapped model or DDP with defer_to_optimizer_hook). "
    "Under an engine that shards (FSDP2, DeepSpeed ZeRO) the engine's reduce-scatter has "
    "averaged every gradient exactly before the optimizer runs, so there is no residual left to "
    "send as signs. Set residual_comm='exact' (and reduce_gradients=False); to keep the "
    "full-gradient traffic inside nodes use FSDP2's HSDP (fully_shard with a 2-D mesh "
    "(replicate, shard)), which reduce-scatters inside a node and all-reduces 1/L of the "
    "gradient across nodes"
)


def hierarchy_options(
    residual_comm: str, node_groups: Any, reduce_gradients: bool, world: int
) -> tuple[int | None, Any]:
    """(ranks per node, the 2-D mesh / ``NodeGroups`` or None) of ``FRUGAL(residual_comm=...,
    node_groups=...)``; (None, None) unless hierarchical. Clear errors for options that would be
    ignored."""
    if residual_comm != "hierarchical":
        if node_groups is not None:
            raise ValueError(
                f"node_groups is only read by residual_comm='hierarchical' (got "
                f"residual_comm={residual_comm!r}); drop node_groups or set "
                "residual_comm='hierarchical'"
            )
        return None, None
    if not reduce_gradients:
        raise ValueError(
            "residual_comm='hierarchical' needs reduce_gradients=True (it is how FRUGAL reduces "
            "the gradients itself); with reduce_gradients=False FRUGAL reduces nothing. Pass "
            "reduce_gradients=True, or residual_comm='exact' when DDP or a sharding engine "
            "reduces the gradients"
        )
    size = resolve_node_size(node_groups, world)
    spec = node_groups if not isinstance(node_groups, (int, type(None))) else None
    return size, spec


def votes_residual(ctx: StepContext) -> bool:
    """Whether this step's reduce sends residual signs (sign mode, or hierarchical across more
    than one node) -- the fused coordinate kernel needs the whole reduced gradient instead."""
    if not ctx.reduced_here:
        return False
    if ctx.simulated is not None:  # ranks simulated in one process (optim.simulated_ranks)
        return ctx.simulated.votes(ctx.residual_comm)
    if ctx.residual_comm == "sign":
        return True
    return ctx.residual_comm == "hierarchical" and ctx.optimizer.node_groups().nodes > 1


def reduce_signs(ctx: StepContext, items: list[Item]) -> None:
    """The reduce phase for ``residual_comm`` "sign" / "hierarchical" (module docstring): sets
    every item's reduced ``g``, its ``g_sf`` and its voted direction: ``vote_bits`` (the
    gathered packed signs, applied by ``fast_apply.run_voted`` with no float32 vote) for items
    whose update is the whole voted residual on float32 data (``applies_packed``), else the
    float32 ``free`` (one vote over the leading bytes of the same gathered buffer; these
    tensors are packed first)."""
    mean_, gather = _plain_collectives(ctx.pg)
    if ctx.residual_comm == "hierarchical":
        groups = ctx.optimizer.node_groups()
        if groups.nodes == 1:  # one node: exact mode, the same collective
            allreduce_mean_([it.g for it in items], ctx.pg, ctx.comm, "grad_full")
            return
        if groups.node_size == 1:  # one rank per node: sign mode over the inter group
            mean_, gather = _plain_collectives(groups.inter)
        else:
            allreduce_mean_([it.g for it in items], groups.intra, ctx.comm, "grad_intra")
            mean_, gather = _sliced_collectives(groups)
    parts = split_parts(items)
    mean_(parts.full, ctx.comm, "grad_full")
    mean_(parts.compact, ctx.comm, "grad_projected")
    tensors = parts.sign_tensors()
    if tensors:
        take_vote(parts, gather(tensors, ctx.comm, ctx.kernels), ctx.kernels)


@dataclass
class SignParts:
    """One rank's payload of the sign reduce (``split_parts``): the tensors to mean-reduce whole
    (``full``: the items' ``g`` themselves), the compact G_sf (``compact``: the items'
    ``g_sf``), and the residuals whose signs are voted -- ``signs`` (voted to float32 for the
    ``voted`` items) first, then ``direct`` (applied from the packed bits)."""

    full: list[Tensor] = field(default_factory=list)
    compact: list[Tensor] = field(default_factory=list)
    signs: list[Tensor] = field(default_factory=list)
    voted: list[Item] = field(default_factory=list)
    direct: list[tuple[Item, Tensor]] = field(default_factory=list)

    def sign_tensors(self) -> list[Tensor]:
        """The residuals in packed order (``signs``, then ``direct``)."""
        return self.signs + [resid for _, resid in self.direct]


def split_parts(items: list[Item]) -> SignParts:
    """Each item's kind's ``sign_parts`` of its current ``g`` (this rank's gradient); sets the
    items' ``g_sf`` (to be mean-reduced in place) and ``free_done``. No communication."""
    parts = SignParts()
    for it in items:
        pair = it.kind.sign_parts(it)
        if pair is None:
            parts.full.append(it.g)
            continue
        g_sf, resid = pair
        if resid is not None:
            if applies_packed(it):
                parts.direct.append((it, resid))
            else:
                parts.signs.append(resid)
                parts.voted.append(it)
        if g_sf is not None:
            it.g_sf = g_sf
            parts.compact.append(g_sf)
        it.free_done = True
    return parts


def take_vote(parts: SignParts, gathered: Tensor, kernels: str) -> None:
    """The voted directions from ``gathered``, the (voters, B) packed signs of every voter's
    ``parts.sign_tensors()`` (row v: voter v's ``pack_signs``): ``vote_bits`` for the
    ``direct`` items, the float32 majority vote (``kernels.sign_bits``) as ``free`` for the
    ``voted`` ones. No communication."""
    signs = parts.signs
    offsets, _ = packed_offsets([t.numel() for t in parts.sign_tensors()])
    for (it, _), offset in zip(parts.direct, offsets[len(signs) :]):
        it.vote_bits = (gathered, offset)
    if signs:
        head = offsets[len(signs) - 1] + (signs[-1].numel() + 7) // 8
        votes = vote_views(majority_vote(gathered[:, :head], impl=kernels), signs)
        for it, v in zip(parts.voted, votes):
            it.free = v


def applies_packed(it: Item) -> bool:
    """Whether the item's vote is applied from the packed bits (``fast_apply.run_voted``) rather
    than voted to a float32 tensor: its kind's update is the whole voted residual
    (``whole_vote_scale``) on non-empty contiguous float32 data."""
    data = it.view.data
    return (
        data.dtype == torch.float32
        and data.numel() > 0
        and data.is_contiguous()
        and it.kind.whole_vote_scale(it) is not None
    )


def _plain_collectives(pg: Any) -> tuple[Callable, Callable]:
    """(mean all-reduce, packed-sign gather) over one group: every rank sends its whole
    payload."""

    def mean_(tensors: list[Tensor], stats: CommStats, kind: str) -> None:
        allreduce_mean_(tensors, pg, stats, kind)

    def gather(tensors: list[Tensor], stats: CommStats, kernels: str) -> Tensor:
        return sign_gather(tensors, pg, stats, kernels)

    return mean_, gather


def _sliced_collectives(groups: NodeGroups) -> tuple[Callable, Callable]:
    """(mean all-reduce, packed-sign gather) across nodes, each local rank sending 1/L of the
    payload (``comm.hierarchical``)."""

    def mean_(tensors: list[Tensor], stats: CommStats, kind: str) -> None:
        node_allreduce_mean_(tensors, groups, stats, kind)

    def gather(tensors: list[Tensor], stats: CommStats, kernels: str) -> Tensor:
        return node_sign_gather(tensors, groups, stats, kernels)

    return mean_, gather
