"""FSDP2 / HSDP layout: parameters are DTensors sharded by rows over one mesh dim.

A parameter's placements must be exactly one ``Shard(0)`` (the shard dim) and ``Replicate()`` on
every other mesh dim: ``(Shard(0),)`` for FSDP2 on a 1-D mesh, ``(Replicate(), Shard(0))`` for
HSDP (``fully_shard(model, mesh=init_device_mesh(dev, (replicas, shards)))``). Anything else --
a tensor-parallel dim (``Shard(1)``, ``Shard(0)`` twice, ``_StridedShard``) or ``Partial`` -- is
refused with an error naming the parameter and its placements (``row_sharding``).

A rank holds whole rows [r0, r1) of every parameter (torch.chunk over the shard dim: chunks of
ceil(m / shards), uneven and empty shards included), so block, coordinate-``columns`` and
right-projection math is local; a left projection's (r, n) product is summed over the shard dim.
Gradients arrive averaged over every mesh dim, so the ranks of one shard coordinate in different
replicas hold identical fragments and compute identical updates without communicating.

Process groups the optimizer uses:

* ``process_group`` -- the shard dim (``mesh.get_group(shard_dim)``): fragment reductions
  (partial projections, the svd gradient gather onto its owner) and the inf/nan flag;
* ``agreement_group`` -- every rank of the mesh (all dims): seed agreement, the option and
  subspace-fingerprint checks, and the svd basis broadcast (an owner's basis reaches every
  replica). On a 1-D mesh both are the mesh's group. A multi-dim mesh must span the whole job
  (its agreement group is then the default group; a sub-world group could not be created
  without every process of the job taking part).

State is stored so ``torch.distributed.checkpoint`` can save and reshard it:

* counters (``step``, ``sf_step``): plain scalar tensors (identical on every rank);
* row-aligned state (AdamW / block moments, ``columns`` moments (m, k), right-projection moments
  (m, r)): DTensors placed like the parameter (``Shard(0)`` on the shard dim, ``Replicate()``
  elsewhere) with the parameter's global row count, so their row shards follow the parameter's;
* left-projection moments (r, n) and svd bases: identical on every rank -> all ``Replicate()``.

Coordinate ``rows`` / ``randk`` compact state is not row-aligned and is refused with a clear error
when the layout is bound (``reshards_state_by_rows``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
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


@dataclass(frozen=True)
class RowSharding:
    """How a DTensor is laid out: ``Shard(0)`` on mesh dim ``shard_dim``, ``Replicate()`` on
    every other dim of ``mesh``."""

    mesh: Any  # DeviceMesh
    shard_dim: int

    @property
    def shards(self) -> int:
        """Ranks the rows are split over (size of the shard dim)."""
        return self.mesh.size(self.shard_dim)

    @property
    def shard_rank(self) -> int:
        """This rank's coordinate on the shard dim."""
        return self.mesh.get_local_rank(self.shard_dim)

    def rows(self, d0: int) -> tuple[int, int]:
        """(first row, row count) this rank holds of a tensor with ``d0`` rows."""
        return chunk_rows(d0, self.shards, self.shard_rank)

    def placements(self, replicated: bool) -> list[Any]:
        """Placements of a state tensor: all ``Replicate()``, or sharded like the parameter."""
        out: list[Any] = [Replicate()] * self.mesh.ndim
        if not replicated:
            out[self.shard_dim] = Shard(0)
        return out

    def local_shape(self, global_shape: tuple[int, ...], replicated: bool) -> tuple[int, ...]:
        """This rank's local shape of a state tensor of ``global_shape``."""
        if replicated or not global_shape:
            return tuple(global_shape)
        return (self.rows(global_shape[0])[1], *global_shape[1:])


def row_sharding(p: DTensor, name: str = "<unnamed>") -> RowSharding:
    """``p``'s row sharding; ValueError (naming ``name`` and the placements) unless ``p`` is
    ``Shard(0)`` on exactly one mesh dim and ``Replicate()`` on all others."""
    if not isinstance(p, DTensor):
        raise ValueError(
            f"parameter {name!r} is a plain tensor while others are FSDP2 DTensors: apply "
            "fully_shard to the root module too (shard_model does), so every parameter is sharded"
        )
    placements = tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if type(pl) is Shard and pl.dim == 0]
    others = [pl for i, pl in enumerate(placements) if i not in shard_dims]
    if len(shard_dims) != 1 or not all(type(pl) is Replicate for pl in others):
        dims = p.device_mesh.mesh_dim_names or tuple(range(p.device_mesh.ndim))
        raise ValueError(
            f"FRUGAL supports FSDP2 / HSDP parameters sharded by rows on one mesh dim "
            f"(Shard(0) there, Replicate() on every other dim: fully_shard's default, on a 1-D "
            f"or a (replicate, shard) mesh), but parameter {name!r} has placements {placements} "
            f"on mesh dims {dims}. Tensor parallelism (Shard on another dim or tensor dim, "
            "Partial) is not supported: the optimizer would reduce over the wrong ranks. Shard "
            "this model with fully_shard only (frugal_dist.engines.fsdp2.shard_model)."
        )
    return RowSharding(p.device_mesh, shard_dims[0])


def _agreement_group(mesh: Any, shard_group: Any) -> Any:
    """Every rank of ``mesh`` as one process group (see the module doc)."""
    if mesh.ndim == 1:
        return shard_group
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"FRUGAL under HSDP needs the device mesh to span every process of the job (mesh "
            f"{tuple(mesh.shape)} has {mesh.size()} ranks, the job {dist.get_world_size()}): "
            "build it with frugal_dist.engines.fsdp2.default_mesh(replicas=...)"
        )
    return None  # the default group


class DTensorState(MutableMapping):
    """A parameter's state dict holding DTensors, seen as local tensors by the optimizer.

    ``role(key)`` is the optimizer's ``state_role`` of each key: ``replicated`` tensors are
    identical on every rank (all ``Replicate()``), the others (``param``, ``coordinate`` columns,
    ``right``: one row per parameter row) are sharded over the shard dim like the parameter and
    replicated over every other mesh dim; counters stay plain tensors."""

    def __init__(
        self,
        parent: MutableMapping[str, Any],
        p: DTensor,
        sharding: RowSharding,
        role: Callable[[str], str],
    ) -> None:
        self.parent, self.p, self.sharding, self.role = parent, p, sharding, role

    def is_replicated(self, key: str) -> bool:
        """State ``key`` is identical on every rank (stored all ``Replicate()``)."""
        return self.role(key) == "replicated"

    def local_shape(self, key: str, global_shape: tuple[int, ...]) -> tuple[int, ...]:
        """This rank's local shape of state ``key`` whose global shape is ``global_shape``."""
        return self.sharding.local_shape(global_shape, self.is_replicated(key))

    def __getitem__(self, key: str) -> Tensor:
        v = self.parent[key]
        return v.to_local() if isinstance(v, DTensor) else v

    def __setitem__(self, key: str, local: Tensor) -> None:
        if key in COUNTERS or local.ndim == 0:
            self.parent[key] = local
            return
        mesh, replicated = self.sharding.mesh, self.is_replicated(key)
        placements = self.sharding.placements(replicated)
        if replicated:
            self.parent[key] = DTensor.from_local(local, mesh, placements, run_check=False)
            return
        m = self.p.shape[0]
        shape = (m, *local.shape[1:])
        stride = tuple(int(torch.Size(shape[i + 1 :]).numel()) for i in range(len(shape)))
        self.parent[key] = DTensor.from_local(
            local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
        )

    def __delitem__(self, key: str) -> None:
        del self.parent[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.parent))

    def __len__(self) -> int:
        return len(self.parent)


class DTensorLayout:
    """Views of FSDP2 / HSDP DTensor parameters (see module doc)."""

    name = "fsdp2"
    # checkpoints reshard the state by rows: state that is not row-aligned (coordinate rows /
    # randk) is refused when the layout is bound (``group_setup.check_layout_options``)
    reshards_state_by_rows = True

    def __init__(self, optimizer: Any) -> None:
        self._sharding: dict[int, RowSharding] = {}
        first: RowSharding | None = None
        for group in optimizer.param_groups:
            for p, name in zip(group["params"], group["names"]):
                sh = row_sharding(p, name)
                if first is None:
                    first = sh
                elif sh.mesh != first.mesh or sh.shard_dim != first.shard_dim:
                    raise ValueError(
                        f"parameter {name!r} lives on device mesh {sh.mesh} (shard dim "
                        f"{sh.shard_dim}), others on {first.mesh} (shard dim {first.shard_dim}): "
                        "FRUGAL needs every parameter on one mesh; build the model with one "
                        "fully_shard mesh"
                    )
                self._sharding[id(p)] = sh
        if first is None:
            raise ValueError("FRUGAL with FSDP2: the optimizer holds no parameters")
        self.mesh = first.mesh
        self.process_group = first.mesh.get_group(first.shard_dim)
        self.agreement_group = _agreement_group(first.mesh, self.process_group)
        pg = self.process_group
        self._shard_ranks = {  # global rank -> rank in this rank's shard group
            g: dist.get_group_rank(pg, g) for g in dist.get_process_group_ranks(pg)
        }

    def sharding(self, p: Tensor) -> RowSharding:
        """The row sharding of parameter ``p`` (checked when the layout was bound)."""
        return self._sharding[id(p)]

    def split_rows(self, name: str) -> list[int]:
        return []  # FSDP2 shards whole rows

    def shard_peer(self, agreement_rank: int) -> int | None:
        """The ``process_group`` rank of ``agreement_group`` rank ``agreement_rank`` when it is in
        this rank's shard group (the same replica), else None."""
        if self.agreement_group is self.process_group:
            return agreement_rank
        return self._shard_ranks.get(agreement_rank)  # the agreement group is the default group

    def views(self, optimizer: Any, group: dict[str, Any]) -> list[ParamView]:
        out = []
        for idx, (p, name) in enumerate(zip(group["params"], group["names"])):
            sh = self._sharding.get(id(p)) or row_sharding(p, name)
            local = p.to_local()
            m, n = matrix_shape(p.shape)
            span = RowSpan(m, n, sh.rows(p.shape[0])[0] * (p.numel() // max(p.shape[0], 1)),
                           local.numel())  # fmt: skip
            grad = None if p.grad is None else p.grad.to_local()
            view = ParamView(name, idx, tuple(p.shape), span, local, grad, {})
            view.state = DTensorState(
                optimizer.state[p], p, sh, functools.partial(optimizer.state_role, group, view)
            )
            out.append(view)
        return out
