"""Per-rank function for the fairscale FSDP GPU test (NCCL, one GPU per rank)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from tests.distributed.fsdp_workers import _train, make_model


def single(steps: int, opt_kw: dict) -> dict[str, Any]:
    from frugal_dist import FRUGAL, build_param_groups

    device = torch.device("cuda", 0)
    model = make_model().float().to(device)  # fairscale FSDP accepts float32 params only
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    losses = _train(model, opt, steps, 0, 1, device=device)
    return {"losses": losses, "params": {n: p.detach().cpu() for n, p in model.named_parameters()}}


def entry(rank: int, world: int, port: int, steps: int, opt_kw: dict, out: str) -> None:
    from fairscale.nn.data_parallel import FullyShardedDataParallel as FairFSDP

    from frugal_dist.engines.fairscale import build_fsdp_frugal
    from frugal_dist.optim.param_groups import clean_name
    from frugal_dist.train.model import DecoderLayer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        model = make_model().float().to(device)  # fairscale FSDP accepts float32 params only
        for i, layer in enumerate(model.layers):  # one FSDP unit per decoder block, then the root
            assert isinstance(layer, DecoderLayer)
            model.layers[i] = FairFSDP(layer, flatten_parameters=False)
        model = FairFSDP(model, flatten_parameters=False)
        opt = build_fsdp_frugal(model, **opt_kw)
        losses = _train(model, opt, steps, rank, world, device=device)
        with model.summon_full_params():
            params = {clean_name(n): p.detach().cpu().clone() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"losses": losses, "params": params}, out)
    finally:
        dist.destroy_process_group()


def probe_single(steps: int, world: int, opt_kw: dict) -> dict[str, torch.Tensor]:
    """The exact-gradient probe (``tests.distributed.ds_workers``) on one GPU, rank-mean
    coefficients: the reference for ``probe_entry``."""
    from frugal_dist import FRUGAL, build_param_groups
    from tests.distributed import ds_workers as dw

    device = torch.device("cuda", 0)
    model = dw.Probe().to(device)
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    for step in range(steps):
        model([c.to(device) for c in dw.mean_coefficients(step, world)]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().cpu() for n, p in model.named_parameters()}


def probe_entry(rank: int, world: int, port: int, steps: int, opt_kw: dict, out: str) -> None:
    """The probe under fairscale FSDP (one unit per matrix, then the root). Its loss is linear in
    the weights, so each rank's gradient is its dyadic coefficients whatever the weights are, and
    the reduce-scattered mean is exact in float32: no rounding feeds back into the trajectory."""
    from fairscale.nn.data_parallel import FullyShardedDataParallel as FairFSDP

    from frugal_dist.engines.fairscale import build_fsdp_frugal
    from frugal_dist.optim.param_groups import clean_name
    from tests.distributed import ds_workers as dw

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        model = dw.Probe().to(device)
        for i, block in enumerate(model.blocks):
            model.blocks[i] = FairFSDP(block, flatten_parameters=False)
        model = FairFSDP(model, flatten_parameters=False)
        opt = build_fsdp_frugal(model, **opt_kw)
        for step in range(steps):
            model([c.to(device) for c in dw.coefficients(step, rank)]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with model.summon_full_params():
            params = {clean_name(n): p.detach().cpu().clone() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"params": params}, out)
    finally:
        dist.destroy_process_group()
