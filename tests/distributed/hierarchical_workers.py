"""Per-rank function for ``test_hierarchical`` (gloo) and ``tests/gpu/test_hierarchical_nccl``:
every (subspace, communication mode) pair on the same ranks, each rank with its own dyadic
gradients (``workers.rank_grads``: every sum over ranks is exact in float32), parameters
recorded after every step; and ``simulate``, the single-process vote simulation they are
compared with (``ReferenceFRUGAL.step(voters)``, which shares no code with the fast path)."""

from __future__ import annotations

from typing import Any

import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from tests.distributed import workers

BASE = dict(lr=1e-2, update_gap=2, seed=3, proj_precision="fp32")
CASES = {
    "block": dict(subspace="block", density=0.4),
    "columns": dict(subspace="coordinate", coord_choice="columns", density=0.25),
    "projection": dict(subspace="projection", proj_type="random", density=0.25),
    "svd": dict(subspace="projection", proj_type="svd", density=0.25),  # refreshes: exact mean
    # the vote's F (0 on ties, +1 on the selected entries before U overwrites them) scaled to
    # RMS(U) (optim.free_scale)
    "columns-matched": dict(subspace="coordinate", coord_choice="columns", density=0.25,
                            free_scale="matched"),
}  # fmt: skip


def modes(world: int) -> dict[str, dict[str, Any]]:
    """node_groups = ranks per node: 2 nodes of world / 2 (the case under test; also as a 2-D
    DeviceMesh, as NodeGroups with gloo inter groups, and with shard_state), one node of all
    ranks (must be exact mode), nodes of one rank (must be sign mode)."""
    hier = dict(residual_comm="hierarchical")
    return {
        "hier_2_nodes": dict(hier, node_groups=world // 2),
        "hier_mesh": dict(hier, node_groups="mesh"),
        "hier_gloo_inter": dict(hier, node_groups="gloo_inter"),
        "hier_sharded": dict(hier, node_groups=world // 2, shard_state=True),
        "hier_1node": dict(hier, node_groups=world),
        "exact": dict(residual_comm="exact"),
        "hier_1rank_nodes": dict(hier, node_groups=1),
        "sign": dict(residual_comm="sign"),
    }


def run_modes(rank: int, world: int, steps: int, device: str = "cpu") -> dict[Any, Any]:
    """{(case, mode): {"traj": [params after step s (CPU)], "stats": last step's bytes}}."""
    from torch.distributed.device_mesh import init_device_mesh

    from frugal_dist.comm.topology import build_node_groups

    specs = {
        "mesh": init_device_mesh(device, (2, world // 2), mesh_dim_names=("nodes", "local")),
        "gloo_inter": build_node_groups(None, world // 2, inter_backend="gloo"),
    }
    out: dict[Any, Any] = {}
    for case, kw in CASES.items():
        for mode, extra in modes(world).items():
            if isinstance(extra.get("node_groups"), str):
                extra = {**extra, "node_groups": specs[extra["node_groups"]]}
            split, full = workers.named_params()
            split = [torch.nn.Parameter(p.detach().to(device)) for p in split]
            full = [torch.nn.Parameter(p.detach().to(device)) for p in full]
            params = split + full
            shapes = [tuple(p.shape) for p in params]
            opt = FRUGAL(workers.groups(split, full), reduce_gradients=True, **BASE, **kw, **extra)
            traj = []
            for s in range(steps):
                for p, g in zip(params, workers.rank_grads(s, rank, shapes)):
                    p.grad = g.to(device)
                opt.step()
                traj.append([p.detach().cpu().clone() for p in params])
            out[case, mode] = {"traj": traj, "stats": dict(opt.comm_stats()["last_step"])}
    return out


def simulate(case: str, world: int, node: int, steps: int) -> list[list[torch.Tensor]]:
    """One process: node k's gradient is the mean of its ranks' (exact: dyadic values), every
    parameter's gradient the mean of the node means, and the split parameters' state-free
    direction the vote of the node means' residuals -- except at svd refreshes, where the basis
    needs the exact mean gradient, which is then reduced in full (as in sign mode) and F is
    sign(R(mean))."""
    kw = {**BASE, **CASES[case]}
    split, full = workers.named_params()
    names = [f"layers.{i}.w" for i in range(len(split))]
    ref = ReferenceFRUGAL(list(zip(names, split)), **kw)
    ref_full = ReferenceFRUGAL(
        [(f"extra.{i}", p) for i, p in enumerate(full)], algorithm="adamw", **kw
    )
    params = split + full
    shapes = [tuple(p.shape) for p in params]
    traj = []
    for s in range(steps):
        per_rank = [workers.rank_grads(s, r, shapes) for r in range(world)]
        nodes = [
            [sum(per_rank[k * node + j][i] for j in range(node)) / node for i in range(len(params))]
            for k in range(world // node)
        ]
        for i, p in enumerate(params):
            p.grad = sum(n[i] for n in nodes) / len(nodes)
        svd_refresh = kw.get("proj_type") == "svd" and s % kw["update_gap"] == 0
        voters = (
            None if svd_refresh else {name: [n[i] for n in nodes] for i, name in enumerate(names)}
        )
        ref.step(voters)
        ref_full.step()
        traj.append([p.detach().clone() for p in params])
    return traj
