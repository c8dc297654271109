"""Per-rank functions for the FSDP2 tests (torchao's template: sharded model vs single-device
baseline on the same global batch, loss every step, full parameters and state at the end)."""

from __future__ import annotations

import os
from typing import Any

import torch

from frugal_dist import FRUGAL, build_param_groups
from frugal_dist.train.model import build_model

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
SEQ = 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # float64: the sharded gradient average and the single-process mean then agree to ~1e-16,
    # far below the float32 resolution of the optimizer math, so no signSGD sign flips.
    return build_model("tiny", max_seq_len=SEQ).double()


def batches(steps: int, start: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    all_b = [
        torch.randint(0, 257, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(start + steps)
    ]
    return all_b[start:]


def _local(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return batch[rank * per : (rank + 1) * per]


def _train(model, opt, steps, rank, world, start=0, set_to_none=True, device=None) -> list[float]:
    """Train on this rank's slice of the fixed global batches; the rank-mean loss per step,
    which ``refresh_policy="loss"`` observes after each step, as the train loop does (the same
    on every rank; the full-batch loss in the single process)."""
    import torch.distributed as dist

    losses = []
    for batch in batches(steps, start):
        local = _local(batch, rank, world).to(device or "cpu")
        _, loss = model(local, labels=local)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
            t /= world
        losses.append(t.item())
        opt.observe_loss(losses[-1])  # FRUGAL, or fairscale's OSS (build_oss forwards it)
    return losses


def _full_state(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        out[names[id(p)]] = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in st.items()
        }
    return out


def _full_params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def single(steps: int, opt_kw: dict) -> dict[str, Any]:
    model = make_model()
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    losses = _train(model, opt, steps, 0, 1)
    return {"losses": losses, "params": _full_params(model), "state": _full_state(model, opt)}


def fsdp2(rank: int, world: int, steps: int, opt_kw: dict) -> dict[str, Any]:
    from frugal_dist.engines.fsdp2 import default_mesh, shard_model

    model = shard_model(make_model(), mesh=default_mesh())
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    losses = _train(model, opt, steps, rank, world)
    return {"losses": losses, "params": _full_params(model), "state": _full_state(model, opt)}


def dcp_save(rank: int, world: int, steps: int, opt_kw: dict, path: str) -> None:
    from frugal_dist.engines import fsdp2_checkpoint
    from frugal_dist.engines.fsdp2 import default_mesh, shard_model

    model = shard_model(make_model(), mesh=default_mesh())
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    _train(model, opt, steps, rank, world)
    fsdp2_checkpoint.save(path, model, opt)


def dcp_resume(rank: int, world: int, start: int, steps: int, opt_kw: dict, path: str):
    from frugal_dist.engines import fsdp2_checkpoint
    from frugal_dist.engines.fsdp2 import default_mesh, shard_model

    model = shard_model(make_model(), mesh=default_mesh())
    opt = FRUGAL(build_param_groups(model), **{**opt_kw, "seed": 12345})  # the saved seed wins
    fsdp2_checkpoint.load(path, model, opt)
    losses = _train(model, opt, steps, rank, world, start=start)
    return {"losses": losses, "params": _full_params(model), "pid": os.getpid()}


def fsdp1(rank: int, world: int, steps: int, opt_kw: dict) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from frugal_dist.engines.fsdp1 import build_frugal
    from frugal_dist.train.model import DecoderLayer

    policy = ModuleWrapPolicy({DecoderLayer})
    model = FSDP(make_model(), use_orig_params=True, auto_wrap_policy=policy,
                 device_id=torch.device("cpu"))  # fmt: skip
    opt = build_frugal(model, **opt_kw)
    losses = _train(model, opt, steps, rank, world)
    with FSDP.summon_full_params(model):
        params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                  for n, p in model.named_parameters()}  # fmt: skip
    return {"losses": losses, "params": params}


def fsdp2_svd_calls(rank: int, world: int) -> int:
    """SVDs computed on this rank during 2 refreshes of every split matrix under FSDP2."""
    from frugal_dist.engines.fsdp2 import default_mesh, shard_model
    from tests.distributed.cases import count_svd_refreshes

    with count_svd_refreshes() as counter:
        model = shard_model(make_model(), mesh=default_mesh())
        opt = FRUGAL(build_param_groups(model), subspace="projection", proj_type="svd",
                     update_gap=2, lr=1e-3)  # fmt: skip
        _train(model, opt, 4, rank, world)
    return counter[0]
