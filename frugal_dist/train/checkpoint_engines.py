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
* deepspeed: ``frugal_dist.engines.deepspeed_checkpoint`` -- full fp32 masters by parameter
  name plus the consolidated FRUGAL state in one file (any world size, any ZeRO stage); RSO
  through DeepSpeed's own ``save_checkpoint`` into ``deepspeed_native/`` (same world size and
  ZeRO stage only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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
    from frugal_dist.optim.frugal import FRUGAL

    return isinstance(optimizer, FRUGAL)


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
        from frugal_dist.engines.deepspeed_checkpoint import save_native

        save_native(tmp, ds_engine, rank, world)
    elif engine == "deepspeed":
        from frugal_dist.engines.deepspeed_checkpoint import save_consolidated

        save_consolidated(tmp / "deepspeed.pt", ds_engine, optimizer, rank)
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
        from frugal_dist.engines.deepspeed_checkpoint import load_native

        load_native(path, ds_engine, optimizer, saved_world, world)
    elif engine == "deepspeed":
        from frugal_dist.engines.deepspeed_checkpoint import load_consolidated

        load_consolidated(path / "deepspeed.pt", ds_engine, optimizer)
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
