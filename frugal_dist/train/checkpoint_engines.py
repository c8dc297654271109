"""Per-engine model + optimizer state for ``frugal_dist.train.checkpoint`` (file layout there).

* single / ddp: parameters and (by default) optimizer state are replicated: rank 0 saves
  ``model.state_dict()`` and ``optimizer.state_dict()``; FRUGAL with ``shard_state`` keeps
  different state on each rank, saved per rank. Both engines load either at any world size: at
  the saving world size each rank loads its own file; otherwise the per-rank files are merged
  (``merge_rank_states``: step counters and svd bases are equal on every rank, each state-full
  buffer exists on its owner only) and a sharded optimizer then drops what it does not own at
  the new world size (``FRUGAL.release_unowned_state``).
* fsdp2: DCP through ``frugal_dist.engines.fsdp2_checkpoint`` (FRUGAL) or plain
  ``get_state_dict`` / ``dcp`` (other optimizers); reshards on load.
* fsdp1: ``frugal_dist.engines.fsdp1.save_checkpoint`` (full model state dict + consolidated
  FRUGAL state in one file; any world size).
* deepspeed: the fp32 master weights live in the ZeRO optimizer's flat partitions (or the module
  itself at ZeRO-0). Each rank contributes its fragments (``FlatEntry``: flat holder, offset,
  logical start, numel), gathered into full tensors keyed by parameter name, with the FRUGAL
  state from ``consolidate.export_state``. On load each rank copies its new fragments back into
  the masters, DeepSpeed copies masters to the module's (bf16 / fp32) weights, and
  ``import_state`` gives the optimizer its slices: any world size, any ZeRO stage.
  RSO under DeepSpeed uses DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` into
  ``deepspeed_native/`` (module state with the frozen W and each layer's ``rso_outer`` buffer,
  ZeRO partitions of the masters and the RSO state): it resumes at the same world size and ZeRO
  stage only (``ValueError`` otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_frugal(optimizer: Any) -> bool:
    return hasattr(optimizer, "_views")


def _is_rso(optimizer: Any) -> bool:
    from frugal_dist.optim.rso import RSO

    return isinstance(optimizer, RSO)


SUPPORTED = ("single", "ddp", "fsdp2", "deepspeed", "fsdp1")


def save_engine_state(
    tmp: Path, engine: str, model: Any, optimizer: Any, ds_engine: Any, rank: int, world: int
) -> None:
    """Write this rank's part of the model / optimizer state into ``tmp`` (collective).
    ``model`` is the FSDP1 wrapper for fsdp1 (the bare module for the others)."""
    if engine == "fsdp1":
        from frugal_dist.engines.fsdp1 import save_checkpoint

        save_checkpoint(str(tmp / "fsdp1.pt"), model, optimizer)
    elif engine in ("single", "ddp"):
        sharded = getattr(optimizer, "shard_state", False) and world > 1
        if rank == 0:
            torch.save(model.state_dict(), tmp / "model.pt")
            if not sharded:
                torch.save(optimizer.state_dict(), tmp / "optim.pt")
        if sharded:
            torch.save(optimizer.state_dict(), tmp / f"optim_rank{rank}.pt")
    elif engine == "fsdp2":
        if _is_frugal(optimizer):
            from frugal_dist.engines.fsdp2_checkpoint import save as dcp_save

            dcp_save(str(tmp / "dcp"), model, optimizer)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    elif engine == "deepspeed" and _is_rso(optimizer):
        _ds_native_save(tmp, ds_engine, rank, world)
    elif engine == "deepspeed":
        from frugal_dist.optim.consolidate import export_state

        params = _ds_export_params(ds_engine, optimizer)
        opt_state = export_state(optimizer)
        if rank == 0:
            torch.save({"params": params, "optim": opt_state}, tmp / "deepspeed.pt")
    else:
        raise ValueError(f"checkpoints for engine {engine!r} are not supported")


def load_engine_state(
    path: Path,
    engine: str,
    model: Any,
    optimizer: Any,
    ds_engine: Any,
    saved_world: int,
    rank: int,
    world: int,
) -> None:
    """Load what ``save_engine_state`` wrote, on every rank (collective: fsdp*, deepspeed)."""
    if engine == "fsdp1":
        from frugal_dist.engines.fsdp1 import load_checkpoint

        load_checkpoint(str(path / "fsdp1.pt"), model, optimizer)
    elif engine in ("single", "ddp"):
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu"))
        per_rank = path / f"optim_rank{rank}.pt"
        sharded_now = getattr(optimizer, "shard_state", False) and world > 1
        own = sharded_now and saved_world == world and per_rank.is_file()
        if (path / "optim.pt").is_file():
            state = torch.load(path / "optim.pt", map_location="cpu")
        elif own:  # the same shards at the same world size: each rank its own file
            state = torch.load(per_rank, map_location="cpu")
        else:
            files = [path / f"optim_rank{r}.pt" for r in range(saved_world)]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"checkpoint {path} lacks optimizer files {missing}")
            state = merge_rank_states([torch.load(f, map_location="cpu") for f in files])
        optimizer.load_state_dict(state)
        if not own and hasattr(optimizer, "release_unowned_state"):
            optimizer.release_unowned_state()  # shard_state now: keep only what this rank owns
    elif engine == "fsdp2":
        if _is_frugal(optimizer):
            from frugal_dist.engines.fsdp2_checkpoint import load as dcp_load

            dcp_load(str(path / "dcp"), model, optimizer)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])  # fmt: skip
    elif engine == "deepspeed" and _is_rso(optimizer):
        _ds_native_load(path, ds_engine, optimizer, saved_world, world)
    elif engine == "deepspeed":
        from frugal_dist.optim.consolidate import import_state

        blob = torch.load(path / "deepspeed.pt", map_location="cpu", weights_only=False)
        _ds_import_params(ds_engine, optimizer, blob["params"])
        import_state(optimizer, blob["optim"])
    else:
        raise ValueError(f"checkpoints for engine {engine!r} are not supported")


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer ``state_dict`` from the per-rank ones of a ``shard_state`` run: per
    parameter, the union of the ranks' entries (counters and svd bases are equal on every rank;
    a state-full buffer exists only on its owner). Raises ``ValueError`` if two ranks hold
    different values under one key (not a ``shard_state`` checkpoint)."""
    merged: dict[Any, dict[str, Any]] = {}
    for r, sd in enumerate(states):
        for pid, st in sd["state"].items():
            into = merged.setdefault(pid, {})
            for key, value in st.items():
                if key not in into:
                    into[key] = value
                elif isinstance(value, torch.Tensor) and not torch.equal(into[key], value):
                    raise ValueError(
                        f"optimizer files disagree on {key!r} of parameter {pid} (rank {r}): they "
                        "are not the per-rank shards of one shard_state run"
                    )
    return {"state": merged, "param_groups": states[0]["param_groups"]}


# ----------------------------------------------------------------------------- deepspeed
def _entries(frugal: Any) -> list[Any] | None:
    layout = getattr(frugal, "_layout", None)
    return getattr(layout, "entries", None)


def _ds_export_params(ds_engine: Any, frugal: Any) -> dict[str, torch.Tensor]:
    """Full fp32 master weights by parameter name (collective)."""
    entries = _entries(frugal)
    if entries is None:  # ZeRO-0, fp32: the module's own parameters are the masters
        return {n: p.detach().float().cpu().clone() for n, p in ds_engine.module.named_parameters()}
    mine = [(e.name, tuple(e.shape), e.start,
             e.holder.detach()[e.offset : e.offset + e.numel].float().cpu().clone())
            for e in entries if e.numel > 0]  # fmt: skip
    group = getattr(frugal._layout, "process_group", None)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
        pieces = [p for rank_pieces in gathered for p in rank_pieces]
    else:
        pieces = mine
    flat: dict[str, torch.Tensor] = {}
    shapes = {e.name: tuple(e.shape) for e in entries}
    for name, shape, start, t in pieces:
        buf = flat.setdefault(name, torch.zeros(int(torch.Size(shape).numel())))
        buf[start : start + t.numel()] = t
    return {name: flat[name].reshape(shapes[name]) for name in flat}


@torch.no_grad()
def _ds_import_params(ds_engine: Any, frugal: Any, full: dict[str, torch.Tensor]) -> None:
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


# ----------------------------------------------------------------------------- deepspeed, RSO
DS_NATIVE, DS_TAG = "deepspeed_native", "state"


def _ds_native_save(tmp: Path, ds_engine: Any, rank: int, world: int) -> None:
    """RSO: DeepSpeed's own checkpoint of ``ds_engine`` into ``tmp/deepspeed_native/state``
    (collective; each rank writes its ZeRO partition) plus ``deepspeed_native/meta.json``."""
    ds_engine.save_checkpoint(str(tmp / DS_NATIVE), tag=DS_TAG, save_latest=False)
    if rank == 0:
        meta = {"world_size": world, "zero_stage": int(ds_engine.zero_optimization_stage())}
        (tmp / DS_NATIVE / "meta.json").write_text(json.dumps(meta))


def _ds_native_load(path: Path, ds_engine: Any, rso: Any, saved_world: int, world: int) -> None:
    """Load ``_ds_native_save``'s checkpoint: module state (W, B, ``rso_outer``), masters and RSO
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
