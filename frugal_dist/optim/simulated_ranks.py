"""W data-parallel ranks simulated in one process (``FRUGAL.step_ranks``): the reduce phase of
``reduce_gradients=True`` computed from every rank's gradient, with no process group.

Replicated parameters under FRUGAL's own reduction: after the reduce phase every rank holds the
same reduced gradients, G_sf and voted signs, so the rest of the step (select, down, state,
apply) is the same computation on every rank. One process can therefore take the step of rank
0 of a W-rank run: the plan phase runs on rank 0's gradients, this module replaces the
collectives of the reduce phase by their in-process results, and the other phases run as
usual. What each collective delivers, from the W ranks' gradients g_0 .. g_{W-1} (each made
into the item's ``g`` as the plan phase makes it: float32, the (m, n) matrix for coordinate /
projection kinds):

    exact         G = mean_r g_r, for every item                     (``allreduce_mean_``)
    sign          split_parts of each rank (``optim.sign_reduce``: the kinds' ``sign_parts``),
                  the full and compact parts mean-reduced, the residuals' packed signs
                  (``pack_signs``) stacked as the (W, B) rows ``sign_gather`` returns, and
                  ``take_vote`` on them: the code path of the distributed step
    hierarchical  L ranks per node (``node_size``), N = W / L nodes: each node's mean g_k of
                  every item first (``grad_intra``), then sign with the N node means as the
                  voters; N = 1 is exact, L = 1 is sign (as ``optim.sign_reduce``)

A mean is computed as ``allreduce_mean_`` does: the tensors of a rank concatenated to one
float32 buffer, the W buffers summed in rank order, divided by W. Sums of two terms are the
same in any order, so at W = 2 (and for 2 x 2 hierarchies) the results are bitwise those of a
gloo / NCCL run; with more terms the collective's summation order may differ in the last bits.
The vote is integer arithmetic on the same packed bits: equal whatever the order.

Bytes: what one real rank would hand to each collective is counted in ``CommStats`` under the
same keys (``optim.sign_reduce``'s tables, and the 4 B inf/nan flag, ``nonfinite_flag``), so
``comm_stats()`` reads as a real rank's.
Nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import rank_and_world
from frugal_dist.comm.stats import CommStats
from frugal_dist.kernels.sign_bits import pack_signs
from frugal_dist.optim.fast_apply import local_matrix
from frugal_dist.optim.nonfinite import FLAG_KEY
from frugal_dist.optim.sign_reduce import SignParts, split_parts, take_vote

if TYPE_CHECKING:
    from frugal_dist.optim.frugal import FRUGAL
    from frugal_dist.optim.phases import StepContext
    from frugal_dist.optim.step_items import Item


@dataclass(frozen=True)
class SimulatedRanks:
    """The simulated ranks of one ``step_ranks`` call: ``grads[r][i]`` is rank r's gradient of
    parameter i (``params`` order, None for a parameter without one), ``node_size`` the ranks
    per simulated node (``residual_comm="hierarchical"``; 1 otherwise)."""

    grads: list[list[Tensor | None]]
    params: list[Tensor]
    node_size: int

    @property
    def world(self) -> int:
        return len(self.grads)

    @property
    def nodes(self) -> int:
        return self.world // self.node_size

    def grads_of(self, params: list[Tensor]) -> list[list[Tensor | None]]:
        """Per rank, its gradients of ``params`` (parameters of ``self.params``) in that order."""
        where = {id(p): i for i, p in enumerate(self.params)}
        index = [where[id(p)] for p in params]
        return [[gs[i] for i in index] for gs in self.grads]

    def count_flag(self, stats: CommStats) -> None:
        """A real rank's bytes of the inf/nan flag's all-reduce (``optim.nonfinite``): 4 B."""
        stats.add(FLAG_KEY, 4, 2 * (self.world - 1) / self.world * 4)

    def votes(self, residual_comm: str) -> bool:
        """Whether the reduce votes residual signs (``sign_reduce.votes_residual``)."""
        if residual_comm == "hierarchical":
            return self.nodes > 1
        return residual_comm == "sign"


def prepare(
    opt: FRUGAL, rank_grads: Sequence[Sequence[Tensor | None]], node_size: int | None
) -> SimulatedRanks:
    """The ranks of one ``opt.step_ranks(rank_grads, node_size)``, checked (``opt`` reduces
    gradients itself, is alone in its process group and has no layout; ``simulated_ranks``),
    with every parameter's ``grad`` set to rank 0's, as on rank 0 of a real run."""
    if not opt.reduce_gradients:
        raise ValueError(
            "step_ranks simulates FRUGAL's own gradient reduction; construct the optimizer "
            "with reduce_gradients=True (and residual_comm 'exact', 'sign' or "
            "'hierarchical')"
        )
    if opt.layout is not None or rank_and_world(opt.process_group)[1] > 1:
        raise ValueError(
            "step_ranks simulates the ranks in this process; it needs an optimizer of one "
            "process and whole tensors (no process group of several ranks, no bound layout)"
        )
    params = [p for group in opt.param_groups for p in group["params"]]
    sim = simulated_ranks(params, rank_grads, opt.residual_comm, node_size)
    for p, g in zip(params, sim.grads[0]):
        p.grad = g
    return sim


def simulated_ranks(
    params: list[Tensor], rank_grads: Sequence[Sequence[Tensor | None]], residual_comm: str,
    node_size: int | None,
) -> SimulatedRanks:  # fmt: skip
    """``rank_grads`` checked against ``params`` (one list per rank, one entry per parameter,
    shapes equal, a parameter with a gradient on one rank has one on all); a clear error naming
    the argument otherwise."""
    grads = [list(gs) for gs in rank_grads]
    if not grads:
        raise ValueError("step_ranks: rank_grads is empty; pass one gradient list per rank")
    for r, gs in enumerate(grads):
        if len(gs) != len(params):
            raise ValueError(
                f"step_ranks: rank_grads[{r}] has {len(gs)} gradients for {len(params)} "
                "parameters; pass one per parameter of param_groups, in order (None for none)"
            )
        for i, (g, p) in enumerate(zip(gs, params)):
            if (g is None) != (grads[0][i] is None):
                raise ValueError(
                    f"step_ranks: parameter {i} has a gradient on rank 0 but not on rank {r} "
                    "(or the reverse); every rank must pass the same parameters"
                )
            if g is not None and g.shape != p.shape:
                raise ValueError(
                    f"step_ranks: rank_grads[{r}][{i}] has shape {tuple(g.shape)}, its "
                    f"parameter {tuple(p.shape)}"
                )
    world = len(grads)
    if residual_comm == "hierarchical":
        if node_size is None:
            raise ValueError(
                "step_ranks with residual_comm='hierarchical' needs node_size (simulated ranks "
                "per node, dividing the number of ranks)"
            )
        if not isinstance(node_size, int) or node_size < 1 or world % node_size:
            raise ValueError(
                f"step_ranks: node_size={node_size!r} must be a positive int dividing the "
                f"{world} simulated ranks"
            )
    elif node_size is not None:
        raise ValueError(
            f"step_ranks: node_size is for residual_comm='hierarchical' (this optimizer's is "
            f"{residual_comm!r}); drop node_size"
        )
    return SimulatedRanks(grads, list(params), node_size or 1)


def reduce_simulated(ctx: StepContext, items: list[Item]) -> None:
    """The reduce phase over ``ctx.simulated``'s ranks (module docstring); on return the items
    hold what rank 0's would after the distributed reduce (its ``g`` and ``g_sf`` reduced in
    place, ``free`` / ``vote_bits`` voted)."""
    sim: SimulatedRanks = ctx.simulated
    grads = _item_grads(sim, items)
    world, mode = sim.world, ctx.residual_comm
    size = sim.node_size if mode == "hierarchical" else 1
    if mode == "exact" or size == world:  # hierarchical with one node is exact mode
        _mean_into(grads)
        _count_mean(ctx.comm, "grad_full", _nbytes(grads[0]), world)
        return
    voters = grads
    if size > 1:  # node means first: into each node's first rank's tensors
        for k in range(sim.nodes):
            _mean_into(grads[k * size : (k + 1) * size])
        _count_mean(ctx.comm, "grad_intra", _nbytes(grads[0]), size)
        voters = grads[::size]
    parts = _voter_parts(items, voters)
    _mean_into([p.full for p in parts])
    _mean_into([p.compact for p in parts])
    tensors = [p.sign_tensors() for p in parts]
    gathered = None
    if tensors[0]:
        gathered = torch.stack([pack_signs(ts, impl=ctx.kernels) for ts in tensors])
        take_vote(parts[0], gathered, ctx.kernels)
    _count_voters(ctx.comm, parts[0], gathered, len(voters), size)


def _item_grads(sim: SimulatedRanks, items: list[Item]) -> list[list[Tensor]]:
    """Per rank, each item's ``g`` as the plan phase makes it from the rank's gradient (float32;
    the (m, n) matrix for matrix kinds). Rank 0's are the items' own ``g`` (planned from it)."""
    where = {id(p): i for i, p in enumerate(sim.params)}
    index = [where[id(it.view.data)] for it in items]
    out = [[it.g for it in items]]
    for gs in sim.grads[1:]:
        row = []
        for it, i in zip(items, index):
            g = gs[i].float()
            row.append(local_matrix(it.view, g) if it.kind.matrix_grad else g)
        out.append(row)
    return out


def _voter_parts(items: list[Item], voters: list[list[Tensor]]) -> list[SignParts]:
    """``split_parts`` of every voter's gradients, voter 0 last, so that the items keep voter
    0's (``g``, ``g_sf``) as rank 0 does."""
    parts: list[SignParts] = [SignParts()] * len(voters)
    for v in reversed(range(len(voters))):
        for it, g in zip(items, voters[v]):
            it.g = g
        parts[v] = split_parts(items)
    return parts


def _mean_into(per_rank: list[list[Tensor]]) -> None:
    """In place: ``per_rank[0]``'s tensors become the mean over the ranks, computed as
    ``allreduce_mean_`` does (one float32 buffer per rank, summed in rank order, / W)."""
    if len(per_rank) < 2 or not per_rank[0]:
        return
    flat = torch.cat([t.reshape(-1).float() for t in per_rank[0]])
    for ts in per_rank[1:]:
        flat.add_(torch.cat([t.reshape(-1).float() for t in ts]))
    flat.div_(len(per_rank))
    offset = 0
    for t in per_rank[0]:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


def _nbytes(tensors: list[Tensor]) -> int:
    """Bytes of ``tensors`` as the float32 buffer a mean all-reduce sends."""
    return 4 * sum(t.numel() for t in tensors)


def _count_mean(stats: CommStats, kind: str, nbytes: int, world: int) -> None:
    """A real rank's bytes of ``allreduce_mean_`` of ``nbytes`` over ``world`` ranks (none for
    an empty list)."""
    if world > 1 and nbytes:
        stats.add(kind, nbytes, 2 * (world - 1) / world * nbytes)


def _count_voters(
    stats: CommStats, parts: SignParts, gathered: Any, voters: int, size: int
) -> None:  # fmt: skip
    """A real rank's bytes of the voters' exchange: plain collectives over the voters (sign
    mode, or one rank per node), or the 1/L slices of ``comm.hierarchical`` (``size`` > 1)."""
    nbytes = [_nbytes(parts.full), _nbytes(parts.compact)]
    signs = 0 if gathered is None else gathered.shape[1]
    if size == 1:
        for kind, n in zip(("grad_full", "grad_projected"), nbytes):
            _count_mean(stats, kind, n, voters)
        if signs:
            stats.add("sign_allgather", signs, (voters - 1) * signs)
        return
    for kind, n in zip(("grad_full", "grad_projected"), nbytes):
        if n:  # node_allreduce_mean_: 1/L of the float32 entries across nodes, then gathered
            mine = 4 * -(-(n // 4) // size)
            stats.add(kind, mine, 2 * (voters - 1) / voters * mine)
            stats.add("intra_gather", mine, (size - 1) * mine)
    if signs:  # node_sign_gather: 1/L of the packed bytes across nodes, then gathered
        mine = -(-signs // size)
        stats.add("sign_allgather", mine, (voters - 1) * mine)
        stats.add("intra_gather", voters * mine, (size - 1) * voters * mine)
