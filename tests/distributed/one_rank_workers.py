"""Per-rank functions for ``test_one_rank``: an optimizer built and stepped on rank 0 only while a
default process group of 2 ranks exists (rank 1 never joins any collective)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from frugal_dist import FRUGAL, build_param_groups

OPTIONS = dict(lr=1e-2, density=0.5, update_gap=2, subspace="coordinate", coord_choice="columns")
STEPS = 4
NAN_STEP = 2  # this step's gradient holds a nan: skipped locally


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))


def train(opt_kw: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """STEPS steps of FRUGAL on the small model (fixed inputs); (parameters, skipped steps)."""
    m = model()
    opt = FRUGAL(build_param_groups(m), **opt_kw)
    for step in range(STEPS):
        x = torch.linspace(-1, 1, 24).reshape(3, 8) * (step + 1)
        m(x).pow(2).sum().backward()
        if step == NAN_STEP:
            m[0].weight.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in m.named_parameters()}, opt.skipped_steps()


def _attempt(fn) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects type and message
        return {"error": type(exc).__name__, "message": str(exc), "s": time.perf_counter() - t0}
    return {"error": None, "s": time.perf_counter() - t0}


def rank0_only(rank: int, world: int, rank1_sleep_s: float) -> dict[str, Any]:
    if rank != 0:
        time.sleep(rank1_sleep_s)  # alive, in no collective
        return {}
    out: dict[str, Any] = {}
    # 1. replicated, fixed seed, no agreement check: no collective at all
    t0 = time.perf_counter()
    out["local_params"], out["local_skipped"] = train({**OPTIONS, "check_agreement": False})
    out["local_s"] = time.perf_counter() - t0
    # 2. the default agreement check at the first step: bounded, then ParticipantsError
    out["agreement"] = _attempt(lambda: train({**OPTIONS, "check_agreement": True}))
    # 3. seed=None agrees on rank 0's seed over the group: bounded too
    out["seed_none"] = _attempt(lambda: train({**OPTIONS, "seed": None, "check_agreement": False}))
    return out
