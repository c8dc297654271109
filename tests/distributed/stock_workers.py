"""Per-rank functions for ``test_stock_engines``: FRUGAL handed to stock engine entry points
(``deepspeed.initialize`` with a client optimizer, FSDP1 without frugal_dist's adapter)."""

from __future__ import annotations

from typing import Any

import torch

from frugal_dist import FRUGAL, build_param_groups
from tests.distributed import ds_workers as dw
from tests.distributed.fsdp_workers import _local, batches, make_model


def _stock_deepspeed(stage: int, opt_kw: dict) -> tuple[Any, FRUGAL]:
    import deepspeed
    import deepspeed.ops as ops

    ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 2-minute CPU build of an unused op
    torch.manual_seed(0)
    model = dw.Probe()
    frugal = FRUGAL(build_param_groups(model), **opt_kw)
    cfg = dw.ds_config(stage, False, opt_kw)
    del cfg["optimizer"]  # the client optimizer object is passed instead
    engine, *_ = deepspeed.initialize(model=model, optimizer=frugal, config=cfg)
    return engine, frugal


def stock_deepspeed(rank: int, world: int, stage: int, steps: int, opt_kw: dict) -> dict:
    """Stock ``deepspeed.initialize`` with a FRUGAL object: the first step must refuse; the
    fix the error names (``frugal_dist.deepspeed.bind``) must give the single-process result."""
    import frugal_dist.deepspeed as fds

    engine, _ = _stock_deepspeed(stage, opt_kw)
    out: dict[str, Any] = {"error": None}
    try:
        dw._train(engine, 1, rank, False)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        out["error"], out["message"] = type(exc).__name__, str(exc)
    engine, frugal = _stock_deepspeed(stage, opt_kw)
    fds.bind(engine, frugal)
    dw._train(engine, steps, rank, False)
    out["params"] = dw.full_params(engine, stage)
    return out


def _fsdp1(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from frugal_dist.train.model import DecoderLayer

    return FSDP(model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({DecoderLayer}),
                device_id=torch.device("cpu"))  # fmt: skip


def _one_step(model: torch.nn.Module, opt: FRUGAL, rank: int, world: int) -> dict[str, Any]:
    local = _local(batches(1)[0], rank, world)
    _, loss = model(local, labels=local)
    loss.backward()
    try:
        opt.step()
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None}


def fsdp1_without_adapter(rank: int, world: int, opt_kw: dict) -> dict[str, Any]:
    """FSDP1 (use_orig_params) with a plain FRUGAL: built before wrapping (its parameters are
    then flattened under it) and after (it only ever sees 1-D slices). Both must refuse."""
    out = {}
    model = make_model()
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    out["built_before"] = _one_step(_fsdp1(model), opt, rank, world)
    wrapped = _fsdp1(make_model())
    out["built_after"] = _one_step(wrapped, FRUGAL(build_param_groups(wrapped), **opt_kw), rank,
                                   world)  # fmt: skip
    return out
