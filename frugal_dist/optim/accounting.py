"""Memory accounting of ``FRUGAL`` (``state_bytes()``, ``aux_bytes()``): host-side sums over
tensor metadata, no device sync, no communication.

* state: every tensor of the optimizer state on this process (a DTensor counts its local
  shard), i.e. what ``state_dict()`` saves from this rank;
* aux: what is rebuilt from the seed and not saved: coordinate indices and random / randperm
  projection bases of the selections in use (svd bases are state and counted there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from frugal_dist.core.subspaces import CoordinateSelection


def state_bytes(state: Mapping[Any, Mapping[str, Any]]) -> int:
    """Bytes of every tensor in ``state`` (param -> {key: value}); a DTensor: this rank's."""
    total = 0
    for st in state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


def aux_bytes(
    state: Mapping[Any, Mapping[str, Any]], selections: Mapping[str, tuple[int, Any]]
) -> int:
    """Bytes of the coordinate indices / projection bases of ``selections`` (name -> (refresh
    index, selection), ``FRUGAL.selections_in_use()``) that are not tensors of ``state``."""
    in_state = {id(v) for st in state.values() for v in st.values() if isinstance(v, Tensor)}
    total = 0
    for _, sel in selections.values():
        t = sel.index if isinstance(sel, CoordinateSelection) else sel.basis
        if id(t) not in in_state:
            total += t.numel() * t.element_size()
    return total
