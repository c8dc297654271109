"""Per-rank function for ``test_hierarchical``: every (subspace, communication mode) pair on the
same 4 gloo ranks, each rank with its own dyadic gradients (``workers.rank_grads``: every sum
over ranks is exact in float32), parameters recorded after every step."""

from __future__ import annotations

from typing import Any

import torch

from frugal_dist import FRUGAL
from tests.distributed import workers

BASE = dict(lr=1e-2, update_gap=2, seed=3)
CASES = {
    "block": dict(subspace="block", density=0.4),
    "columns": dict(subspace="coordinate", coord_choice="columns", density=0.25),
    "projection": dict(subspace="projection", proj_type="random", density=0.25),
}
# node_groups: ranks per node. 4 ranks: 2 nodes x 2 (the case under test; also given as a 2-D
# DeviceMesh), one node of 4 (must be exact mode), 4 nodes of 1 (must be sign mode).
MODES = {
    "hier_2x2": dict(residual_comm="hierarchical", node_groups=2),
    "hier_mesh": dict(residual_comm="hierarchical", node_groups="mesh"),
    "hier_sharded": dict(residual_comm="hierarchical", node_groups=2, shard_state=True),
    "hier_1node": dict(residual_comm="hierarchical", node_groups=4),
    "exact": dict(residual_comm="exact"),
    "hier_4x1": dict(residual_comm="hierarchical", node_groups=1),
    "sign": dict(residual_comm="sign"),
}


def run_modes(rank: int, world: int, steps: int) -> dict[Any, Any]:
    """{(case, mode): {"traj": [params after step s], "stats": last step's comm stats}}."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("nodes", "local"))
    out: dict[Any, Any] = {}
    for case, kw in CASES.items():
        for mode, extra in MODES.items():
            if extra.get("node_groups") == "mesh":
                extra = {**extra, "node_groups": mesh}
            split, full = workers.named_params()
            params = split + full
            shapes = [tuple(p.shape) for p in params]
            opt = FRUGAL(workers.groups(split, full), reduce_gradients=True, **BASE, **kw, **extra)
            traj = []
            for s in range(steps):
                for p, g in zip(params, workers.rank_grads(s, rank, shapes)):
                    p.grad = g.clone()
                opt.step()
                traj.append([p.detach().clone() for p in params])
            stats = opt.comm_stats()
            out[case, mode] = {"traj": traj, "stats": dict(stats["last_step"])}
            if mode == "hier_2x2":
                out[case, "node_size"] = opt.node_groups().node_size
    return out


def grads_of(step: int, rank: int) -> list[torch.Tensor]:
    """The gradients ``run_modes`` gives rank ``rank`` at ``step`` (for the test's reference)."""
    split, full = workers.named_params()
    return workers.rank_grads(step, rank, [tuple(p.shape) for p in split + full])
