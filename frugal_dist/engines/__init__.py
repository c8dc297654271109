"""Thin engine adapters (no math): they shard the model the engine's way and bind FRUGAL to the
engine's layout. ``fsdp2``: torch FSDP2 (``fully_shard``); ``deepspeed``: ZeRO 0-3 (plus
``deepspeed_checkpoint``); ``fsdp1``; ``fairscale``.

Importing this package (``frugal_dist`` does) registers what ``optim/`` must learn from the
engines through ``frugal_dist.optim.engine_hooks`` -- ``optim/`` itself never reads an engine's
attributes:

* FSDP2: a group holding DTensors gets ``layouts.dtensor.DTensorLayout`` bound at the first step;
* DeepSpeed ``zero.Init``: a parameter's real shape is its ``ds_shape``;
* FSDP1 (``use_orig_params=False``): its ``FlatParameter`` packs several parameters; its
  wrapper's ``_fsdp_wrapped_module.`` name component (also fairscale FSDP's) is not part of a
  parameter's name;
* DeepSpeed ZeRO-3: the partition of a gathered tensor is its ``ds_tensor`` (rank r holds flat
  elements [r * part, min((r + 1) * part, ds_numel))), for the RSO layers' lazy merge.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from frugal_dist.optim import engine_hooks


def _holds_dtensors(group: dict[str, Any]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in group["params"])


def _dtensor_layout(optimizer: Any) -> Any:
    from frugal_dist.layouts.dtensor import DTensorLayout

    return DTensorLayout(optimizer)


def _ds_shape(p: Tensor) -> tuple[int, ...] | None:
    shape = getattr(p, "ds_shape", None)
    return tuple(shape) if shape is not None else None


def _is_fsdp1_flat(p: Tensor) -> bool:
    return bool(getattr(p, "_is_flat_param", False))


def _ds_partition(t: Tensor) -> tuple[Tensor, int, int] | None:
    part = getattr(t, "ds_tensor", None)
    if part is None:
        return None
    import torch.distributed as dist

    rank = dist.get_rank(group=getattr(t, "ds_process_group", None))
    start = rank * part.numel()
    return part, start, max(0, min(part.numel(), t.ds_numel - start))


engine_hooks.register_auto_layout(_holds_dtensors, _dtensor_layout)
engine_hooks.register_shape_resolver(_ds_shape)
engine_hooks.register_local_partition(_ds_partition)
engine_hooks.register_flat_detector(_is_fsdp1_flat)
engine_hooks.register_name_prefix("_fsdp_wrapped_module.")
