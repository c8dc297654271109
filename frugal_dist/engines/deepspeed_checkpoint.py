"""DeepSpeed checkpoints of FRUGAL and RSO runs (every function is collective: all ranks call it).

FRUGAL (``save_consolidated`` / ``load_consolidated``): the fp32 master weights live in the ZeRO
optimizer's flat partitions (or the module itself at ZeRO-0). Each rank contributes its fragments
(``FlatEntry`` of the bound layout: flat holder, offset, logical start, numel), gathered into full
tensors keyed by parameter name, stored with the FRUGAL state from ``consolidate.export_state``.
On load each rank copies its new fragments back into the masters, DeepSpeed's masters are copied
to the module's (bf16 / fp32) weights, and ``import_state`` gives the optimizer its slices: any
world size, any ZeRO stage.

RSO (``save_native`` / ``load_native``): DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint``
into ``deepspeed_native/`` (module state with the frozen W and each layer's ``rso_outer`` buffer,
ZeRO partitions of the masters and the RSO state): it resumes at the same world size and ZeRO
stage only (``ValueError`` otherwise).

Communication: one ``all_gather_object`` of this rank's master fragments (4 B x its share of
the parameters, pickled) and the one of ``export_state`` (its state pieces).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from frugal_dist.comm.collectives import all_gather_objects


def save_consolidated(file: Path, ds_engine: Any, frugal: Any, rank: int) -> None:
    """Full fp32 masters + consolidated FRUGAL state into ``file`` (written by rank 0)."""
    from frugal_dist.optim.consolidate import export_state

    params = export_params(ds_engine, frugal)
    opt_state = export_state(frugal)
    if rank == 0:
        torch.save({"params": params, "optim": opt_state}, file)


def load_consolidated(file: Path, ds_engine: Any, frugal: Any) -> None:
    """Inverse of ``save_consolidated`` at any world size and ZeRO stage."""
    from frugal_dist.optim.consolidate import import_state

    blob = torch.load(file, map_location="cpu", weights_only=False)
    import_params(ds_engine, frugal, blob["params"])
    import_state(frugal, blob["optim"])


def _entries(frugal: Any) -> list[Any] | None:
    return getattr(frugal.layout, "entries", None)


def export_params(ds_engine: Any, frugal: Any) -> dict[str, torch.Tensor]:
    """Full fp32 master weights by parameter name."""
    entries = _entries(frugal)
    if entries is None:  # ZeRO-0, fp32: the module's own parameters are the masters
        return {n: p.detach().float().cpu().clone() for n, p in ds_engine.module.named_parameters()}
    mine = [(e.name, tuple(e.shape), e.start,
             e.holder.detach()[e.offset : e.offset + e.numel].float().cpu().clone())
            for e in entries if e.numel > 0]  # fmt: skip
    pieces = [p for rank_pieces in all_gather_objects(mine, frugal.process_group)
              for p in rank_pieces]  # fmt: skip
    flat: dict[str, torch.Tensor] = {}
    shapes = {e.name: tuple(e.shape) for e in entries}
    for name, shape, start, t in pieces:
        buf = flat.setdefault(name, torch.zeros(int(torch.Size(shape).numel())))
        buf[start : start + t.numel()] = t
    return {name: flat[name].reshape(shapes[name]) for name in flat}


@torch.no_grad()
def import_params(ds_engine: Any, frugal: Any, full: dict[str, torch.Tensor]) -> None:
    """Copy full master weights into this rank's fragments, then masters -> module weights."""
    entries = _entries(frugal)
    if entries is None:
        for n, p in ds_engine.module.named_parameters():
            p.copy_(full[n].to(p.dtype))
        return
    missing = sorted({e.name for e in entries} - set(full))
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:5]}: it is of another model")
    for e in entries:
        if e.numel > 0:
            src = full[e.name].reshape(-1)[e.start : e.start + e.numel]
            e.holder[e.offset : e.offset + e.numel].copy_(src.to(e.holder.dtype))
    opt = ds_engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: module weights are partitions
        for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
            if lp is not None:
                lp.copy_(hp)
    else:  # ZeRO-1/2 and BF16_Optimizer: copy partition, all-gather the module's flat weights
        opt.update_lp_params()


DS_NATIVE, DS_TAG = "deepspeed_native", "state"


def save_native(tmp: Path, ds_engine: Any, rank: int, world: int) -> None:
    """RSO: DeepSpeed's own checkpoint of ``ds_engine`` into ``tmp/deepspeed_native/state``
    (each rank writes its ZeRO partition) plus ``deepspeed_native/meta.json``."""
    ds_engine.save_checkpoint(str(tmp / DS_NATIVE), tag=DS_TAG, save_latest=False)
    if rank == 0:
        meta = {"world_size": world, "zero_stage": int(ds_engine.zero_optimization_stage())}
        (tmp / DS_NATIVE / "meta.json").write_text(json.dumps(meta))


def load_native(path: Path, ds_engine: Any, rso: Any, saved_world: int, world: int) -> None:
    """Load ``save_native``'s checkpoint: module state (W, B, ``rso_outer``), masters and RSO
    state; then tell the layers the optimizer's outer iteration (a pending lazy merge runs at the
    next forward). Same world size and ZeRO stage only."""
    meta = json.loads((path / DS_NATIVE / "meta.json").read_text())
    if saved_world != world:
        raise ValueError(
            f"checkpoint {path} holds RSO state in DeepSpeed's own format, partitioned over "
            f"{saved_world} ranks: resume it with {saved_world} ranks (torchrun --nproc_per_node "
            f"{saved_world}), not {world}"
        )
    stage = int(ds_engine.zero_optimization_stage())
    if meta["zero_stage"] != stage:
        raise ValueError(
            f"checkpoint {path} was written under ZeRO stage {meta['zero_stage']}, this run uses "
            f"stage {stage}: resume it with a DeepSpeed config of zero_optimization.stage="
            f"{meta['zero_stage']}"
        )
    loaded, _ = ds_engine.load_checkpoint(str(path / DS_NATIVE), tag=DS_TAG)
    if loaded is None:
        raise ValueError(f"DeepSpeed found no checkpoint in {path / DS_NATIVE} (tag {DS_TAG!r})")
    rso.sync_layers()
