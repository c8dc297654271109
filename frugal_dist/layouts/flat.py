"""Flat layouts: parameters packed into flat partitions, cut anywhere (ZeRO-1/2 fragments,
ZeRO-3 ``ds_tensor`` slices, FSDP1 flat slices).

The engine adapter builds a table: for each logical parameter, where its fragment on this rank
lives (flat tensor, offset in it, logical start, numel); ``FlatLayout`` all-gathers the fragment
boundaries once so every rank knows which rows are cut between ranks. State of parameter ``name``
is kept in the state dict of the group's flat tensor under ``"name::key"`` (tensors only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import all_gather_objects
from frugal_dist.core.fragments import RowSpan
from frugal_dist.core.subspaces import matrix_shape
from frugal_dist.layouts.base import ParamView, PrefixedState


@dataclass
class FlatEntry:
    """Where logical parameter ``name`` lives on this rank."""

    name: str
    shape: tuple[int, ...]
    index: int  # position in its param group's ``names`` (block schedules use it)
    holder: Tensor  # the flat tensor ``step()`` sees for this parameter; its state lives there
    offset: int  # offset of the fragment in ``holder``
    start: int  # offset of the fragment in the parameter's flattening
    numel: int  # 0: nothing of this parameter on this rank


class FlatLayout:
    """Views into flat partitions (see module doc)."""

    name = "flat"

    def __init__(self, entries: list[FlatEntry], process_group: Any = None) -> None:
        self.process_group = process_group
        self.entries = entries
        self._by_holder: dict[int, list[FlatEntry]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for e in entries:
            self._by_holder.setdefault(id(e.holder), []).append(e)
            self._shapes[e.name] = e.shape
        for es in self._by_holder.values():
            es.sort(key=lambda e: e.index)
        mine = [(e.name, e.start, e.numel) for e in entries if e.numel > 0]
        gathered: list[Any] = all_gather_objects(mine, process_group)
        self._cuts: dict[str, set[int]] = {}
        for table in gathered:
            for name, start, numel in table:
                self._cuts.setdefault(name, set()).update((start, start + numel))

    def split_rows(self, name: str) -> list[int]:
        m, n = matrix_shape(self._shapes[name])
        rows = {b // n for b in self._cuts.get(name, ()) if 0 < b < m * n and b % n != 0}
        return sorted(rows)

    def views(
        self, optimizer: Any, group: dict[str, Any], all_holders: bool = False
    ) -> list[ParamView]:
        """Views of the parameters in the flat tensors of ``group["params"]`` (what ``step()``
        sees), or with ``all_holders`` of every flat tensor holding the group's parameters (ZeRO-3
        empties ``params`` outside ``step()``; checkpoint code needs them all)."""
        holders = group["params"]
        if all_holders:
            names = set(group["names"])
            seen: dict[int, Tensor] = {}
            for e in self.entries:
                if e.name in names:
                    seen.setdefault(id(e.holder), e.holder)
            holders = list(seen.values())
        out = []
        for holder in holders:
            parent = optimizer.state[holder]
            for e in self._by_holder.get(id(holder), []):
                m, n = matrix_shape(e.shape)
                if e.numel > 0:
                    data = holder.view(-1).narrow(0, e.offset, e.numel)
                    g = holder.grad
                    grad = None if g is None else g.view(-1).narrow(0, e.offset, e.numel)
                    span = RowSpan(m, n, e.start, e.numel)
                else:
                    data = holder.new_empty(0)
                    grad = None if holder.grad is None else holder.grad.new_empty(0)
                    span = RowSpan(m, n, 0, 0)
                st = PrefixedState(parent, e.name)
                out.append(ParamView(e.name, e.index, e.shape, span, data, grad, st))
        return out


class PerParameterFlatLayout(FlatLayout):
    """``FlatLayout`` where every original parameter is its own holder (FSDP1 with
    ``use_orig_params``, fairscale FSDP without flattening): a parameter with nothing on this rank
    still gets an (empty) gradient while the group steps, so every rank walks the same items and
    joins the same collectives."""

    name = "per-parameter-flat"

    def views(self, optimizer: Any, group: dict[str, Any], all_holders: bool = False):
        stepping = any(p.grad is not None for p in group["params"])
        out = super().views(optimizer, group, all_holders)
        for v in out:
            if v.grad is None and v.span.numel == 0 and stepping:
                v.grad = torch.zeros(0, device=v.data.device)
        return out
