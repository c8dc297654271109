"""The seams through which engine adapters tell ``optim/`` what it cannot know itself.

``optim/`` never imports an engine and never reads an engine's attributes. What it needs from
one, an adapter in ``frugal_dist/engines/`` registers here (``frugal_dist.engines`` registers the
built-in ones when ``frugal_dist`` is imported):

* ``register_shape_resolver(fn)``: ``fn(p)`` -> the logical shape of a parameter whose tensor is
  not shaped like it (DeepSpeed ``zero.Init`` placeholders), or None;
  ``record_logical_shape(p, shape)``: an adapter that flattens parameters itself (FSDP1, fairscale
  FSDP) records their real shape before the param-group rules run;
* ``register_auto_layout(detect, factory)``: parameters ``detect(group)`` recognises (FSDP2's
  DTensors) get ``factory(optimizer)`` bound as their layout at the first step;
* ``register_flat_detector(fn)``: ``fn(p)`` -> True for an engine's flat parameter that packs
  several parameters (FSDP1's ``FlatParameter``), refused without a layout (``layout_guard``);
* ``register_local_partition(fn)``: ``fn(t)`` -> (this rank's partition of a gathered tensor,
  its flat start, its element count), or None (ZeRO-3 ``ds_tensor``): the RSO layers' lazy merge
  updates it alongside the gathered tensor;
* ``register_name_prefix(prefix)``: a module-name component an engine's wrapper inserts into
  parameter names (FSDP1's ``_fsdp_wrapped_module.``), dropped by ``param_groups.clean_name``
  so subspaces, seeded by name, are the same under every engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

ShapeResolver = Callable[[Tensor], "tuple[int, ...] | None"]
PartitionResolver = Callable[[Tensor], "tuple[Tensor, int, int] | None"]

_shape_resolvers: list[ShapeResolver] = []
_recorded_shapes: WeakIdKeyDictionary = WeakIdKeyDictionary()
_auto_layouts: list[tuple[Callable[[dict[str, Any]], bool], Callable[[Any], Any]]] = []
_partition_resolvers: list[PartitionResolver] = []
_flat_detectors: list[Callable[[Tensor], bool]] = []
_name_prefixes: list[str] = []


def _add(registry: list, entry: Any) -> None:
    if entry not in registry:  # importing an adapter twice registers nothing twice
        registry.append(entry)


def register_shape_resolver(fn: ShapeResolver) -> None:
    _add(_shape_resolvers, fn)


def record_logical_shape(p: Tensor, shape: tuple[int, ...]) -> None:
    """``p``'s real shape (its tensor is a flat shard); held weakly, dropped with ``p``."""
    _recorded_shapes[p] = tuple(int(d) for d in shape)


def engine_shape(p: Tensor) -> tuple[int, ...] | None:
    """The real shape an adapter recorded or a resolver knows for ``p``, or None (then its
    tensor's shape is its shape)."""
    shape = _recorded_shapes.get(p)
    if shape is not None:
        return shape
    for fn in _shape_resolvers:
        found = fn(p)
        if found:
            return tuple(found)
    return None


def logical_shape(p: Tensor) -> tuple[int, ...]:
    """The parameter's real shape: ``engine_shape(p)``, else ``p.shape``."""
    shape = engine_shape(p)
    return shape if shape is not None else tuple(p.shape)


def register_flat_detector(fn: Callable[[Tensor], bool]) -> None:
    _add(_flat_detectors, fn)


def is_engine_flat(p: Tensor) -> bool:
    """``p`` is an engine's flat parameter packing several parameters."""
    return any(fn(p) for fn in _flat_detectors)


def register_auto_layout(
    detect: Callable[[dict[str, Any]], bool], factory: Callable[[Any], Any]
) -> None:
    _add(_auto_layouts, (detect, factory))


def auto_layout(optimizer: Any, group: dict[str, Any]) -> Any | None:
    """The layout a registered adapter builds for ``group``'s parameters, or None (dense)."""
    for detect, factory in _auto_layouts:
        if detect(group):
            return factory(optimizer)
    return None


def register_local_partition(fn: PartitionResolver) -> None:
    _add(_partition_resolvers, fn)


def local_partition(t: Tensor) -> tuple[Tensor, int, int] | None:
    """(partition, flat start, numel) of this rank's slice of gathered tensor ``t``, or None."""
    for fn in _partition_resolvers:
        found = fn(t)
        if found is not None:
            return found
    return None


def register_name_prefix(prefix: str) -> None:
    _add(_name_prefixes, prefix)


def name_prefixes() -> tuple[str, ...]:
    """The wrapper components registered with ``register_name_prefix``."""
    return tuple(_name_prefixes)
