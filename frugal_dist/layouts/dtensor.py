"""FSDP2 layout: parameters are DTensors sharded by rows (``Shard(0)`` on a 1-D mesh).

A rank holds whole rows [r0, r1) of every parameter (uneven and empty shards included), so block,
coordinate-``columns`` and right-projection math is local; a left projection's (r, n) product is
summed over the mesh. State is stored so ``torch.distributed.checkpoint`` can save and reshard it:

* counters (``step``, ``sf_step``): plain scalar tensors (identical on every rank);
* row-aligned state (AdamW / block moments, ``columns`` moments (m, k), right-projection moments
  (m, r)): DTensors ``Shard(0)`` with the parameter's global row count, so their row shards
  follow the parameter's;
* left-projection moments (r, n) and svd bases: identical on every rank -> DTensors
  ``Replicate()``.

Coordinate ``rows`` / ``randk`` compact state is not row-aligned and is refused with a clear error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from frugal_dist.core.fragments import RowSpan
from frugal_dist.core.subspaces import matrix_shape
from frugal_dist.layouts.base import ParamView

COUNTERS = ("step", "sf_step")


def chunk_rows(d0: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of ``rank``'s ``Shard(0)`` chunk of ``d0`` rows: torch.chunk
    semantics, chunks of ceil(d0 / world), trailing ranks possibly empty."""
    chunk = -(-d0 // world)
    first = min(rank * chunk, d0)
    return first, min(first + chunk, d0) - first


def local_start(p: DTensor) -> int:
    """Flat offset of ``p``'s local shard in the full tensor (torch.chunk semantics of
    ``Shard(0)``: chunks of ceil(d0 / world) along dim 0, trailing ranks possibly empty)."""
    placements = p.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(
            f"FRUGAL supports FSDP2 parameters sharded as (Shard(0),) on a 1-D mesh, got "
            f"{placements}; use fully_shard's default sharding"
        )
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    d0 = p.shape[0]
    first, _ = chunk_rows(d0, world, rank)
    return first * (p.numel() // max(d0, 1))


class DTensorState(MutableMapping):
    """A parameter's state dict holding DTensors, seen as local tensors by the optimizer.

    ``role(key)`` is the optimizer's ``state_role`` of each key: ``replicated`` tensors become
    ``Replicate()`` DTensors, the others (``param``, ``coordinate`` columns, ``right``: one row
    per parameter row) ``Shard(0)`` like the parameter; counters stay plain tensors."""

    def __init__(
        self, parent: MutableMapping[str, Any], p: DTensor, role: Callable[[str], str]
    ) -> None:
        self.parent, self.p, self.role = parent, p, role

    def replicated(self, key: str) -> bool:
        """State ``key`` is the same on every rank (stored as a ``Replicate()`` DTensor)."""
        return self.role(key) == "replicated"

    def __getitem__(self, key: str) -> Tensor:
        v = self.parent[key]
        return v.to_local() if isinstance(v, DTensor) else v

    def __setitem__(self, key: str, local: Tensor) -> None:
        if key in COUNTERS or local.ndim == 0:
            self.parent[key] = local
            return
        mesh = self.p.device_mesh
        if self.replicated(key):
            self.parent[key] = DTensor.from_local(local, mesh, [Replicate()], run_check=False)
            return
        m = self.p.shape[0]
        shape = (m, *local.shape[1:])
        stride = tuple(int(torch.Size(shape[i + 1 :]).numel()) for i in range(len(shape)))
        self.parent[key] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )

    def __delitem__(self, key: str) -> None:
        del self.parent[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.parent))

    def __len__(self) -> int:
        return len(self.parent)


class DTensorLayout:
    """Views of FSDP2's DTensor parameters (see module doc)."""

    name = "fsdp2"

    def __init__(self, optimizer: Any) -> None:
        first = next(p for g in optimizer.param_groups for p in g["params"])
        self.process_group = first.device_mesh.get_group()
        for group in optimizer.param_groups:
            coordinate = group["algorithm"] == "frugal" and group["subspace"] == "coordinate"
            if coordinate and group["coord_choice"] != "columns":
                raise ValueError(
                    f"coord_choice={group['coord_choice']!r} is not supported with FSDP2: "
                    "its compact state is not aligned with the parameter's row shards, so "
                    "checkpoints could not be resharded. Use coord_choice='columns'."
                )

    def split_rows(self, name: str) -> list[int]:
        return []  # FSDP2 shards whole rows

    def views(self, optimizer: Any, group: dict[str, Any]) -> list[ParamView]:
        out = []
        for idx, (p, name) in enumerate(zip(group["params"], group["names"])):
            local = p.to_local()
            m, n = matrix_shape(p.shape)
            span = RowSpan(m, n, local_start(p), local.numel())
            grad = None if p.grad is None else p.grad.to_local()
            view = ParamView(name, idx, tuple(p.shape), span, local, grad, {})
            view.state = DTensorState(
                optimizer.state[p], p, functools.partial(optimizer.state_role, group, view)
            )
            out.append(view)
        return out
