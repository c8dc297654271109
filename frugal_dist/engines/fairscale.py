"""fairscale adapters: ``OSS`` (optimizer state sharding) and ``ShardedDataParallel``.

``OSS`` gives each rank *whole* parameters (greedy by size, per param group) and builds one
local optimizer per rank on that subset; after the local step every owner broadcasts its
parameters. FRUGAL therefore runs dense on each rank, on a subset of every group, with no
collectives of its own (gradients arrive averaged: from DDP, or reduced onto their owner by
``ShardedDataParallel``). Two things must stay as in the unsharded run:

* names: OSS copies each group dict (with the *full* ``names`` list) and swaps in the rank's
  parameters, so ``build_oss`` re-derives the local names from a parameter -> name map taken
  before OSS partitions;
* block schedule: the active set of a group is computed over the group's *full* name list and
  position, and each rank applies it to its own parameters (``_OssLayout`` gives every local
  parameter its global position and, through ``schedule_names``, the full list FRUGAL draws
  the schedule over). Coordinate and projection subspaces are functions of (seed, name,
  refresh) already.

FRUGAL's own collectives (seed agreement, refresh fingerprints, svd owner broadcast) would
mismatch between ranks that hold different parameters, so each local FRUGAL works in a process
group of its rank alone; the seed is agreed once on the real group beforehand.

    model = DDP(model)                                    # or: see ShardedDataParallel below
    opt = build_oss(model, lr=1e-3, density=0.25)         # fairscale.optim.OSS around FRUGAL
    ...  loss.backward(); opt.step(); opt.zero_grad()

    opt = build_oss(model, lr=1e-3)                       # plain model, not DDP
    model = ShardedDataParallel(model, opt)               # grads reduced to each owner
    ...  loss.backward(); opt.step(); opt.zero_grad(set_to_none=False)

With ``ShardedDataParallel`` use ``zero_grad(set_to_none=False)``: SDP keeps references to the
``.grad`` tensors it reduces into; dropping them gives wrong gradients on later steps.
fairscale's ``FullyShardedDataParallel`` is CUDA-only. With ``flatten_parameters=False`` every
parameter is sharded on its own (``torch.chunk`` of its flattening into W pieces of
ceil(numel / W), the last ones shorter or empty, zero-padded): ``build_fsdp_frugal`` binds FRUGAL
to those fragments through ``FlatLayout`` (tested in ``tests/gpu/test_fairscale_fsdp.py``).

    model = FullyShardedDataParallel(model, flatten_parameters=False)
    opt = build_fsdp_frugal(model, lr=1e-3, density=0.25)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from frugal_dist.comm.collectives import agree_on_seed
from frugal_dist.core.fragments import RowSpan
from frugal_dist.core.subspaces import matrix_shape
from frugal_dist.layouts.base import ParamView
from frugal_dist.layouts.flat import FlatEntry, PerParameterFlatLayout
from frugal_dist.optim import FRUGAL, build_param_groups, pop_group_options
from frugal_dist.optim.engine_hooks import record_logical_shape


class _OssLayout:
    """Dense views of this rank's parameters, each with its position in the full group."""

    name = "oss"

    def __init__(self, full_names: list[list[str]], process_group: Any) -> None:
        self.full_names = full_names
        self.process_group = process_group
        self._position = [{n: i for i, n in enumerate(names)} for names in full_names]

    def group_index(self, optimizer: Any, group: dict[str, Any]) -> int:
        for i, g in enumerate(optimizer.param_groups):
            if g is group:
                return i
        raise ValueError("param group not in this optimizer")

    def views(self, optimizer: Any, group: dict[str, Any], all_holders: bool = False):
        pos = self._position[self.group_index(optimizer, group)]
        out = []
        for p, name in zip(group["params"], group["names"]):
            m, n = matrix_shape(p.shape)
            span = RowSpan(m, n, 0, p.numel())
            out.append(ParamView(name, pos[name], tuple(p.shape), span, p, p.grad,
                                 optimizer.state[p]))  # fmt: skip
        return out

    def split_rows(self, name: str) -> list[int]:
        return []  # whole parameters: nothing is cut

    def schedule_names(self, optimizer: Any, group: dict[str, Any]) -> list[str]:
        """The full group's names: FRUGAL draws the block schedule over them."""
        return self.full_names[self.group_index(optimizer, group)]


def _own_rank_group(group: Any) -> Any:
    """A process group holding only this rank (every rank must call this together)."""
    ranks = dist.get_process_group_ranks(group) if group is not None else None
    ranks = ranks if ranks is not None else list(range(dist.get_world_size()))
    me = dist.get_rank()
    mine = None
    for r in ranks:  # new_group is collective: every rank creates every singleton group
        pg = dist.new_group(ranks=[r])
        if r == me:
            mine = pg
    return mine


def build_oss(
    model: nn.Module,
    *,
    group: Any = None,
    rules: Sequence[tuple[str, dict[str, Any]]] = (),
    broadcast_fp16: bool = False,
    **options: Any,
) -> Any:
    """``fairscale.optim.OSS`` sharding FRUGAL over the ranks of ``group`` (default: world).

    ``options`` are FRUGAL's (lr, density, subspace, seed, ...); ``rules`` as in
    ``build_param_groups``. Collective: every rank of ``group`` must call it.
    """
    from fairscale.optim import OSS

    for key in ("shard_state", "reduce_gradients", "process_group"):
        if options.get(key):
            raise ValueError(
                f"{key} is not available under OSS: OSS already shards the state and the data "
                "parallel wrapper reduces the gradients; leave it unset"
            )
        options.pop(key, None)
    groups = build_param_groups(model, rules=rules, **pop_group_options(options))
    name_of = {id(p): n for g in groups for p, n in zip(g["params"], g["names"])}
    full_names = [list(g["names"]) for g in groups]
    options["seed"] = agree_on_seed(options.get("seed", 0), group)
    local_pg = _own_rank_group(group)

    def make_local(local_groups: list[dict[str, Any]], **defaults: Any) -> FRUGAL:
        for g in local_groups:
            g["names"] = [name_of[id(p)] for p in g["params"]]
        opt = FRUGAL(local_groups, process_group=local_pg, **defaults)
        opt.bind_layout(_OssLayout(full_names, local_pg))
        return opt

    oss = OSS(groups, optim=make_local, group=group, broadcast_fp16=broadcast_fp16, **options)
    # This rank's FRUGAL answers the accounting questions (state bytes and comm of this rank)
    # and takes the loss of refresh_policy="loss" (the caller's all-reduced loss: every local
    # FRUGAL decides the same for its own parameters; no collective).
    oss.state_bytes = oss.optim.state_bytes
    oss.comm_stats = oss.optim.comm_stats
    oss.observe_loss = oss.optim.observe_loss
    return oss


def local_frugal(oss: Any) -> FRUGAL:
    """The FRUGAL instance of this rank inside ``oss`` (state, ``state_bytes()``)."""
    return oss.optim


def build_fsdp_frugal(model: nn.Module, **options: Any) -> FRUGAL:
    """FRUGAL for a fairscale ``FullyShardedDataParallel`` model built with
    ``flatten_parameters=False`` (see module doc), bound to each parameter's shard."""
    from fairscale.nn.data_parallel import FullyShardedDataParallel as FairFSDP

    roots = [m for m in model.modules() if isinstance(m, FairFSDP)]
    if not roots:
        raise ValueError("build_fsdp_frugal needs a fairscale FullyShardedDataParallel model")
    if any(m.flatten_parameters for m in roots):
        raise ValueError(
            "FRUGAL needs fairscale FSDP with flatten_parameters=False (each parameter sharded "
            "on its own); flattened parameters hide the parameter boundaries"
        )
    info: dict[int, tuple[tuple[int, ...], int, int]] = {}
    for m in roots:
        world, rank = m.world_size, m.rank
        for p in m.params:
            shape = tuple(getattr(p, "_orig_size", p.shape))
            total = int(torch.Size(shape).numel())
            chunk = -(-total // world)
            start = min(rank * chunk, total)
            info[id(p)] = (shape, start, max(0, min(chunk, total - start)))
            record_logical_shape(p, shape)  # the real shape, for the param-group rules
    groups = build_param_groups(model, **pop_group_options(options))
    frugal = FRUGAL(groups, **options)
    entries = []
    for group in frugal.param_groups:
        for idx, (p, name) in enumerate(zip(group["params"], group["names"])):
            shape, start, numel = info[id(p)]
            entries.append(FlatEntry(name, shape, idx, p, 0, start, numel))
    frugal.bind_layout(PerParameterFlatLayout(entries, roots[0].process_group))
    return frugal
