"""The step plan's Triton launches, prepared once per plan (``optim.step_plan``).

Between refreshes a plan step launches the same kernels on the same parameters, moments and
coordinate maps; only the gradients (new tensors every step under ``zero_grad(set_to_none=True)``),
the step counts and the groups' lr / betas / eps / weight decay change. ``prepare`` turns the
Triton-eligible parts of the plan's routes into launches whose tables are slices of one
``kernels.step_table.StepTable`` (fixed entries written once):

    adamw       whole-tensor AdamW parts (``fast_apply.run_fused``; ``elementwise.adamw_apply_``)
                rows [p, g, m, v, numel, 1/bc1, 1/bc2s, 0]               64 B per tensor
    coordinate  columns / rows parts (``coordinate_adamw_apply_``)
                rows [w, g, m, v, positions, 1/bc1, 1/bc2s, 0]           64 B per matrix
    free        state-free parts (``fast_apply.run_free``; ``free_apply_``), one per grad dtype
                rows [p, g, numel]                                       24 B per tensor
    finite      the plan's inf/nan test (``kernels.finite``): the gradients' pointers and
                the zeroed flag                                          8 B per tensor + 8 B

Per step (``stage``, before the nonfinite sync): one ``data_ptr`` gather over the gradients
(C-level ``map``), numpy scatters of those pointers and of the bias corrections of this step's
counts (one ``adam_corrections`` per distinct count per launch) into the pinned host buffer,
and ONE non-blocking host-to-device copy of the whole table -- 8 B per entry, e.g. 64 B x 219 +
8 B x 220 = 15.8 KB for an all-AdamW LLaMA-1B (219 tensors) step. After the sync ``launch``
only launches (one Triton call per launch: no per-tensor Python, no upload). The results are
those of the generic calls bit for bit: the same kernels, the same table contents, the same
scalars computed the same way.

Only parts every tensor of which the generic call would give to the kernel are prepared (float32
contiguous parameters and moments, contiguous gradients of a kernel dtype used as they are:
``Item.g`` is the gradient itself); the rest stays on the plan's generic routes (``residual``).
Whether the gradients still fit (same dtypes, contiguous) is checked per step by the plan
before ``stage`` (a changed layout makes the plan stale: the full path runs). Communication:
none (the table copy is host-to-device only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from frugal_dist.kernels.elementwise import ADAMW_AUTO, matrix_shape, use_triton
from frugal_dist.kernels.finite import NonfiniteTest
from frugal_dist.kernels.step_table import StepTable
from frugal_dist.optim.fast_apply import FusedParts
from frugal_dist.optim.nonfinite import FiniteCheck
from frugal_dist.optim.phases import GroupApply
from frugal_dist.optim.step_items import Item

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DATA_PTR = Tensor.data_ptr


@dataclass(eq=False)
class _Launch:
    """One prepared launch: its kind, group, fixed arguments and where its per-step entries
    go (``src``: the gradients of its rows, by plan position)."""

    kind: str  # "adamw" | "coordinate" | "free"
    group: dict[str, Any]
    start: int  # first entry in the StepTable
    length: int
    src: np.ndarray  # plan positions of its rows' gradients
    fixed_or: int  # bitwise OR of its fixed pointers that count for alignment
    args: dict[str, Any]
    bases: list[int] = field(default_factory=list)  # distinct sf_t at the build (AdamW counts)
    base_index: np.ndarray | None = None  # row -> index in ``bases``
    coef_slots: np.ndarray | None = None  # (rows, 2) table positions of 1/bc1, 1/bc2s
    table: Tensor | None = None
    coef: Tensor | None = None
    aligned: bool = True


class _Builder:
    """Collects the table entries and launches of ``prepare``."""

    def __init__(self, items: list[Item], grads: list[Tensor], direct: list[bool]) -> None:
        self.index = {id(it): i for i, it in enumerate(items)}
        self.grads = grads
        self.direct = direct
        self.values: list[int] = []
        self.grad_slots: list[int] = []
        self.grad_src: list[int] = []
        self.launches: list[_Launch] = []
        self.device: torch.device | None = None
        self.finite_order: list[int] = []  # the inf/nan test's gradients, in its table order
        self.finite_start = 0

    def grad(self, it: Item) -> Tensor | None:
        """The item's gradient if the kernels may read it as its ``g`` (``g`` is the gradient
        itself, contiguous), else None."""
        i = self.index[id(it)]
        g = self.grads[i]
        return g if self.direct[i] and g is not None and g.is_contiguous() else None

    def on_device(self, t: Tensor) -> bool:
        if self.device is None:
            self.device = t.device
        return t.device == self.device

    def add(self, kind: str, group: dict, its: list[Item], rows: list[list[int]], grad_col: int,
            coef_col: int | None, fixed_or: int, args: dict) -> None:  # fmt: skip
        start = len(self.values)
        width = len(rows[0])
        src = []
        for r, (it, row) in enumerate(zip(its, rows)):
            self.values += row
            i = self.index[id(it)]
            self.grad_slots.append(start + r * width + grad_col)
            self.grad_src.append(i)
            src.append(i)
        launch = _Launch(kind, group, start, len(rows) * width, np.array(src, np.int64),
                         fixed_or, args)  # fmt: skip
        if coef_col is not None:
            counts = [it.sf_t for it in its]
            launch.bases = sorted(set(counts))
            launch.base_index = np.array([launch.bases.index(t) for t in counts], np.int64)
            first = start + np.arange(len(rows), dtype=np.int64) * width + coef_col
            launch.coef_slots = np.stack([first, first + 1], axis=1)
        self.launches.append(launch)


def _f32(t: Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_contiguous() and t.numel() > 0


def _whole(b: _Builder, part, group: dict, kernels: str) -> bool:
    scale, sub, data, m, v = part
    dev = data[0].device
    if (dev.type == "cpu" and kernels != "triton") or not use_triton(kernels, dev, ADAMW_AUTO):
        return False
    gs = [b.grad(it) for it in sub]
    for p, g, mi, vi in zip(data, gs, m, v):
        if g is None or not (_f32(p) and _f32(g) and _f32(mi) and _f32(vi)):
            return False
        if not (b.on_device(p) and g.numel() == p.numel() == mi.numel() == vi.numel()):
            return False
    from frugal_dist.kernels import elementwise_triton as tk

    rows, fixed_or = [], 0
    for p, mi, vi in zip(data, m, v):
        ptrs = (p.data_ptr(), mi.data_ptr(), vi.data_ptr())
        rows.append([ptrs[0], 0, ptrs[1], ptrs[2], p.numel(), 0, 0, 0])
        fixed_or |= ptrs[0] | ptrs[1] | ptrs[2]
    numels = tuple(p.numel() for p in data)
    args = dict(scale=scale, tiles=tk.tile_map(numels, dev), wide=tk.wide_offsets(max(numels)))
    b.add("adamw", group, sub, rows, 1, 5, fixed_or, args)
    return True


def _coords(b: _Builder, part, group: dict, kernels: str) -> bool:
    sub, data, m, v, indices, pos = part
    dev = data[0].device
    if not use_triton(kernels, dev):
        return False
    M, N = matrix_shape(data[0])
    k = int(indices[0].numel())
    sel = sub[0].sel
    compact, dim = tuple(sel.compact_shape), sel.axis_length
    gs = [b.grad(it) for it in sub]
    if k == 0 or M * N == 0 or gs[0] is None or gs[0].dtype not in _KERNEL_DTYPES:
        return False
    gd = gs[0].dtype
    for w, g, mi, vi, ix, ps in zip(data, gs, m, v, indices, pos):
        if g is None or g.dtype is not gd or g.numel() != M * N or not b.on_device(w):
            return False
        if not (_f32(w) and w.shape == data[0].shape and _f32(mi) and _f32(vi)):
            return False
        if mi.shape != compact or vi.shape != compact or ix.numel() != k:
            return False
        if ps.dtype is not torch.int32 or ps.numel() != dim or not ps.is_contiguous():
            return False
    rows, fixed_or = [], 0
    for w, mi, vi, ps in zip(data, m, v, pos):
        rows.append([w.data_ptr(), 0, mi.data_ptr(), vi.data_ptr(), ps.data_ptr(), 0, 0, 0])
        fixed_or |= w.data_ptr()  # the kernel's alignment hint covers w and g only
    b.add("coordinate", group, sub, rows, 1, 5, fixed_or,
          dict(count=len(sub), gdtype=gd, shape=(M, N), k=k, scale=group["proj_params_lr_scale"],
               free_scale=group["inactive_lr_scale"], free_rule=group["state_free"],
               axis_rows=sel.axis == "rows"))  # fmt: skip
    return True


def _free(b: _Builder, part, group: dict, kernels: str) -> bool:
    rule, scale, its, data = part
    dev = data[0].device
    if not use_triton(kernels, dev):
        return False
    by_dtype: dict[torch.dtype, list[tuple[Item, Tensor]]] = {}
    for it, p in zip(its, data):
        if p.numel() == 0:
            continue  # the generic call skips it too
        g = b.grad(it)
        if g is None or g.dtype not in _KERNEL_DTYPES or g.numel() != p.numel():
            return False
        if not (_f32(p) and b.on_device(p)):
            return False
        by_dtype.setdefault(g.dtype, []).append((it, p))
    from frugal_dist.kernels import elementwise_triton as tk

    for gd, pairs in by_dtype.items():
        rows = [[p.data_ptr(), 0, p.numel()] for _, p in pairs]
        numels = tuple(p.numel() for _, p in pairs)
        fixed_or = 0
        for row in rows:
            fixed_or |= row[0]
        b.add("free", group, [it for it, _ in pairs], rows, 1, None, fixed_or,
              dict(rule=rule, scale=scale, gdtype=gd, tiles=tk.tile_map(numels, dev),
                   wide=tk.wide_offsets(max(numels))))  # fmt: skip
    return True


class PlanLaunches:
    """A plan's prepared launches and their ``StepTable`` (module docstring)."""

    def __init__(self, b: _Builder, finite: FiniteCheck | None) -> None:
        assert b.device is not None
        self.device = b.device
        self.launches = b.launches
        self.coef_launches = [lc for lc in b.launches if lc.coef_slots is not None]
        self.grad_slots = np.array(b.grad_slots, np.int64)
        self.grad_src = np.array(b.grad_src, np.int64)
        self.table = StepTable(b.values, b.device)
        for lc in self.launches:
            lc.table = self.table.view(lc.start, lc.length)
            if lc.coef_slots is not None:
                lc.coef = lc.table.view(torch.float64)
        self.finite_check: FiniteCheck | None = None
        self._finite_src: np.ndarray | None = None
        self._flag_slot = -1  # the inf/nan flag's entry: zeroed every step (on the CPU the
        # host buffer is the table the kernel writes the flag into)
        self._finite_aligned = True
        if finite is not None:
            self._finite_src = np.array(b.finite_order, np.int64)
            self._flag_slot = b.finite_start + len(b.finite_order)
            test = finite.kernel
            assert isinstance(test, NonfiniteTest)
            run = test.bind(self.table.view(b.finite_start, len(b.finite_order) + 1))
            self.finite_check = finite.bound(lambda: run(self._finite_aligned))
        self.bytes_per_step = 8 * self.table.numel

    def stage(self, grads: list[Tensor], n: int) -> None:
        """Write this step's gradient pointers and the bias corrections of plan step ``n`` into
        the host buffer and upload the table (one copy; ``grads``: every planned gradient, in
        plan order, checked by the caller: contiguous, of the planned dtypes)."""
        from frugal_dist.kernels.elementwise_triton import adam_corrections

        ptrs = np.fromiter(map(_DATA_PTR, grads), np.int64, len(grads))
        host = self.table.begin()
        host[self.grad_slots] = ptrs[self.grad_src]
        if self._flag_slot >= 0:
            host[self._flag_slot] = 0
        for lc in self.coef_launches:
            b1, b2 = lc.group["betas"]
            b1, b2 = float(b1), float(b2)
            vals = np.array([adam_corrections(t + n, b1, b2) for t in lc.bases], np.int64)
            host[lc.coef_slots] = vals[lc.base_index]
        self.table.upload()
        if int(np.bitwise_or.reduce(ptrs)) & 15:  # some gradient not 16-byte aligned
            for lc in self.launches:
                lc.aligned = (lc.fixed_or | int(np.bitwise_or.reduce(ptrs[lc.src]))) & 15 == 0
            if self._finite_src is not None:
                self._finite_aligned = int(np.bitwise_or.reduce(ptrs[self._finite_src])) & 15 == 0
        else:
            for lc in self.launches:
                lc.aligned = lc.fixed_or & 15 == 0
            self._finite_aligned = True

    def launch(self, clip: Tensor | None = None) -> None:
        """Every prepared launch with the groups' current lr, weight decay, betas and eps (the
        scalars exactly as ``fast_apply.run_fused`` / ``run_free`` compute them). ``clip``: a
        pending clip's 0-d coefficient c: the kernels read c g where the rule depends on the
        scale (AdamW, the coordinate AdamW part, ``sgd``; ``optim.clipping``)."""
        from frugal_dist.kernels import elementwise_triton as tk

        dev = self.device
        if clip is not None:
            clip = clip.to(dev)
        for lc in self.launches:
            g, a = lc.group, lc.args
            lr, wd = g["lr"], g["weight_decay"]
            if lc.kind == "free":
                if a["rule"] == "none" and wd == 0.0:
                    continue
                tk.launch_free(dev, a["tiles"], lc.table, lc.aligned, a["wide"], a["gdtype"],
                               lr * a["scale"], a["rule"], 1.0 - lr * wd, clip)  # fmt: skip
                continue
            b1, b2 = g["betas"]
            betas = (float(b1), float(b2))
            if lc.kind == "adamw":
                lr_s = lr * a["scale"]
                keep = 1.0 - lr_s * (wd / a["scale"])
                tk.launch_adamw(dev, a["tiles"], lc.table, lc.coef, lc.aligned, a["wide"], lr_s,
                                betas, g["eps"], keep, clip)  # fmt: skip
            else:
                tk.launch_coordinate(
                    dev, lc.table, lc.coef, a["count"], lc.aligned, a["gdtype"], a["shape"],
                    a["k"], lr, a["scale"], a["free_scale"], betas, g["eps"], 1.0 - lr * wd,
                    a["free_rule"], a["axis_rows"], clip,
                )  # fmt: skip


def prepare(
    items: list[Item], routed: list[GroupApply], grads: list[Tensor], direct: list[bool],
    finite: FiniteCheck, kernels: str, keep_out: Callable[[Item], bool],
) -> tuple[PlanLaunches | None, list[GroupApply], list[Item]]:  # fmt: skip
    """(launches, residual routes, items left to the generic phases) for a plan built from the
    step whose gradients are ``grads`` (plan order; ``direct[i]``: item i's ``g`` is its
    gradient). Parts holding an item for which ``keep_out`` is true (it has work in another
    phase) are not prepared. None when nothing is: the routes are returned unchanged."""
    b = _Builder(items, grads, direct)
    taken: set[int] = set()
    done: set[int] = set()  # ids of prepared items
    for ga in routed:
        group = ga.group
        parts: list[tuple[Callable, Any, list[Item]]] = []
        if ga.fused is not None:
            parts += [(_whole, p, p[1]) for p in ga.fused.whole]
            parts += [(_coords, p, p[0]) for p in ga.fused.coords]
        parts += [(_free, p, p[2]) for p in ga.free]
        for fn, part, its in parts:
            if any(map(keep_out, its)):
                continue
            if fn(b, part, group, kernels):
                taken.add(id(part))
                done.update(map(id, its))
    finite_fast = finite.kernel.fast and (b.device is None or finite.kernel.device == b.device)
    if finite_fast:
        if b.device is None:
            b.device = finite.kernel.device
        b.finite_order = finite.kernel.order
        b.finite_start = len(b.values)
        for j, i in enumerate(b.finite_order):
            b.grad_slots.append(b.finite_start + j)
            b.grad_src.append(i)
        b.values += [0] * (len(b.finite_order) + 1)  # the pointers, then the zeroed flag
    if not b.launches and not finite_fast:
        return None, routed, items
    launches = PlanLaunches(b, finite if finite_fast else None)
    residual = []
    for ga in routed:
        fused = ga.fused
        if fused is not None:
            whole = [p for p in fused.whole if id(p) not in taken]
            coords = [p for p in fused.coords if id(p) not in taken]
            fused = FusedParts(whole, coords) if whole or coords else None
        free = [p for p in ga.free if id(p) not in taken]
        bt = ga.batches
        if (fused is None and not free and not ga.voted and not ga.decayed and not bt.kernel_projs
                and not bt.rest and not bt.coords and not bt.projs):  # fmt: skip
            continue
        residual.append(dataclasses.replace(ga, fused=fused, free=free))
    return launches, residual, [it for it in items if id(it) not in done]
