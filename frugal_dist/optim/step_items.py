"""One parameter's work in one FRUGAL step (``Item``) and the helpers every phase shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from frugal_dist.core.fragments import RowSpan
from frugal_dist.core.subspaces import matrix_shape, projection_rank, resolve_side
from frugal_dist.layouts.base import ParamView


@dataclass
class Item:
    """One parameter's work in one step."""

    view: ParamView
    group: dict[str, Any]
    kind: str  # adamw (whole tensor, rule ``whole_rule``) | free | block | coordinate | projection
    refresh: bool
    k: int
    active: bool  # has a state-full part this step
    owner: int  # rank holding the state-full buffers (computes U)
    g: Tensor  # float32 gradient: local matrix (coordinate / projection) or local values
    sel: Any = None  # selection in local coordinates
    gsel: Any = None  # global selection
    g_sf: Tensor | None = None
    free: Tensor | None = None  # state-free direction (local shape), None if none
    free_done: bool = False
    u: Tensor | None = None
    fused: bool = False  # AdamW through torch._fused_adamw_ in the apply phase
    sf_t: int = 0  # state-full step count after this step (active items on their owner)

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def st(self):
        return self.view.state

    @property
    def span(self) -> RowSpan:
        return self.view.span


def item_kind(group: dict[str, Any]) -> str:
    """The kind of work a group's parameters get: ``adamw`` = the whole tensor state-full
    (``algorithm="adamw"`` or ``"state_full"``; its rule is ``whole_rule``), ``free`` = the
    state-free rule on the whole tensor (``"signsgd"`` / ``"sgd"``), else the subspace kind."""
    algo = group["algorithm"]
    return {"adamw": "adamw", "state_full": "adamw", "signsgd": "free", "sgd": "free"}.get(
        algo, group["subspace"]
    )


def whole_rule(group: dict[str, Any]) -> str:
    """The state-full rule of a group: AdamW for ``algorithm="adamw"``, else ``state_full``."""
    return "adamw" if group["algorithm"] == "adamw" else group["state_full"]


def apply_update(p: Tensor, direction: Tensor, alpha: float) -> None:
    """``p += alpha * direction``; 16-bit params are updated through float32 (one rounding)."""
    if p.numel() == 0:
        return
    d = direction.reshape(p.shape)
    if p.dtype in (torch.bfloat16, torch.float16):
        p.copy_(p.float().add_(d, alpha=alpha))
    else:
        p.add_(d.to(p.dtype), alpha=alpha)


def compact_shape(it: Item) -> tuple[int, ...]:
    if it.kind in ("adamw", "block"):
        return tuple(it.view.data.shape)
    if it.kind == "coordinate":
        return tuple(it.sel.compact_shape)
    shape = matrix_shape(it.view.shape)
    side = resolve_side(it.group["proj_side"], shape)
    r = projection_rank(shape, it.group["density"], side, it.group["proj_type"])
    return (r, shape[1]) if side == "left" else (it.span.rows_touched, r)


def increment_counters(states: list, key: str) -> list[int]:
    """``st[key] += 1`` for each state's CPU counter tensor; returns the values *after* it.

    Each counter is read (``item()``) and written with ``fill_(value + 1)``: the same float32
    result as ``add_(1)`` (both round the exact sum once), and on the CPU a scalar ``fill_``
    skips the TensorIterator set-up that ``add_`` (or a CPU ``_foreach_add_``) pays per tensor.
    A layout's state view (not a plain dict) gets the counter stored back, as ``+=`` does.
    """
    after = []
    for st in states:
        t = st[key]
        v = int(t.item()) + 1
        t.fill_(v)
        if type(st) is not dict:
            st[key] = t
        after.append(v if v <= EXACT_COUNT else int(t.item()))
    return after


EXACT_COUNT = 1 << 24  # float32 counts every integer up to here exactly
