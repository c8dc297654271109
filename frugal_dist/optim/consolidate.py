"""Consolidated FRUGAL state: keyed by parameter name, independent of engine and world size.

``export_state(opt)`` (every rank calls it; collective) returns on every rank::

    {"format": "frugal_dist.consolidated/1",
     "param_groups": [options of each group, with "names", without "params"],
     "state": {name: {key: full tensor}}}

``import_state(opt, blob)`` gives each rank its own slices, whatever layout it has now (dense,
ZeRO-1/2/3 flat fragments, FSDP2 row shards) -- so a ZeRO-2 run on 2 ranks resumes on 1 rank, or
under ZeRO-3. Assembly rules by kind of tensor:

* counters (``step``, ``sf_step``) and replicated tensors (left-projection moments, svd basis):
  identical on every rank, taken once;
* param-shaped buffers (AdamW, active blocks): fragments placed at their flat offsets;
* coordinate compact buffers: local rows of the global compact tensor; entries outside a
  fragment ("phantoms") are zero, so the pieces are summed;
* right-projection buffers (rows, r): rows placed by global row (boundary rows are identical).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import all_gather_objects
from frugal_dist.core.fragments import RowSpan, compact_rows, local_coordinates
from frugal_dist.core.subspaces import CoordinateSelection
from frugal_dist.optim.refresh_schedule import SCHEDULE_KEYS

FORMAT = "frugal_dist.consolidated/1"


def _row_layout(sel: CoordinateSelection, span: RowSpan) -> tuple[Tensor, Tensor]:
    """For a coordinate selection: (global compact rows of the local compact tensor's rows, mask
    of the local compact entries that really belong to the fragment)."""
    local = local_coordinates(sel, span)
    ones = span.pad(torch.ones(span.numel, device=sel.index.device))
    real = local.gather(ones) > 0
    return compact_rows(sel, span), real


def _pieces(opt: Any) -> list[tuple[str, str, Any, str, Tensor]]:
    """(name, key, span, role, local tensor) of every state tensor on this rank."""
    out = []
    for group in opt.param_groups:
        for view in opt.views(group, all_holders=True):
            sel = opt.selection(view, group)
            for key in list(view.state):
                t = view.state[key]
                role = opt.state_role(group, view, key)
                extra = (
                    _row_layout(sel, view.span)[0]
                    if sel is not None and role == "coordinate"
                    else None
                )
                out.append((view.name, key, (view.span, view.shape, extra), role, t.detach().cpu()))
    return out


def export_state(opt: Any) -> dict[str, Any]:
    """The consolidated state (see module doc). Collective: every rank must call it."""
    pieces = [p for rank_pieces in all_gather_objects(_pieces(opt), opt.process_group)
              for p in rank_pieces]  # fmt: skip
    state: dict[str, dict[str, Tensor]] = {}
    for name, key, (span, shape, rows), role, t in pieces:
        slot = state.setdefault(name, {})
        if role in ("counter", "replicated"):
            slot.setdefault(key, t.clone())
        elif role == "param":
            full = slot.setdefault(key, torch.zeros(int(torch.Size(shape).numel()), dtype=t.dtype))
            full[span.start : span.start + span.numel] = t.reshape(-1)
        elif role == "right":
            full = slot.setdefault(key, torch.zeros(span.m, t.shape[-1], dtype=t.dtype))
            if span.numel:
                full[span.first_row : span.first_row + span.rows_touched] = t
        else:  # coordinate: local compact rows -> global compact rows, phantoms are zero
            tt = t.reshape(len(rows), t.shape[-1]) if t.ndim > 1 else t.reshape(-1, 1)
            slot.setdefault(key, [])
            slot[key].append((rows, tt, t.ndim))
    for slot in state.values():
        for key, v in list(slot.items()):
            if isinstance(v, list):
                total = max((int(r.max()) + 1 for r, _, _ in v if r.numel()), default=0)
                width = v[0][1].shape[1]
                full = torch.zeros(total, width, dtype=v[0][1].dtype)
                for rows, tt, _ in v:
                    full.index_add_(0, rows, tt)
                slot[key] = full if v[0][2] > 1 else full.reshape(-1)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"format": FORMAT, "param_groups": groups, "state": state}


def import_state(opt: Any, blob: dict[str, Any]) -> None:
    """Load a consolidated state into ``opt`` on every rank (any layout, any world size)."""
    if blob.get("format") != FORMAT:
        raise ValueError(f"not a consolidated FRUGAL state (format {blob.get('format')!r})")
    saved = blob["param_groups"]
    if [g["names"] for g in saved] != [g["names"] for g in opt.param_groups]:
        raise ValueError("consolidated state is of another model: parameter names differ")
    for g, s in zip(opt.param_groups, saved):
        for k, v in s.items():
            if k not in ("names",):
                g[k] = tuple(v) if k == "betas" else v
    opt.reset_caches()
    state = blob["state"]
    for group in opt.param_groups:
        for view in opt.views(group, all_holders=True):
            full = state.get(view.name, {})
            for key in list(view.state):
                del view.state[key]
            for key, t in full.items():
                if opt.state_role(group, view, key) == "counter":  # schedule sums: float64
                    view.state[key] = t.clone().to(torch.float64 if key in SCHEDULE_KEYS
                                                   else torch.float32)  # fmt: skip
            sel = opt.selection(view, group)
            dev = view.data.device
            for key, t in full.items():
                role = opt.state_role(group, view, key)
                if role == "counter":
                    continue
                span = view.span
                if role == "replicated":
                    local = t.clone()
                elif role == "param":
                    local = t.reshape(-1)[span.start : span.start + span.numel].reshape(
                        view.data.shape
                    )
                elif role == "coordinate":
                    rows, real = _row_layout(sel, span)
                    tt = t.reshape(t.shape[0], t.shape[-1]) if t.ndim > 1 else t.reshape(-1, 1)
                    local = tt[rows].reshape(real.shape) * real.to(t.dtype).cpu()
                else:  # right projection
                    local = t[span.first_row : span.first_row + span.rows_touched].clone()
                view.state[key] = local.to(dev)
