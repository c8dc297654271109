"""Per-rank function for ``test_resume_replicated``: a ``shard_state`` optimizer loaded from a
replicated (full) state dict keeps exactly what a natively sharded run keeps, and continues it."""

from __future__ import annotations

from typing import Any

from frugal_dist import FRUGAL
from tests.distributed import workers


def _run(opt: FRUGAL, params: list, start: int, steps: int, world: int) -> None:
    shapes = [tuple(p.shape) for p in params]
    for step in range(start, start + steps):
        for p, g in zip(params, workers.mean_grads(step, world, shapes)):  # DDP-reduced grads
            p.grad = g.clone()
        opt.step()


def _keys(opt: FRUGAL, params: list, names: list[str]) -> dict[str, list[str]]:
    return {n: sorted(opt.state[p]) for n, p in zip(names, params) if p in opt.state}


def prune_after_full_load(rank: int, world: int, kw: dict, cut: int, steps: int) -> dict[str, Any]:
    names = [f"layers.{i}.w" for i in range(len(workers.SHAPES))]
    names += [f"extra.{i}" for i in range(len(workers.ADAMW_SHAPES))]
    split, full = workers.named_params()
    native = FRUGAL(workers.groups(split, full), shard_state=True, **kw)
    _run(native, split + full, 0, cut, world)
    split_r, full_r = workers.named_params()
    replicated = FRUGAL(workers.groups(split_r, full_r), **kw)  # what a 1-process run saves
    _run(replicated, split_r + full_r, 0, cut, world)
    split_c, full_c = workers.named_params()
    resumed = FRUGAL(workers.groups(split_c, full_c), shard_state=True, **kw)
    for p, q in zip(split_c + full_c, split_r + full_r):
        p.data.copy_(q.data)
    resumed.load_state_dict(replicated.state_dict())
    pruned = resumed.release_unowned_state()
    out = {
        "pruned": pruned,
        "keys_native": _keys(native, split + full, names),
        "keys_resumed": _keys(resumed, split_c + full_c, names),
        "bytes": (native.state_bytes(), resumed.state_bytes(), replicated.state_bytes()),
    }
    _run(native, split + full, cut, steps - cut, world)
    _run(resumed, split_c + full_c, cut, steps - cut, world)
    out["diff"] = max((a - b).abs().max().item() for a, b in zip(split + full, split_c + full_c))
    return out
