"""Collectives across nodes, each node's L ranks sharing the slow links (``comm.topology``).

After an exact mean inside the node every local rank holds the same node-level tensors, so
the L ranks of a node need not each send all of them across nodes: local rank j sends only
slice j (of ceil(n / L) entries) over its inter group, and the slices come back together over
the fast intra group. Per rank, with N nodes and a payload of n entries:

    node_allreduce_mean_   slow: all_reduce of n/L float32 over N ranks   4 B x n / L
                                 (ring wire 2 (N-1)/N x that)
                           fast: all_gather of the slices over L ranks    4 B x n / L
    node_sign_gather       slow: all_gather of B/L packed bytes           B / L, B = sum ceil(n/8)
                                 (wire (N-1) x that)
                           fast: all_gather of the (N, B/L) received bytes N x B / L
                           then the caller's vote of the N node signs (``kernels.sign_bits``
                           ``majority_vote``, or ``kernels.vote_apply``)

so the slow links carry 1/L of what each rank would send alone; results are those of the
same collective over the inter group on the whole payload (the same N summands per entry).
Slow-link bytes are counted under the caller's key, fast-link ones under ``intra_gather``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from frugal_dist.comm.collectives import all_gather_rows_
from frugal_dist.comm.stats import CommStats
from frugal_dist.comm.topology import NodeGroups
from frugal_dist.kernels.sign_bits import pack_signs


def _slice(flat: Tensor, groups: NodeGroups) -> tuple[Tensor, Tensor, int]:
    """(``flat`` zero-padded to L x c entries, this local rank's slice (a copy), c)."""
    n, parts = flat.numel(), groups.node_size
    c = -(-n // parts)
    padded = torch.zeros(parts * c, dtype=flat.dtype, device=flat.device)
    padded[:n] = flat
    j = dist.get_rank(groups.intra)
    return padded, padded[j * c : (j + 1) * c].clone(), c


def node_allreduce_mean_(
    tensors: list[Tensor], groups: NodeGroups, stats: CommStats, kind: str
) -> None:
    """In place: each tensor (equal on the node's ranks) becomes its mean over the N nodes
    (module docstring: 4 B x n / L per rank over the slow links)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    padded, mine, c = _slice(flat, groups)
    dist.all_reduce(mine, group=groups.inter)
    mine.div_(groups.nodes)
    stats.add(kind, mine.nbytes, 2 * (groups.nodes - 1) / groups.nodes * mine.nbytes)
    all_gather_rows_(padded.view(groups.node_size, c), mine, groups.intra)
    stats.add("intra_gather", mine.nbytes, (groups.node_size - 1) * mine.nbytes)
    offset = 0
    for t in tensors:
        t.copy_(padded[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


def node_sign_gather(
    tensors: list[Tensor], groups: NodeGroups, stats: CommStats, kernels: str = "auto"
) -> Tensor:
    """The N nodes' packed signs of ``tensors`` as an (N, B) uint8 buffer (rows of unit stride,
    the format of ``collectives.sign_gather``; row starts 4-byte aligned, so the vote kernels
    read words): slice j over the inter group (B / L bytes per rank, ``sign_allgather``), the
    slices back together over the intra group (N x B / L, ``intra_gather``). The vote is the
    caller's."""
    flat = pack_signs(tensors, impl=kernels)
    nbytes = flat.numel()
    _, mine, c = _slice(flat, groups)
    nodes, size = groups.nodes, groups.node_size
    part = torch.empty((nodes, c), dtype=torch.uint8, device=flat.device)
    all_gather_rows_(part, mine, groups.inter)
    stats.add("sign_allgather", mine.nbytes, (nodes - 1) * mine.nbytes)
    every = torch.empty((size, nodes, c), dtype=torch.uint8, device=flat.device)
    all_gather_rows_(every, part, groups.intra)
    stats.add("intra_gather", part.nbytes, (size - 1) * part.nbytes)
    # the (N, L x c) node rows, each starting on a 4-byte boundary: the vote reads words
    width = size * c
    rows = torch.empty((nodes, -(-width // 4) * 4), dtype=torch.uint8, device=flat.device)
    rows[:, :width].view(nodes, size, c).copy_(every.permute(1, 0, 2))
    return rows[:, :nbytes]
