"""Checks the training loop runs so that a misconfigured multi-rank job fails at once, loudly.

* ``check_run_agreement(cfg, world)`` -- right after the process group exists: the ranks compare
  frugal_dist / torch versions, the whole ``TrainConfig`` except rank-local keys (``output_dir``;
  ``deepspeed_config`` is compared by content, not path), the seed, the optimizer section and the
  world size. A difference raises ``RankMismatchError`` on every rank, e.g.
  ``optimizer.lr: rank 0 has 0.003, rank 1 has 0.002``.
* ``check_model_agreement(model)`` -- after the model is built, before any wrapper: parameter
  names and shapes.

Each is one all-gather of an int64 hash per rank when the ranks agree (see
``frugal_dist.comm.preflight``); nothing runs at world size 1. Collective timeouts are
``frugal_dist.comm.timeouts``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import nn

from frugal_dist.comm.preflight import (
    check_ranks_agree,
    environment_descriptor,
    flatten,
    parameters_descriptor,
)
from frugal_dist.comm.timeouts import set_phase
from frugal_dist.train.config import TrainConfig

RANK_LOCAL_KEYS = ("output_dir",)  # may legitimately differ between ranks


def config_descriptor(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """What must be equal on every rank before training starts (see the module docstring)."""
    raw = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RANK_LOCAL_KEYS}
    if raw.get("deepspeed_config") is not None:
        raw["deepspeed_config"] = _json_file_content(raw["deepspeed_config"])
    return {**environment_descriptor(), **flatten(raw), "world_size": world}


def check_run_agreement(cfg: TrainConfig, world: int) -> None:
    """Raise ``RankMismatchError`` on every rank if the ranks' code, config or seed differ."""
    if world == 1:
        return
    set_phase("the start-up agreement check (versions, config, seed)")
    check_ranks_agree(config_descriptor(cfg, world), None, "the training run")


def check_model_agreement(model: nn.Module) -> None:
    """Raise ``RankMismatchError`` on every rank if parameter names or shapes differ."""
    from frugal_dist.comm.collectives import rank_and_world

    if rank_and_world()[1] == 1:
        return
    set_phase("the start-up agreement check (model parameter names and shapes)")
    from frugal_dist.optim.engine_hooks import logical_shape

    named = model.named_parameters()
    check_ranks_agree(parameters_descriptor(named, shape_of=logical_shape), None, "the model")


def _json_file_content(path: str) -> Any:
    """The parsed JSON of ``path`` (so equal configs at different paths compare equal)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
