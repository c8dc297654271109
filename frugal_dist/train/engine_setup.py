"""Model wrapping + optimizer for the training loop's ``fsdp1`` and ``fairscale`` engines.

* ``fsdp1``: ``FullyShardedDataParallel(use_orig_params=True)`` per transformer block; FRUGAL
  bound to the flat slices (``frugal_dist.engines.fsdp1``); clipping by FSDP's own
  ``clip_grad_norm_`` (the norm of the whole, sharded gradient).
* ``fairscale``: ``OSS`` around FRUGAL (each rank keeps the state of its own whole parameters)
  and ``ShardedDataParallel`` (gradients reduced onto their owner); clipping by
  ``OSS.clip_grad_norm``; ``zero_grad(set_to_none=False)`` (SDP keeps its gradient tensors).

Both take the FRUGAL presets of ``frugal_dist.train.optimizers`` (``frugal``, ``galore``,
``badam``); other optimizers run under ddp / fsdp2 / deepspeed.

``deepspeed``: ``deepspeed_engine`` builds the engine from ``deepspeed_config`` by one precedence
rule -- the experiment config (YAML files and ``--key`` flags) wins over the DeepSpeed JSON for
every setting both express: the FRUGAL/RSO ``params`` (against ``optimizer.*``), the micro-batch
(``batch_size``), ``gradient_accumulation_steps`` (``grad_accum``), ``gradient_clipping``
(``grad_clip``) and bf16 (``dtype``). The JSON keeps everything else (ZeRO stage, offload,
buckets, ...). Rank 0 logs one notice naming each JSON value that was replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from frugal_dist.optim import FRUGAL, clipping
from frugal_dist.train.logs import logger
from frugal_dist.train.optimizers import PRESETS

if TYPE_CHECKING:
    from frugal_dist.train.config import TrainConfig

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


def clip_gradients(engine: str, wrapped: nn.Module, optimizer: Any, max_norm: float) -> Tensor:
    """Clip by the global gradient norm; returns that total norm (before clipping) as a plain
    0-d tensor, the same on every rank: FSDP1's ``clip_grad_norm_`` and ``OSS.clip_grad_norm``
    all-reduce it themselves; ``single`` / ``ddp`` (reduced, replicated gradients) and
    ``fsdp2`` use torch's ``get_total_norm`` + ``clip_grads_with_norm_``, and FSDP2's DTensor
    norm (partial over the shards) is made whole with ``full_tensor()`` (one 4 B all-reduce,
    which torch's ``clip_grad_norm_`` would spend on the clip coefficient anyway).
    DeepSpeed clips inside its engine and is not handled here.

    FRUGAL on ``single`` / ``ddp`` (whole replicated gradients, no ``reduce_gradients`` at world
    size > 1, every parameter with a gradient in the optimizer): ``FRUGAL.clip_grad_norm_``,
    the same norm and the same step, without torch's multiply of every gradient (the step
    applies the coefficient where a scale-dependent rule reads it, ``optim.clipping``)."""
    if engine in ("single", "ddp") and _fused_clip(wrapped, optimizer):
        # the norm in the model's parameter order, as torch's clip sums it (bit for bit)
        grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        return optimizer.clip_grad_norm_(max_norm, total_norm=total)
    if engine == "fsdp1":
        return wrapped.clip_grad_norm_(max_norm)
    if engine == "fairscale":
        return optimizer.clip_grad_norm(max_norm)
    params = [p for p in wrapped.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP2): the partial norm made whole
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _fused_clip(wrapped: nn.Module, optimizer: Any) -> bool:
    """``FRUGAL.clip_grad_norm_`` gives torch's clip of ``wrapped``'s gradients: a FRUGAL it
    accepts (``optim.clipping.applies``) holding every parameter that has a gradient."""
    if not isinstance(optimizer, FRUGAL) or not clipping.applies(optimizer):
        return False
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return all(id(p) in held for p in wrapped.parameters() if p.grad is not None)


def step_grad_norm(optimizer: Any, norm: Tensor | None, world: int) -> dict[str, Any]:
    """The keyword arguments of ``optimizer.step`` that hand it the clip's ``norm``:
    ``{"grad_norm": norm}`` for FRUGAL (also inside fairscale's ``OSS``, whose ``step`` passes
    keywords through), which then takes its inf/nan verdict from the norm instead of reading
    every gradient; ``{}`` for optimizers without that keyword (AdamW, RSO: no inf/nan check),
    without clipping, and for FRUGAL reducing the gradients itself at world size > 1 (the clip
    then saw each rank's unreduced gradients: a local norm, not the global one FRUGAL needs)."""
    inner = getattr(optimizer, "optim", optimizer)  # fairscale OSS: the local optimizer
    if norm is None or not isinstance(inner, FRUGAL) or inner.clip_pending:
        return {}  # (clip_grad_norm_ recorded the norm for the step itself)
    if inner.reduce_gradients and world > 1:
        return {}
    return {"grad_norm": norm}


def experiment_over_json(ds_cfg: dict[str, Any], cfg: TrainConfig, name: str,
                         opt_cfg: dict[str, Any]) -> list[str]:  # fmt: skip
    """Apply the experiment config's values to the DeepSpeed config ``ds_cfg`` in place (see the
    module docstring); returns ``"key: json -> experiment (field)"`` for each replaced value."""
    replaced: list[str] = []

    def put(where: dict[str, Any], key: str, value: Any, label: str, field: str) -> None:
        if key in where and where[key] != value:
            replaced.append(f"{label} {where[key]!r} -> {value!r} ({field})")
        where[key] = value

    put(ds_cfg, "train_micro_batch_size_per_gpu", cfg.batch_size,
        "train_micro_batch_size_per_gpu", "batch_size")  # fmt: skip
    put(ds_cfg, "gradient_accumulation_steps", cfg.grad_accum, "gradient_accumulation_steps",
        "grad_accum")  # fmt: skip
    ds_cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    put(ds_cfg, "gradient_clipping", cfg.grad_clip, "gradient_clipping", "grad_clip")
    if cfg.dtype != "bfloat16" and ds_cfg.get("bf16", {}).get("enabled", False):
        put(ds_cfg["bf16"], "enabled", False, "bf16.enabled", f"dtype={cfg.dtype}")
    section = ds_cfg.setdefault("optimizer", {"type": name.upper(), "params": {}})
    if name == "rso" and str(section.get("type", "")).lower() != "rso":  # RSO: own section
        section = ds_cfg["optimizer"] = {"type": "RSO", "params": {}}
    if str(section.get("type", "")).lower() == name:
        params = section.setdefault("params", {})
        for key, value in opt_cfg.items():
            json_value = params.get(key)
            if isinstance(json_value, list) and isinstance(value, tuple):
                json_value = tuple(json_value)
            if key in params and json_value != value:
                replaced.append(f"optimizer.params.{key} {params[key]!r} -> {value!r} "
                                f"(optimizer.{key})")  # fmt: skip
            params[key] = value
    return replaced


def deepspeed_engine(model: nn.Module, cfg: TrainConfig, name: str, opt_cfg: dict[str, Any]):
    """``(engine, FRUGAL or RSO)`` from ``cfg.deepspeed_config`` (precedence: module docstring)."""
    from frugal_dist.engines.deepspeed import frugal_optimizer, initialize, read_config

    if name not in ("frugal", "rso"):
        raise ValueError(
            "engine=deepspeed runs FRUGAL or RSO from the DeepSpeed config; optimizer.name "
            f"must be 'frugal' or 'rso', got {name!r}"
        )
    if cfg.deepspeed_config is None:
        raise ValueError("engine=deepspeed needs --deepspeed_config=ds_configs/zero2.json")
    ds_cfg = read_config(cfg.deepspeed_config, "deepspeed_config")
    replaced = experiment_over_json(ds_cfg, cfg, name, opt_cfg)
    if replaced:
        logger.info(f"{cfg.deepspeed_config}: the experiment config wins over these DeepSpeed "
                    f"JSON values: {'; '.join(replaced)}")  # fmt: skip
    engine, _, _, _ = initialize(model=model, config=ds_cfg)
    return engine, frugal_optimizer(engine)
