"""Node groups for ``residual_comm="hierarchical"``: fast links inside a node, slow between.

The optimizer's process group of W ranks (group ranks 0..W-1, the order torchrun gives: node k
holds ranks k L .. k L + L - 1) is cut into N = W / L nodes of L ranks:

    intra group of rank r: the L ranks of its node            {k L + j : j < L},    k = r // L
    inter group of rank r: the N ranks of its local rank      {k L + j : k < N},    j = r % L

so every rank is in one intra group (NVLink) and one inter group (InfiniBand / Ethernet); the L
inter groups of a node are disjoint and run side by side (one NIC per GPU on most clusters).
A 2-D ``DeviceMesh`` (dim 0 across nodes, dim 1 inside a node: HSDP's (replicate, shard)) gives
the same two groups explicitly.

L comes from ``node_groups``: an int, a 2-D mesh, None for the ``LOCAL_WORLD_SIZE`` environment
variable that torchrun sets, or a ``NodeGroups`` built by ``build_node_groups`` (e.g. with the
inter groups on another backend: ``inter_backend="gloo"`` sends the cross-node bytes over TCP,
how ``benchmarks/comm_bench.py`` emulates slow links on one host). The groups are created once,
on first use (``dist.new_group`` with local synchronisation: only the member ranks take part),
so every rank must reach its first step -- the optimizer's first-step agreement check compares
``node_size`` before that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from frugal_dist.comm.collectives import ProcessGroup, rank_and_world

INTER_BACKENDS = (None, "gloo", "nccl")  # build_node_groups(inter_backend=...): None = pg's


@dataclass(frozen=True)
class NodeGroups:
    """This rank's two groups: ``intra`` (its node, ``node_size`` ranks) and ``inter`` (the same
    local rank on each of ``nodes`` nodes). With one node ``inter`` is None, with one rank per
    node ``intra`` is None (None would mean the default group: the reduce never uses them then;
    ``optim.sign_reduce`` checks ``nodes`` and ``node_size`` first)."""

    intra: ProcessGroup
    inter: ProcessGroup
    node_size: int
    nodes: int


def resolve_node_size(node_groups: Any, world: int) -> int:
    """Ranks per node from the ``node_groups`` option (module docstring); a clear error naming
    the option when it does not divide the optimizer's ``world`` ranks."""
    if node_groups is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            if world == 1:
                return 1
            raise ValueError(
                "residual_comm='hierarchical' needs the node size: LOCAL_WORLD_SIZE is not set "
                "(torchrun sets it); pass node_groups=<ranks per node> or a 2-D DeviceMesh "
                "(across nodes, inside a node)"
            )
        try:
            size = int(env)
        except ValueError:
            raise ValueError(
                f"LOCAL_WORLD_SIZE={env!r} is not an integer; set it to the ranks per node or "
                "pass node_groups=<ranks per node>"
            ) from None
        source = f"LOCAL_WORLD_SIZE={env}"
    elif isinstance(node_groups, NodeGroups):
        size = node_groups.node_size
        if size * node_groups.nodes != world:
            raise ValueError(
                f"node_groups: NodeGroups of {node_groups.nodes} nodes x {size} ranks, the "
                f"optimizer's process group has {world}; build them over the optimizer's group"
            )
        source = f"node_groups NodeGroups({node_groups.nodes} x {size})"
    elif _is_mesh(node_groups):
        if node_groups.ndim != 2:
            raise ValueError(
                f"node_groups: a DeviceMesh of {node_groups.ndim} dims; pass a 2-D mesh "
                "(dim 0 across nodes, dim 1 inside a node), e.g. init_device_mesh(dev, "
                "(nodes, ranks_per_node))"
            )
        size = int(node_groups.size(1))
        if int(node_groups.size()) != world:
            raise ValueError(
                f"node_groups: the mesh has {node_groups.size()} ranks, the optimizer's process "
                f"group {world}; pass a mesh over the optimizer's ranks"
            )
        source = f"node_groups mesh {tuple(node_groups.shape)}"
    elif isinstance(node_groups, int) and not isinstance(node_groups, bool):
        size, source = node_groups, f"node_groups={node_groups}"
    else:
        raise ValueError(
            f"node_groups must be None (LOCAL_WORLD_SIZE), an int (ranks per node), a 2-D "
            f"DeviceMesh or a NodeGroups, got {node_groups!r}"
        )
    if size < 1 or world % size:
        raise ValueError(
            f"{source}: {size} ranks per node does not divide the optimizer's {world} ranks; "
            "pass node_groups=<ranks per node> that divides the world size"
        )
    return size


def build_node_groups(
    pg: ProcessGroup, node_size: int, spec: Any = None, inter_backend: str | None = None
) -> NodeGroups:
    """This rank's intra and inter groups over ``pg`` (module docstring); ``spec``: a 2-D
    DeviceMesh or a ready ``NodeGroups`` to use instead; ``inter_backend``: the backend of the
    new inter groups (default: ``pg``'s). Collective over the member ranks of the two new groups
    (no data: the process-group setup only). Every rank of ``pg`` must call it."""
    if inter_backend not in INTER_BACKENDS:
        raise ValueError(
            f"inter_backend={inter_backend!r}: choose None (the process group's backend), "
            "'gloo' (TCP sockets: emulated slow cross-node links) or 'nccl'"
        )
    if isinstance(spec, NodeGroups):
        return spec
    rank, world = rank_and_world(pg)
    nodes = world // node_size
    if spec is not None:
        return NodeGroups(spec.get_group(1), spec.get_group(0), node_size, nodes)
    if nodes == 1:
        return NodeGroups(pg, None, node_size, 1)
    if node_size == 1 and inter_backend is None:
        return NodeGroups(None, pg, 1, nodes)
    ranks = dist.get_process_group_ranks(pg) if pg is not None else list(range(world))
    k, j = divmod(rank, node_size)
    intra = None
    if node_size > 1:
        intra = dist.new_group(ranks[k * node_size : (k + 1) * node_size],
                               use_local_synchronization=True)  # fmt: skip
    inter = dist.new_group(ranks[j::node_size], backend=inter_backend,
                           use_local_synchronization=True)  # fmt: skip
    return NodeGroups(intra, inter, node_size, nodes)


def _is_mesh(x: Any) -> bool:
    return type(x).__name__ == "DeviceMesh" and hasattr(x, "get_group")
