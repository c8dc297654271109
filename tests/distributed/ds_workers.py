"""Per-rank functions for the DeepSpeed tests. The probe model's loss is linear in its weights,
sum_i <W_i, C_i>, so each gradient is exactly C_i: dyadic values (multiples of 1/8, |C| < 4) that
survive bf16, averaging over ranks and any reduction order bit for bit. Engine runs can then be
compared with the single-process run exactly, with no feedback of rounding into gradients."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from frugal_dist import FRUGAL, build_param_groups
from tests.distributed.cases import FLAT_LOSS

SHAPES = {"blocks.0": (12, 8), "blocks.1": (8, 12), "blocks.2": (10, 10), "blocks.3": (6, 16),
          "blocks.4": (16, 6)}  # fmt: skip


class Lin(nn.Module):
    def __init__(self, shape) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.weight * c).sum()


class NormLike(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.weight * c).sum()


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Lin(s) for s in SHAPES.values())
        self.norm = NormLike(10)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.round(torch.randn(p.shape, generator=gen) * 8) / 8)

    def forward(self, cs: list[torch.Tensor]) -> torch.Tensor:
        total = self.norm(cs[-1])
        for block, c in zip(self.blocks, cs[:-1]):
            total = total + block(c)
        return total


def coefficients(step: int, rank: int, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    shapes = [*SHAPES.values(), (10,)]
    return [(torch.round(torch.randn(s, generator=gen) * 8).clamp(-31, 31) / 8).to(dtype)
            for s in shapes]  # fmt: skip


def mean_coefficients(step: int, world: int) -> list[torch.Tensor]:
    per = [coefficients(step, r) for r in range(world)]
    return [sum(c[i] for c in per) / world for i in range(len(per[0]))]


def single(steps: int, world: int, opt_kw: dict) -> dict[str, torch.Tensor]:
    model = Probe()
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    for step in range(steps):
        model(mean_coefficients(step, world)).backward()
        opt.step()
        opt.observe_loss(FLAT_LOSS)
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ds_config(stage: int, bf16: bool, opt_kw: dict) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 0.0,  # exact comparison; clipping is DeepSpeed's, not FRUGAL's
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "FRUGAL", "params": opt_kw},
    }


def full_params(engine, stage: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if stage >= 1 else None
        if full is None:
            full = p.detach().float()
        out[n] = (
            full.detach().clone().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        )
    return out


def _train(engine, steps: int, rank: int, bf16: bool, start: int = 0) -> None:
    """``steps`` engine steps on rank ``rank``'s coefficients; after each, the FRUGAL the
    engine steps observes FLAT_LOSS (``refresh_policy="loss"``; the probe's own loss is linear
    in the weights, of either sign)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    for step in range(start, start + steps):
        loss = engine(coefficients(step, rank, dtype))
        engine.backward(loss)
        engine.step()
        _frugal(engine).observe_loss(FLAT_LOSS)


def run(rank: int, world: int, stage: int, bf16: bool, steps: int, kinds: dict, common: dict,
        offload: bool = False):  # fmt: skip
    import frugal_dist.deepspeed as fds

    out = {}
    for name, kw in kinds.items():
        torch.manual_seed(0)
        cfg = ds_config(stage, bf16, {**common, **kw})
        if offload:
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            cfg["zero_force_ds_cpu_optimizer"] = False
        engine, opt, _, _ = fds.initialize(model=Probe(), config=cfg)
        _train(engine, steps, rank, bf16)
        out[name] = {"params": full_params(engine, stage),
                     "state_bytes": _frugal(engine).state_bytes()}  # fmt: skip
    return out


def resume(rank: int, world: int, stage: int, steps: int, cut: int, opt_kw: dict, path: str):
    import frugal_dist.deepspeed as fds

    engine, *_ = fds.initialize(model=Probe(), config=ds_config(stage, False, opt_kw))
    _train(engine, cut, rank, False)
    engine.save_checkpoint(path, tag="cut")
    fresh, *_ = fds.initialize(
        model=Probe(), config=ds_config(stage, False, {**opt_kw, "seed": 99})
    )
    fresh.load_checkpoint(path, tag="cut")
    _train(fresh, steps - cut, rank, False, start=cut)
    return {"params": full_params(fresh, stage), "pid": os.getpid()}


def stage_all(rank: int, world: int, stage: int, steps: int, kinds: dict, common: dict,
              half_kinds: dict, resume_kw: dict, path: str) -> dict[str, Any]:  # fmt: skip
    """Everything ``test_deepspeed`` runs under ZeRO ``stage``, in one launch: ``run`` of every
    kind in float32, ``resume`` (cut at ``steps // 2``) and, at stages 2 and 3, ``run`` of
    ``half_kinds`` in bf16 and with the optimizer offloaded to the CPU."""
    out = {"fp32": run(rank, world, stage, False, steps, kinds, common),
           "resume": resume(rank, world, stage, steps, steps // 2, resume_kw, path)}  # fmt: skip
    if stage >= 2:
        out["bf16"] = run(rank, world, stage, True, steps, half_kinds, common)
        out["offload"] = run(rank, world, stage, False, steps, half_kinds, common, True)
    return out


def bad_config(rank: int, world: int, cfg: dict) -> str:
    import frugal_dist.deepspeed as fds

    try:
        fds.initialize(model=Probe(), config=cfg)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _frugal(engine) -> FRUGAL:
    from frugal_dist.deepspeed import frugal_optimizer

    return frugal_optimizer(engine)


def export_run(rank: int, world: int, stage: int, steps: int, opt_kw: dict, path: str) -> None:
    import frugal_dist.deepspeed as fds
    from frugal_dist.optim.consolidate import export_state

    engine, *_ = fds.initialize(model=Probe(), config=ds_config(stage, False, opt_kw))
    _train(engine, steps, rank, False)
    blob = export_state(_frugal(engine))
    params = full_params(engine, stage)
    if rank == 0:
        torch.save({"optim": blob, "params": params}, path)


def import_run(rank: int, world: int, stage: int, start: int, steps: int, src_world: int,
               opt_kw: dict, path: str) -> dict[str, torch.Tensor]:  # fmt: skip
    """Resume a consolidated checkpoint under ZeRO ``stage`` on ``world`` ranks, feeding the same
    global gradients as the original ``src_world``-rank run."""
    from deepspeed.utils import safe_set_full_fp32_param

    import frugal_dist.deepspeed as fds
    from frugal_dist.optim.consolidate import import_state

    ckpt = torch.load(path, weights_only=False)
    engine, *_ = fds.initialize(
        model=Probe(), config=ds_config(stage, False, {**opt_kw, "seed": 5})
    )
    for n, p in engine.module.named_parameters():
        if stage >= 1:
            safe_set_full_fp32_param(p, ckpt["params"][n])
        else:
            with torch.no_grad():
                p.copy_(ckpt["params"][n])
    import_state(_frugal(engine), ckpt["optim"])
    for step in range(start, start + steps):
        # every rank feeds the global mean of the source run's ranks (identical on all ranks)
        loss = engine(mean_coefficients(step, src_world))
        engine.backward(loss)
        engine.step()
    return full_params(engine, stage)


def import_single(start: int, steps: int, src_world: int, opt_kw: dict, path: str):
    from frugal_dist.optim.consolidate import import_state

    ckpt = torch.load(path, weights_only=False)
    model = Probe()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ckpt["params"][n])
    opt = FRUGAL(build_param_groups(model), **{**opt_kw, "seed": 5})
    import_state(opt, ckpt["optim"])
    for step in range(start, start + steps):
        model(mean_coefficients(step, src_world)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}
