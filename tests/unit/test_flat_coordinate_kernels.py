"""Coordinate subspaces on a flat layout (``FlatLayout``: parameters packed into one flat tensor,
as ZeRO / FSDP1 / fairscale FSDP hand them to the optimizer) under ``kernels="triton"``: the
fused coordinate apply (``fast_apply.run_fused``) gets each whole fragment as its parameter's
(m, n) matrix, batched by that shape. SHAPES has two pairs of transposed shapes ((6, 4) / (4, 6),
(3, 8) / (8, 3)): equal numel, different matrices, which a batch keyed by the 1-D fragment's
shape mixed up (``coordinate_positions`` / ``coordinate_adamw_apply_`` raised).

At world 1 every fragment is a whole parameter (``span.is_full``), the case the fused path
takes; cut fragments at world 2 are in tests/distributed/test_flat_layout.py. Compared step by
step with the same optimizer on the dense parameters, with ``kernels="torch"`` on the same flat
layout, and with the oracle (``core.reference``)."""

from __future__ import annotations

import pytest
import torch

import frugal_dist.optim.fast_apply as fast_apply
from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.layouts.flat import FlatEntry, FlatLayout
from tests.helpers import SHAPES, clone_params, grad_stream, make_params, max_diff, set_grads
from tests.triton_marks import needs_interpreter

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
CHOICES = ("columns", "rows", "randk")
COMMON = dict(lr=3e-3, density=0.25, update_gap=5, weight_decay=0.05, inactive_lr_scale=0.5,
              subspace="coordinate")  # fmt: skip
STEPS = 13  # refreshes at 0, 5, 10: the selections (and their cached positions) change


class FlatRun:
    """FRUGAL on one flat tensor holding every parameter of ``params`` (world 1, no process
    group): its views are 1-D whole fragments."""

    def __init__(self, params: list[torch.nn.Parameter], kernels: str, kw: dict) -> None:
        self.shapes = [tuple(p.shape) for p in params]
        self.opt = FRUGAL([{"params": params, "names": NAMES}], kernels=kernels, **kw)
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        entries, off = [], 0
        for idx, (name, shape) in enumerate(zip(NAMES, self.shapes)):
            numel = int(torch.Size(shape).numel())
            entries.append(FlatEntry(name, shape, idx, self.flat, off, 0, numel))
            off += numel
        self.opt.param_groups[0]["params"] = [self.flat]
        self.opt.bind_layout(FlatLayout(entries))

    def step(self, grads: list[torch.Tensor]) -> None:
        self.flat.grad = torch.cat([g.reshape(-1) for g in grads])
        self.opt.step()

    def params(self) -> list[torch.Tensor]:
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        return [t.view(s) for t, s in zip(self.flat.split(sizes), self.shapes)]


def test_transposed_shapes_share_a_numel():
    """The premise of the batch-key cases below."""
    numels = [torch.Size(s).numel() for s in SHAPES]
    assert len(set(numels)) < len(numels) and len(set(SHAPES)) == len(SHAPES)


@needs_interpreter
@pytest.mark.parametrize("choice", CHOICES)
def test_flat_triton_matches_dense_torch_and_oracle(choice, monkeypatch):
    kw = {**COMMON, "coord_choice": choice}
    calls: list[list[tuple[int, ...]]] = []
    fused = fast_apply.coordinate_adamw_apply_

    def counting(W, *args, **kwargs):
        calls.append([tuple(w.shape) for w in W])
        return fused(W, *args, **kwargs)

    monkeypatch.setattr(fast_apply, "coordinate_adamw_apply_", counting)
    base = make_params()
    flat_triton = FlatRun(clone_params(base), "triton", kw)
    flat_torch = FlatRun(clone_params(base), "torch", kw)
    dense = clone_params(base)
    dense_opt = FRUGAL([{"params": dense, "names": NAMES}], kernels="triton", **kw)
    oracle = clone_params(base)
    ref = ReferenceFRUGAL(list(zip(NAMES, oracle)), **kw)
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        flat_triton.step(grads)
        flat_torch.step(grads)
        set_grads(dense, grads)
        set_grads(oracle, grads)
        dense_opt.step()
        ref.step()
        got = flat_triton.params()
        # the same kernels on the same matrices: the dense run's bits
        assert max_diff(got, dense) == 0.0, (choice, step, max_diff(got, dense))
        assert max_diff(got, flat_torch.params()) < 1e-6, (choice, step)
        assert max_diff(got, oracle) < 1e-5, (choice, step, max_diff(got, oracle))
    if choice == "randk":  # single entries: no axis, the per-phase path
        assert not calls
    else:  # the fused kernel ran on whole-matrix views, one batch per distinct matrix shape
        assert calls and all(len(s) == 2 for batch in calls for s in batch)
        seen = {s for batch in calls for s in batch}
        # (3, 8) / (8, 3) may select nothing (rho 0 for that matrix: the state-free batch)
        assert seen <= set(SHAPES) and {(6, 4), (4, 6)} <= seen, seen
        assert all(len(set(batch)) == 1 for batch in calls)
