"""Per-rank functions for the RSO engine tests: a tiny LLaMA with RSO layers trained on fixed
token batches under DDP, FSDP2 and DeepSpeed ZeRO 0-3, compared with one process that accumulates
every rank's batch with weight 1/world (the engines' gradient mean, bit for bit at world size 2).

Compared quantity: every layer's effective weight ``W + B P_k^T`` (independent of whether an
engine merged eagerly in ``step()`` or lazily at the next forward) and every other parameter."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from frugal_dist.optim.rso import build_rso
from frugal_dist.optim.rso_layers import apply_rso, rso_layers
from frugal_dist.train.model import build_model

SEQ, BATCH = 16, 2
LAYER_KW = {"density": 0.25, "seed": 3}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", max_seq_len=SEQ, n_layers=1)


def tokens(step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 257, (BATCH, SEQ), generator=gen)


@torch.no_grad()
def effective(model: nn.Module, gathered: Any = None) -> dict[str, torch.Tensor]:
    """Full effective weights; ``gathered`` is a context that materialises ZeRO-3 parameters."""

    def full(t: torch.Tensor) -> torch.Tensor:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        return t.detach().clone().float()

    with gathered if gathered is not None else nullcontext():
        out: dict[str, torch.Tensor] = {}
        layers = rso_layers(model)
        skip = set()
        for name, layer in layers.items():
            w, b = full(layer.weight), full(layer.B)
            out[name + ".W_eff"] = w + b @ layer.projection(torch.float32).t()
            out[name + ".outer_plus_pending"] = torch.tensor(
                float(max(layer.outer, layer.target_outer))
            )
            skip |= {id(layer.weight), id(layer.B)}
        for n, p in model.named_parameters():
            if id(p) not in skip:
                out[n] = full(p)
    return out


def single(world: int, steps: int, opt_kw: dict) -> dict[str, torch.Tensor]:
    model = make_model()
    apply_rso(model, **LAYER_KW)
    opt = build_rso(model, **opt_kw)
    for step in range(steps):
        for r in range(world):  # g_0/W + g_1/W: bit for bit the engines' (g_0 + g_1)/W (W = 2)
            batch = tokens(step, r)
            (model(batch, labels=batch)[1] / world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return effective(model)


def ddp_and_fsdp2(rank: int, world: int, steps: int, opt_kw: dict) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from frugal_dist.engines.fsdp2 import default_mesh, shard_model

    out = {}
    for engine in ("ddp", "fsdp2"):
        model = make_model()
        apply_rso(model, **LAYER_KW)
        if engine == "fsdp2":
            shard_model(model, mesh=default_mesh())
            wrapped = model
        else:
            wrapped = DDP(model)
        opt = build_rso(model, **opt_kw)
        for step in range(steps):
            batch = tokens(step, rank)
            wrapped(batch, labels=batch)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[engine] = effective(model)
        out[engine + "_grad_numel"] = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel()
            for p in model.parameters()
            if p.requires_grad
        )
    return out


def ds_config(stage: int, opt_kw: dict) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "optimizer": {"type": "RSO", "params": {**LAYER_KW, **opt_kw}},
        "steps_per_print": 10**9,
    }


def _gathered(engine, stage: int):
    if stage < 3:
        return None
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _train(engine, start: int, stop: int, rank: int) -> None:
    for step in range(start, stop):
        batch = tokens(step, rank)
        _, loss = engine(batch, labels=batch)
        engine.backward(loss)
        engine.step()


def zero_stages(rank: int, world: int, stages: list[int], steps: int, opt_kw: dict,
                resume: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Train under each ZeRO stage; with ``resume`` = {"stage", "cut", "path"} also save a rigid
    checkpoint at step ``cut`` and continue from it in a fresh engine built with another seed."""
    import frugal_dist.deepspeed as fds

    out: dict[str, Any] = {}
    for stage in stages:
        engine, *_ = fds.initialize(model=make_model(), config=ds_config(stage, opt_kw))
        _train(engine, 0, steps, rank)
        out[f"zero{stage}"] = effective(engine.module, _gathered(engine, stage))
    if resume is not None:
        stage, cut = resume["stage"], resume["cut"]
        engine, *_ = fds.initialize(model=make_model(), config=ds_config(stage, opt_kw))
        _train(engine, 0, cut, rank)
        engine.save_checkpoint(resume["path"], tag="cut")
        cfg = ds_config(stage, opt_kw)
        cfg["optimizer"]["params"]["lr"] = 0.5 * opt_kw["lr"]  # restored from the checkpoint
        torch.manual_seed(7)
        fresh, *_ = fds.initialize(model=build_model("tiny", max_seq_len=SEQ, n_layers=1),
                                   config=cfg)  # fmt: skip
        fresh.load_checkpoint(resume["path"], tag="cut")
        _train(fresh, cut, steps, rank)
        out[f"zero{stage}_resumed"] = effective(fresh.module, _gathered(fresh, stage))
    return out


def all_engines(rank: int, world: int, steps: int, opt_kw: dict, resume: dict) -> dict[str, Any]:
    """DDP, FSDP2, ZeRO 0-3 and a ZeRO-3 resume in one job (one process start-up)."""
    out = ddp_and_fsdp2(rank, world, steps, opt_kw)
    out.update(zero_stages(rank, world, [0, 1, 2, 3], steps, opt_kw, resume))
    return out
