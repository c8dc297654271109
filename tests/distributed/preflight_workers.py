"""Rank workers for the start-up agreement and collective-timeout tests (see launch.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import frugal_dist
from frugal_dist import FRUGAL
from frugal_dist.comm.preflight import check_optimizer_agreement
from frugal_dist.comm.timeouts import CollectiveError, explain_timeouts
from frugal_dist.train import loop
from frugal_dist.train.config import build_config
from frugal_dist.train.model import LLAMA_CONFIGS

BASE = {"model": "tiny", "seq_len": 32, "batch_size": 2, "max_steps": 1, "warmup_steps": 0,
        "eval_every": 0, "log_every": 1, "checkpoint_every": 0,
        "data": {"max_bytes": 20_000}}  # fmt: skip


def _outcome(fn) -> dict[str, Any]:
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "result": out}


def _train(overrides: dict[str, Any]) -> dict[str, Any]:
    raw = {**BASE, **overrides}
    raw["data"] = {**BASE["data"], **overrides.get("data", {})}
    summary = loop.train(build_config(raw))
    return {"steps": summary["steps"], "last_loss": summary["last_loss"]}


def _on_rank1(rank: int, overrides: dict[str, Any]) -> dict[str, Any]:
    return overrides if rank == 1 else {}


def _frugal(rank: int, density: float, shape: tuple[int, int]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen))
    b = torch.nn.Parameter(torch.randn(shape[0], generator=gen))
    opt = FRUGAL(
        [{"params": [w], "names": ["layer.w"]},
         {"params": [b], "names": ["layer.b"], "algorithm": "adamw"}],
        lr=1e-3, density=density,
    )  # fmt: skip
    check_optimizer_agreement(opt)
    return {"groups": len(opt.param_groups)}


def desync_scenarios(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Each scenario makes rank 1 differ in one way; all of them run in one process group
    (every failing check fails on all ranks, so the ranks stay in step)."""
    out: dict[str, dict[str, Any]] = {}
    out["identical"] = _outcome(lambda: _train({}))
    out["lr"] = _outcome(lambda: _train({"optimizer": {"lr": 0.002 if rank == 1 else 0.003}}))
    out["seed"] = _outcome(lambda: _train({"seed": rank}))
    out["timeout_knob"] = _outcome(lambda: _train(_on_rank1(rank, {"collective_timeout_s": 60})))

    real_version = frugal_dist.__version__
    if rank == 1:
        frugal_dist.__version__ = "0.2.0.dev0"
    try:
        out["version"] = _outcome(lambda: _train({}))
    finally:
        frugal_dist.__version__ = real_version

    real_tiny = LLAMA_CONFIGS["tiny"]
    if rank == 1:  # same config name and parameter names, wider MLP on rank 1 only
        LLAMA_CONFIGS["tiny"] = dataclasses.replace(real_tiny, intermediate_size=176)
    try:
        out["model_shape"] = _outcome(lambda: _train({}))
    finally:
        LLAMA_CONFIGS["tiny"] = real_tiny

    out["frugal_same"] = _outcome(lambda: _frugal(rank, 0.25, (8, 6)))
    out["frugal_density"] = _outcome(lambda: _frugal(rank, 0.5 if rank == 1 else 0.25, (8, 6)))
    out["frugal_shape"] = _outcome(lambda: _frugal(rank, 0.25, (8, 6 + rank)))
    return out


# --------------------------------------------------------------------------- timeouts
def timeout_entry(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    """Process entry (not launch.py's: the process group must get ``collective_timeout_s``)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    result = SCENARIOS[scenario](rank)
    torch.save(result, f"{out}.{rank}")
    with contextlib.suppress(Exception):  # a broken group may refuse; the result is saved
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stalled_all_reduce(rank: int, timeout_s: float = 5.0, stall_s: float = 9.0) -> dict:
    loop.init_distributed(collective_timeout_s=timeout_s)
    if rank == 1:
        time.sleep(stall_s)
    t0 = time.perf_counter()
    try:
        with explain_timeouts(timeout_s, "the test's all_reduce"):
            dist.all_reduce(torch.ones(4))
        error, message = None, ""
    except CollectiveError as exc:
        error, message = type(exc).__name__, str(exc)
    return {"error": error, "message": message, "elapsed": time.perf_counter() - t0}


def _stalled_training_step(rank: int, timeout_s: float = 5.0, stall_s: float = 9.0) -> dict:
    """``train()`` where rank 1 stalls before step 2 (inside the lr schedule)."""
    real_lr_factor = loop.lr_factor
    marks: dict[str, float] = {}

    def slow_lr_factor(step: int, *args: Any) -> float:
        if step == 1:
            marks.setdefault("step2", time.perf_counter())
            if rank == 1:
                time.sleep(stall_s)
        return real_lr_factor(step, *args)

    loop.lr_factor = slow_lr_factor
    try:
        cfg = build_config({**BASE, "max_steps": 3, "collective_timeout_s": timeout_s})
        outcome = _outcome(lambda: loop.train(cfg) and None)
    finally:
        loop.lr_factor = real_lr_factor
    outcome["elapsed"] = time.perf_counter() - marks.get("step2", time.perf_counter())
    return outcome


SCENARIOS = {"all_reduce": _stalled_all_reduce, "training_step": _stalled_training_step}
