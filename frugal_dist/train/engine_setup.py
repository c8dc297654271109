"""Model wrapping + optimizer for the training loop's ``fsdp1`` and ``fairscale`` engines.

* ``fsdp1``: ``FullyShardedDataParallel(use_orig_params=True)`` per transformer block; FRUGAL
  bound to the flat slices (``frugal_dist.engines.fsdp1``); clipping by FSDP's own
  ``clip_grad_norm_`` (the norm of the whole, sharded gradient).
* ``fairscale``: ``OSS`` around FRUGAL (each rank keeps the state of its own whole parameters)
  and ``ShardedDataParallel`` (gradients reduced onto their owner); clipping by
  ``OSS.clip_grad_norm``; ``zero_grad(set_to_none=False)`` (SDP keeps its gradient tensors).

Both take the FRUGAL presets of ``frugal_dist.train.optimizers`` (``frugal``, ``galore``,
``badam``); other optimizers run under ddp / fsdp2 / deepspeed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from frugal_dist.train.optimizers import PRESETS

SHARDED_ENGINES = ("fsdp1", "fairscale")


def wrap_and_build(
    engine: str, model: nn.Module, name: str, options: dict[str, Any]
) -> tuple[nn.Module, Any]:
    """``(wrapped model, optimizer)`` for ``engine`` in ``SHARDED_ENGINES``."""
    if name not in ("frugal", "galore", "badam"):
        raise ValueError(
            f"engine={engine} supports optimizer.name in ['frugal', 'galore', 'badam'], got "
            f"{name!r}; use engine=ddp, fsdp2 or deepspeed for the others"
        )
    opts = {**PRESETS.get(name, {}), **options}
    if not dist.is_initialized():  # one process without torchrun: a process group of one
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if engine == "fsdp1":
        from frugal_dist.engines.fsdp1 import build_frugal, wrap_model

        wrapped = wrap_model(model)
        return wrapped, build_frugal(wrapped, **opts)
    if engine == "fairscale":
        from fairscale.nn.data_parallel import ShardedDataParallel

        from frugal_dist.engines.fairscale import build_oss

        optimizer = build_oss(model, **opts)
        return ShardedDataParallel(model, optimizer), optimizer
    raise ValueError(f"engine must be one of {list(SHARDED_ENGINES)}, got {engine!r}")


def clip_gradients(engine: str, wrapped: nn.Module, optimizer: Any, max_norm: float) -> None:
    """Clip by the global gradient norm, which no single rank can compute alone here."""
    if engine == "fsdp1":
        wrapped.clip_grad_norm_(max_norm)
    elif engine == "fairscale":
        optimizer.clip_grad_norm(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)
