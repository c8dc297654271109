"""FSDP1 adapter (``FullyShardedDataParallel(..., use_orig_params=True)``).

FSDP1 flattens each wrapped module's parameters into one ``FlatParameter`` and shards it into equal
1-D pieces; with ``use_orig_params=True`` the optimizer sees every original parameter as the 1-D
slice of it that lives in this rank's piece (possibly empty). ``FlatParameter._shard_param_infos``
gives, per original parameter, where that slice starts in the parameter's flattening
(``intra_param_start_idx``) and how long it is (``numel_in_shard``) -- a fragment, like a ZeRO
partition, so FRUGAL runs on it through ``FlatLayout``.

    model = FSDP(model, use_orig_params=True, auto_wrap_policy=...)
    opt = build_frugal(model, lr=..., density=...)     # groups by the parameters' real shapes

FSDP1's optimizer-state-dict APIs reject state not shaped like the parameter, so checkpoints go
through ``frugal_dist.optim.consolidate`` (state keyed by parameter name, full tensors):
``save_checkpoint(path, model, opt)`` writes the full model state dict and the consolidated
FRUGAL state in one file (rank 0 writes; every rank takes part in the gathers);
``load_checkpoint(path, model, opt)`` reads it on every rank (a path all ranks can read) and
gives each rank its slices, so a run saved on W ranks resumes on any world size (FSDP1 or not).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from frugal_dist.layouts.flat import FlatEntry, PerParameterFlatLayout
from frugal_dist.optim import FRUGAL, build_param_groups, pop_group_options


def _shard_infos(model: nn.Module) -> dict[int, tuple[tuple[int, ...], int, int]]:
    """id(original param) -> (full shape, start in the param's flattening, numel on this rank)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[int, tuple[tuple[int, ...], int, int]] = {}
    for module in FSDP.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        params = getattr(flat, "_params", None)
        if params is None:
            raise ValueError("FRUGAL needs FSDP1 with use_orig_params=True")
        for p, shape, info in zip(params, flat._shapes, flat._shard_param_infos):
            if info.in_shard:
                out[id(p)] = (
                    tuple(shape),
                    int(info.intra_param_start_idx),
                    int(info.numel_in_shard),
                )
            else:
                out[id(p)] = (tuple(shape), 0, 0)
    return out


def wrap_model(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """``FullyShardedDataParallel(use_orig_params=True)`` with one FSDP unit per transformer block
    (found as in ``frugal_dist.engines.fsdp2.transformer_blocks``) and the root. The device is the
    model's (CPU with gloo, the current GPU with NCCL)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from frugal_dist.engines.fsdp2 import transformer_blocks

    blocks = transformer_blocks(model)
    kwargs: dict[str, Any] = {"use_orig_params": True, **fsdp_kwargs}
    if blocks:
        kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy({type(b) for b in blocks}))
    kwargs.setdefault("device_id", next(model.parameters()).device)
    if not kwargs["use_orig_params"]:
        raise ValueError("FRUGAL needs FSDP1 with use_orig_params=True")
    return FSDP(model, **kwargs)


def build_frugal(model: nn.Module, **options: Any) -> FRUGAL:
    """FRUGAL for an FSDP1 model (``use_orig_params=True``), bound to its fragments."""
    infos = _shard_infos(model)
    for p in model.parameters():
        if id(p) in infos:
            p._frugal_shape = infos[id(p)][0]  # the real shape, for param-group rules
    frugal = FRUGAL(build_param_groups(model, **pop_group_options(options)), **options)
    entries = []
    for group in frugal.param_groups:
        for idx, (p, name) in enumerate(zip(group["params"], group["names"])):
            shape, start, numel = infos[id(p)]
            entries.append(FlatEntry(name, shape, idx, p, 0, start, numel))
    frugal.bind_layout(PerParameterFlatLayout(entries))
    return frugal


def save_checkpoint(path: str, model: nn.Module, optimizer: FRUGAL) -> None:
    """Model (full state dict) + consolidated FRUGAL state into ``path``. Collective."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from frugal_dist.optim.consolidate import export_state

    # offload_to_cpu on parameters that already live on the CPU crashes (SIGSEGV, torch 2.13)
    on_gpu = any(p.is_cuda for p in model.parameters())
    cfg = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
        model_state = model.state_dict()
    blob = {"model": model_state, "optimizer": export_state(optimizer)}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(blob, path)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer: FRUGAL) -> None:
    """Inverse of ``save_checkpoint`` at any world size; the saved seed and options win."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from frugal_dist.optim.consolidate import import_state

    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
        model.load_state_dict(blob["model"])
    import_state(optimizer, blob["optimizer"])
