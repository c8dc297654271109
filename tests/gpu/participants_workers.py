"""Per-rank function for ``test_participants_nccl``: rank 0 alone builds and steps FRUGAL on its
GPU while an NCCL default group of 2 exists (rank 1 joins no collective)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist


def entry(rank: int, world: int, port: int, sleep_s: float, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    result: dict[str, Any] = {}
    if rank == 0:
        result = rank0_only()
    else:
        time.sleep(sleep_s)
    torch.save(result, f"{out}.{rank}")
    sys.stdout.flush()
    os._exit(0)  # a timed-out NCCL collective is still pending: no teardown


def _train(**kw: Any) -> None:
    from frugal_dist import FRUGAL, build_param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).cuda()
    opt = FRUGAL(build_param_groups(model), lr=1e-2, density=0.5, subspace="coordinate", **kw)
    for _ in range(3):
        model(torch.ones(3, 8, device="cuda")).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _attempt(**kw: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        _train(**kw)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        return {"error": type(exc).__name__, "message": str(exc), "s": time.perf_counter() - t0}
    return {"error": None, "s": time.perf_counter() - t0}


def rank0_only() -> dict[str, Any]:
    return {
        "local": _attempt(check_agreement=False),  # no collective at all
        "agreement": _attempt(check_agreement=True),  # bounded, then ParticipantsError
    }
