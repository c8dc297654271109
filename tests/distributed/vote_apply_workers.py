"""Per-rank function for ``test_vote_apply_dist``: the same steps with the sign vote applied
from the packed bits (``kernels.vote_apply``, today's default) and through the float32 vote
and ``apply_one`` (``sign_reduce.applies_packed`` forced off: the path before it), for inactive
blocks, signSGD groups and rho = 0 coordinates / projections, with weight decay and lr scales,
in sign and hierarchical mode."""

from __future__ import annotations

from typing import Any
from unittest import mock

import torch

from frugal_dist import FRUGAL
from frugal_dist.optim import fast_apply, sign_reduce
from tests.distributed import workers

BASE = dict(lr=1e-2, update_gap=2, seed=5, weight_decay=0.1)
CASES = {
    "block": dict(subspace="block", density=0.4, proj_params_lr_scale=0.75, inactive_lr_scale=0.5),
    "block_rho0": dict(subspace="block", density=0.0, proj_params_lr_scale=0.3),
    "signsgd": dict(algorithm="signsgd"),
    "columns_rho0": dict(
        subspace="coordinate", coord_choice="columns", density=0.0, proj_params_lr_scale=0.6
    ),
    "projection_rho0": dict(
        subspace="projection", proj_type="random", density=0.0, proj_params_lr_scale=0.6
    ),
}
MODES = {
    "sign": dict(residual_comm="sign"),
    "hier": dict(residual_comm="hierarchical", node_groups=2),
}


def _run(rank: int, steps: int, kw: dict[str, Any]) -> tuple[list[list[torch.Tensor]], int]:
    """(params after every step, number of ``vote_apply_`` calls)."""
    calls = 0
    real = fast_apply.vote_apply_

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    split, full = workers.named_params()
    params = split + full
    shapes = [tuple(p.shape) for p in params]
    opt = FRUGAL(workers.groups(split, full), reduce_gradients=True, **kw)
    traj = []
    with mock.patch.object(fast_apply, "vote_apply_", counting):
        for s in range(steps):
            for p, g in zip(params, workers.rank_grads(s, rank, shapes)):
                p.grad = g
            opt.step()
            traj.append([p.detach().clone() for p in params])
    return traj, calls


def run_paths(rank: int, world: int, steps: int, kernels: str = "auto") -> dict[Any, Any]:
    """{(case, mode, path): (trajectory, vote_apply_ calls)}, path "packed" or "float";
    ``kernels`` the optimizer option ("triton": the Triton kernels, on the CPU under
    ``TRITON_INTERPRET=1``)."""
    out: dict[Any, Any] = {}
    for case, ckw in CASES.items():
        for mode, mkw in MODES.items():
            kw = {**BASE, **ckw, **mkw, "kernels": kernels}
            out[case, mode, "packed"] = _run(rank, steps, kw)
            with mock.patch.object(sign_reduce, "applies_packed", lambda it: False):
                out[case, mode, "float"] = _run(rank, steps, kw)
    return out
