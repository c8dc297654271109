"""Subspace kinds: one object per kind owns everything kind-specific of a FRUGAL step (sizes,
compact shapes and state bytes, selection, down / up / residual / apply, fingerprint, state role).

    kind_for(group)     the kind of a param group's parameters:
                        algorithm "adamw" / "state_full"  -> WHOLE_STATE_FULL
                        algorithm "signsgd" / "sgd"       -> WHOLE_FREE
                        algorithm "frugal"                -> KINDS[group["subspace"]]

A new subspace kind: subclass ``kinds.base.SubspaceKind``, add it to ``KINDS`` under the name
users pass as ``subspace=``, and add that name to ``core.subspaces``' size rules and
``optim.validation``'s choices. The phases need no change.
"""

from __future__ import annotations

from typing import Any

from frugal_dist.optim.kinds.base import SubspaceKind
from frugal_dist.optim.kinds.block import Block
from frugal_dist.optim.kinds.coordinate import Coordinate
from frugal_dist.optim.kinds.projection import Projection
from frugal_dist.optim.kinds.whole import WholeFree, WholeStateFull

WHOLE_STATE_FULL = WholeStateFull()
WHOLE_FREE = WholeFree()
KINDS: dict[str, SubspaceKind] = {"block": Block(), "coordinate": Coordinate(),
                                  "projection": Projection()}  # fmt: skip
ALGORITHMS: dict[str, SubspaceKind] = {"adamw": WHOLE_STATE_FULL, "state_full": WHOLE_STATE_FULL,
                                       "signsgd": WHOLE_FREE, "sgd": WHOLE_FREE}  # fmt: skip


def kind_for(group: dict[str, Any]) -> SubspaceKind:
    """The subspace kind of ``group``'s parameters (see the module docstring)."""
    kind = ALGORITHMS.get(group["algorithm"])
    return kind if kind is not None else KINDS[group["subspace"]]


__all__ = ["KINDS", "SubspaceKind", "WHOLE_FREE", "WHOLE_STATE_FULL", "kind_for"]
