"""Per-rank functions for the DeepSpeed fp16 GPU test (NCCL, one GPU per rank).

DeepSpeed refuses fp16 on the CPU, so its dynamic loss scaler only runs here. Two checks:

* ``probe``: the linear probe of ``tests.distributed.ds_workers`` (gradients are dyadic
  coefficients, exact in fp16 at any power-of-two scale that does not overflow). DeepSpeed starts
  at scale 2**16, so the first steps overflow for real; one step gets an extra inf on rank 0. Each
  overflow must halve the scale and skip the iteration before FRUGAL runs (``hysteresis`` 1), and
  the fp32 master weights must equal a single-process FRUGAL run over the surviving steps.
* ``llama``: a small LLaMA trained in fp16 for a few dozen steps: the loss falls and stays finite.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from frugal_dist import FRUGAL

FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1,
        "loss_scale_window": 1000, "min_loss_scale": 1}  # fmt: skip


def _frugal(engine: Any) -> FRUGAL:
    opt = engine.optimizer
    return opt if isinstance(opt, FRUGAL) else opt.optimizer


def _step_counter(frugal: FRUGAL) -> int:
    counters = [  # "step", or "<name>::step" under a flat (ZeRO) layout
        v for s in frugal.state.values() for k, v in s.items() if k.split("::")[-1] == "step"
    ]
    return int(counters[0].item()) if counters else 0


def probe(rank: int, world: int, stage: int, steps: int, poison: int, opt_kw: dict) -> dict:
    import frugal_dist.deepspeed as fds
    from tests.distributed import ds_workers

    cfg = ds_workers.ds_config(stage, False, opt_kw)
    cfg["fp16"] = dict(FP16)
    torch.manual_seed(0)
    engine, *_ = fds.initialize(model=ds_workers.Probe(), config=cfg)
    frugal = _frugal(engine)
    device = next(engine.module.parameters()).device
    scales, counters = [], []
    for step in range(steps):
        cs = [c.to(device) for c in ds_workers.coefficients(step, rank, torch.float16)]
        if step == poison and rank == 0:
            cs[0][0, 0] = float("inf")
        engine.backward(engine(cs))
        engine.step()
        scales.append(float(engine.optimizer.loss_scale))
        counters.append(_step_counter(frugal))
    params = {n: p.cpu() for n, p in ds_workers.full_params(engine, stage).items()}
    return {"scales": scales, "counters": counters, "skipped": frugal.skipped_steps(),
            "params": params}  # fmt: skip


def probe_reference(steps_taken: list[int], world: int, opt_kw: dict) -> dict:
    """Single process, float32, mean coefficients, only the steps DeepSpeed did not skip."""
    from frugal_dist import build_param_groups
    from tests.distributed import ds_workers

    torch.manual_seed(0)
    model = ds_workers.Probe()
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    for step in steps_taken:
        model(ds_workers.mean_coefficients(step, world)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def llama(rank: int, world: int, stage: int, steps: int, opt_kw: dict) -> dict:
    import frugal_dist.deepspeed as fds
    from frugal_dist.train.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", max_seq_len=64)
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "fp16": dict(FP16), "optimizer": {"type": "FRUGAL", "params": opt_kw}}  # fmt: skip
    engine, *_ = fds.initialize(model=model, config=cfg)
    device = next(engine.module.parameters()).device
    # A learnable stream: each sequence counts up from a random start (mod the vocabulary).
    gen = torch.Generator().manual_seed(1000 + rank)
    losses, scales = [], []
    for _ in range(steps):
        start = torch.randint(0, 257, (8, 1), generator=gen)
        ids = ((start + torch.arange(64)) % 257).to(device)
        _, loss = engine(ids, labels=ids)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        scales.append(float(engine.optimizer.loss_scale))
    return {"losses": losses, "scales": scales, "frugal_steps": _step_counter(_frugal(engine))}


def entry(rank: int, world: int, port: int, fn_name: str, args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        result = globals()[fn_name](rank, world, *args)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
