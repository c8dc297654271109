"""Per-rank functions for ``test_simulated_ranks`` (gloo) and the single-process simulations
they are compared with (``FRUGAL.step_ranks``, ``simulate_ranks`` in the training loop)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from frugal_dist import FRUGAL
from tests.distributed import workers
from tests.distributed.hierarchical_workers import BASE, CASES

NODE = 2  # ranks per node of the hierarchical mode (2 nodes x 2 ranks at world 4)
REDUCE_KEYS = ("grad_full", "grad_projected", "sign_allgather", "grad_intra", "intra_gather",
               "nonfinite_flag")  # fmt: skip
MODES = {
    "exact": dict(residual_comm="exact"),
    "sign": dict(residual_comm="sign"),
    "hier": dict(residual_comm="hierarchical"),
}


def _optimizer(case: str, mode: str, real_world: int) -> tuple[FRUGAL, list[torch.Tensor]]:
    split, full = workers.named_params()
    extra = dict(MODES[mode])
    if mode == "hier" and real_world > 1:
        extra["node_groups"] = NODE
    opt = FRUGAL(workers.groups(split, full), reduce_gradients=True, **BASE, **CASES[case],
                 **extra)  # fmt: skip
    return opt, split + full


def run_optimizer(rank: int, world: int, steps: int) -> dict[Any, Any]:
    """Each rank its own ``workers.rank_grads``, FRUGAL reducing them over gloo:
    {(case, mode): {"traj": params after each step, "stats": last step's payload bytes}}."""
    out: dict[Any, Any] = {}
    for case in CASES:
        for mode in MODES:
            opt, params = _optimizer(case, mode, world)
            shapes = [tuple(p.shape) for p in params]
            traj = []
            for s in range(steps):
                for p, g in zip(params, workers.rank_grads(s, rank, shapes)):
                    p.grad = g
                opt.step()
                traj.append([p.detach().clone() for p in params])
            out[case, mode] = {"traj": traj, "stats": dict(opt.comm_stats()["last_step"])}
    return out


@contextmanager
def one_thread():
    """One intra-op thread, as in the gloo workers (``launch._entry``): the same GEMM kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulate_optimizer(case: str, mode: str, world: int, steps: int) -> dict[str, Any]:
    """The same runs in this process: ``step_ranks`` with every rank's gradients."""
    opt, params = _optimizer(case, mode, 1)
    shapes = [tuple(p.shape) for p in params]
    traj = []
    with one_thread():
        for s in range(steps):
            grads = [workers.rank_grads(s, r, shapes) for r in range(world)]
            opt.step_ranks(grads, node_size=NODE if mode == "hier" else None)
            traj.append([p.detach().clone() for p in params])
    return {"traj": traj, "stats": dict(opt.comm_stats()["last_step"])}


def train_config(
    world: int, simulate: int, steps: int, comm: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A tiny run on a fixed global batch of 8 sequences: ``world`` real ranks (DDP with
    FRUGAL reducing) or ``simulate`` ranks in one process; ``data``: the data section (default:
    200 kB of the embedded corpus)."""
    raw = {"model": "tiny", "seq_len": 32, "batch_size": 8 // max(world, simulate),
           "max_steps": steps, "warmup_steps": 2, "eval_every": steps, "eval_batches": 2,
           "log_every": 1, "engine": "ddp" if world > 1 else "single", "grad_clip": 0.5,
           "simulate_ranks": simulate,
           "optimizer": {"name": "frugal", "lr": 3e-3, "density": 0.25, "update_gap": 4,
                         "subspace": "block", "inactive_lr_scale": 0.1,
                         "reduce_gradients": True, "residual_comm": comm},
           "data": data or {"source": "embedded", "max_bytes": 200_000}}  # fmt: skip
    return raw


def run_training(
    rank: int, world: int, steps: int, comm: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The training loop on ``world`` real gloo ranks (``engine=ddp``)."""
    from frugal_dist.train.config import build_config
    from frugal_dist.train.loop import train

    return train(build_config(train_config(world, 1, steps, comm, data)))


def simulate_training(
    world: int, steps: int, comm: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The same run in this process with ``simulate_ranks=world``."""
    from frugal_dist.train.config import build_config
    from frugal_dist.train.loop import train

    with one_thread():
        return train(build_config(train_config(1, world, steps, comm, data)))
