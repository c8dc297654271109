"""Per-rank functions for the fairscale tests (OSS over DDP, OSS + ShardedDataParallel, and the
FSDP1 checkpoint round trip), compared with ``fsdp_workers.single``."""

from __future__ import annotations

from typing import Any

import torch

from tests.distributed.fsdp_workers import _train, make_model


def oss(rank: int, world: int, steps: int, opt_kw: dict, sdp: bool) -> dict[str, Any]:
    from fairscale.nn.data_parallel import ShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel as DDP

    from frugal_dist.engines.fairscale import build_oss, local_frugal

    model = make_model()
    opt = build_oss(model, **opt_kw)
    wrapped = ShardedDataParallel(model, opt) if sdp else DDP(model)
    # ShardedDataParallel keeps references to the .grad tensors: zero them, do not drop them.
    losses = _train(wrapped, opt, steps, rank, world, set_to_none=not sdp)
    frugal = local_frugal(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in frugal.state.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    local_names = [n for g in frugal.param_groups for n in g["names"]]
    return {"losses": losses, "params": params, "state": state, "local_names": local_names}


def _fsdp1_model():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from frugal_dist.train.model import DecoderLayer

    policy = ModuleWrapPolicy({DecoderLayer})
    return FSDP(make_model(), use_orig_params=True, auto_wrap_policy=policy,
                device_id=torch.device("cpu"))  # fmt: skip


def _fsdp1_params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from frugal_dist.optim.param_groups import clean_name

    with FSDP.summon_full_params(model):
        return {clean_name(n): p.detach().clone() for n, p in model.named_parameters()}


def fsdp1_save(rank: int, world: int, steps: int, opt_kw: dict, path: str) -> None:
    from frugal_dist.engines.fsdp1 import build_frugal, save_checkpoint

    model = _fsdp1_model()
    opt = build_frugal(model, **opt_kw)
    _train(model, opt, steps, rank, world)
    save_checkpoint(path, model, opt)


def fsdp1_resume(rank: int, world: int, start: int, steps: int, opt_kw: dict, path: str):
    from frugal_dist.engines.fsdp1 import build_frugal, load_checkpoint

    model = _fsdp1_model()
    opt = build_frugal(model, **{**opt_kw, "seed": 4321})  # the saved seed wins
    load_checkpoint(path, model, opt)
    losses = _train(model, opt, steps, rank, world, start=start)
    return {"losses": losses, "params": _fsdp1_params(model)}
