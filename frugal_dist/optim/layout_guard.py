"""Never compute on a flat partition silently: FRUGAL's guard for tensors an engine swapped in.

FRUGAL's subspaces are chosen per *logical* parameter (a whole tensor, its rows and columns, a
projection of its matrix). Engines that shard the optimizer hand it other tensors: stock
``deepspeed.initialize`` (ZeRO-1/2) replaces each param group's parameters by one flat fp32
partition, ZeRO-3 by flat sub-group tensors, FSDP1 turns each parameter into a 1-D slice of a
flat buffer. Without a bound layout (``FRUGAL.bind_layout``: the engine adapters do it) FRUGAL
would take each such tensor for one parameter, and run another algorithm with no warning.

``ParamRegistry`` records, when a param group is added, each parameter (a weak reference) and its
logical shape (``engine_hooks.logical_shape``: the real shape also under ``zero.Init``). When
FRUGAL builds its dense views of a group with no layout bound (its first step, and whenever the
group's tensors change) ``check`` compares the group with the record and raises
``UnboundLayoutError`` when

* the group holds another number of tensors than it was given (ZeRO's flat partitions), or a
  tensor of another logical shape (a parameter FSDP1 flattened after FRUGAL was built, or
  another engine's copy); tensors of the same shapes (ZeRO-0 bf16's fp32 master copies) pass;
* a 1-D parameter with no recorded real shape is a view into a larger buffer all of whose other
  views among the optimizer's tensors are 1-D too (FSDP1 wrapped before FRUGAL was built), or a
  ``FlatParameter``.

``dense_views`` builds those views: the per-parameter skeleton (name, index, shape, span) once
per group, kept in the caller's dict; gradient and state are looked up anew at each call.

Cost: one pass over the group's parameters per view rebuild (not per step); no communication.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from frugal_dist.core.fragments import RowSpan
from frugal_dist.core.subspaces import matrix_shape
from frugal_dist.layouts.base import ParamView
from frugal_dist.optim.engine_hooks import engine_shape, is_engine_flat, logical_shape

FIXES = (
    "Let frugal_dist bind the engine's layout: DeepSpeed: build the engine with "
    "frugal_dist.deepspeed.initialize(model=..., config=...) (FRUGAL from the config's "
    '"optimizer": {"type": "FRUGAL", "params": {...}} section), or after a stock '
    "deepspeed.initialize(model=..., optimizer=frugal, ...) call "
    "frugal_dist.deepspeed.bind(engine, frugal) before the first step (Hugging Face Trainer: "
    "frugal_dist.integrations.hf_trainer.FrugalTrainer does it); FSDP1: wrap with "
    "FullyShardedDataParallel(use_orig_params=True) and build the optimizer with "
    "frugal_dist.engines.fsdp1.build_frugal(model, ...)."
)


class UnboundLayoutError(RuntimeError):
    """FRUGAL holds engine-made tensors (flat partitions, 1-D slices) and no layout is bound."""


class ParamRegistry:
    """The parameters each param group was built with (see the module docstring)."""

    def __init__(self) -> None:
        self._groups: dict[int, list[tuple[weakref.ref, tuple[int, ...], str]]] = {}

    def record(self, index: int, group: dict[str, Any]) -> None:
        """Remember the parameters of param group ``index`` (call when the group is added)."""
        self._groups[index] = [
            (weakref.ref(p), logical_shape(p), name)
            for p, name in zip(group["params"], group["names"])
        ]

    def check(
        self, index: int, group: dict[str, Any], where: str, all_params: list[Tensor]
    ) -> None:
        """Raise ``UnboundLayoutError`` if ``group``'s tensors are not the parameters it was built
        with, or are 1-D views into flat buffers (see the module docstring). ``all_params``: every
        tensor of the optimizer (a buffer that some 2-D parameter also views is not flat)."""
        params: list[Tensor] = list(group["params"])
        recorded = self._groups.get(index)
        if recorded is not None:
            if len(params) != len(recorded):
                self._fail(
                    where,
                    f"it was built with {len(recorded)} parameters ({_listing(recorded)}) but now "
                    f"holds {len(params)} tensor(s) of shapes {_shapes(params)}: an engine "
                    "replaced them by flat partitions (DeepSpeed ZeRO-1/2/3)",
                )
            for (ref, shape, name), p in zip(recorded, params):
                if logical_shape(p) != shape:
                    same = "the same parameter object" if ref() is p else "another tensor"
                    self._fail(
                        where,
                        f"parameter {name!r} had shape {shape} when the optimizer was built; it "
                        f"now holds {same} of shape {tuple(p.shape)} (an engine flattened or "
                        "sharded it: FSDP1, DeepSpeed)",
                    )
        flat = _flat_views(params, group["names"], all_params)
        if flat:
            self._fail(
                where,
                f"its 1-D parameters {flat[:3]} are views into larger flat buffers (FSDP1 shards "
                "or a FlatParameter); FRUGAL cannot know their real shapes",
            )

    @staticmethod
    def _fail(where: str, what: str) -> None:
        raise UnboundLayoutError(
            f"FRUGAL {where}: {what}. No layout is bound, so FRUGAL would take each of these "
            f"tensors for a whole parameter and silently run another algorithm. {FIXES}"
        )


def dense_views(
    group: dict[str, Any], groups: list[dict[str, Any]], registry: ParamRegistry,
    skeletons: dict[int, tuple[dict, list[tuple]]], state: Any,
) -> list[ParamView]:  # fmt: skip
    """Every parameter of ``group`` (one of ``groups``) as a whole tensor (no layout bound).
    The skeleton is (re)built, after ``registry.check`` refuses engine-made tensors, when
    ``skeletons`` (id(group) -> (group, [(name, index, shape, span, param)]), the step cache's)
    has none for these tensors; the views are fresh, so nothing kept references a gradient."""
    params = group["params"]
    skeleton = skeletons.get(id(group))
    if skeleton is None or skeleton[0] is not group or not _same_params(skeleton[1], params):
        gi = next(i for i, g in enumerate(groups) if g is group)
        where = f"param group {gi} ({group.get('name', 'unnamed')})"
        registry.check(gi, group, where, [p for g in groups for p in g["params"]])
        entries = []
        for idx, (p, name) in enumerate(zip(params, group["names"])):
            m, n = matrix_shape(p.shape)
            entries.append((name, idx, tuple(p.shape), RowSpan(m, n, 0, p.numel()), p))
        skeleton = (group, entries)
        skeletons[id(group)] = skeleton
    return [ParamView(name, idx, shape, span, p, p.grad, state[p])
            for name, idx, shape, span, p in skeleton[1]]  # fmt: skip


def _same_params(entries: list[tuple], params: list[Tensor]) -> bool:
    """The skeleton still describes ``params``: same tensors (identity), same shapes."""
    return len(entries) == len(params) and all(
        e[4] is p and e[2] == tuple(p.shape) for e, p in zip(entries, params)
    )


def _flat_views(params: list[Tensor], names: list[str], all_params: list[Tensor]) -> list[str]:
    """Names of 1-D parameters (no recorded real shape) viewing into a buffer larger than
    themselves that no 2-D+ parameter of the optimizer views into as well."""
    storages_2d = set()
    for p in all_params:
        if p.dim() >= 2 and p.numel():
            storages_2d.add(p.untyped_storage().data_ptr())
    out = []
    for p, name in zip(params, names):
        if is_engine_flat(p):
            out.append(name)
            continue
        if p.dim() != 1 or not p.numel() or engine_shape(p) is not None:
            continue
        storage = p.untyped_storage()
        if storage.nbytes() > p.numel() * p.element_size() and (
            storage.data_ptr() not in storages_2d
        ):
            out.append(name)
    return out


def _listing(recorded: list[tuple[weakref.ref, tuple[int, ...], str]]) -> str:
    shown = ", ".join(f"{name} {shape}" for _, shape, name in recorded[:3])
    return shown + (f", ... ({len(recorded) - 3} more)" if len(recorded) > 3 else "")


def _shapes(params: list[Tensor]) -> str:
    return ", ".join(str(tuple(p.shape)) for p in params[:4]) + (", ..." if len(params) > 4 else "")
