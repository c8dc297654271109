"""FSDP2 (``torch.distributed.fsdp.fully_shard``) adapter.

    model = build_model(...)
    shard_model(model)                       # fully_shard per transformer block, then the root
    opt = FRUGAL(build_param_groups(model))  # params are DTensors; FRUGAL binds DTensorLayout
    ...                                      # train as usual; DCP checkpoints reshard

HSDP (replicate across nodes, shard inside one): ``shard_model(model, mesh=default_mesh(replicas=
num_nodes))``; FRUGAL keeps its state sharded over the shard dim and agrees over every rank
(``frugal_dist.layouts.dtensor``).

``shard_model`` finds the transformer blocks of this project's LLaMA (``model.layers``) and of
Hugging Face LLaMA-style models (``model.model.layers``). Mixed precision: bf16 compute with
float32 master weights and float32 gradient reduction (``MixedPrecisionPolicy``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The per-layer modules to shard one by one."""
    for path in ("layers", "model.layers", "transformer.h", "model.decoder.layers"):
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    return []


def shard_model(
    model: nn.Module,
    *,
    mesh: Any = None,
    bf16: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply ``fully_shard`` to every transformer block and to the root (in place; returned)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def default_mesh(replicas: int = 1) -> Any:
    """The device mesh over the whole world: on cuda if available (NCCL), else on cpu (gloo).

    ``replicas=1``: 1-D (FSDP2, every rank holds a row shard). ``replicas=R > 1``: 2-D
    ``(R, world / R)`` with dims ``("replicate", "shard")`` -- HSDP: parameters are sharded over
    the ``world / R`` ranks of one replica (put them on one node) and replicated over the R
    replicas; gradients are reduce-scattered inside a replica and all-reduced across replicas.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"fsdp2_replicas must be a positive integer, got {replicas!r}")
    if world % replicas:
        raise ValueError(
            f"fsdp2_replicas={replicas} must divide the world size {world} (HSDP: replicas x "
            "shards = world); pick a divisor, e.g. the number of nodes"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if replicas == 1:
        return init_device_mesh(device, (world,))
    return init_device_mesh(
        device, (replicas, world // replicas), mesh_dim_names=("replicate", "shard")
    )
