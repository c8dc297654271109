"""Host cost of a FRUGAL step between refreshes: tensor ops must not grow per parameter.

On a GPU the step is launch-bound, so what matters is how many ATen ops (about one launch each)
a step dispatches. Ops whose inputs are only the 0-dim CPU step counters stay on the host and are
not counted. Block / AdamW / rho = 0 steps must dispatch the same number of tensor ops for 8 and
for 32 parameters (everything goes through foreach / fused kernels); coordinate and projection
steps may add only their per-tensor index / GEMM ops.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from frugal_dist import FRUGAL


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_flatten((args, kwargs or {}))[0]
        ptrs = tuple(t.data_ptr() for t in leaves if isinstance(t, torch.Tensor))
        self.calls.append((func._schema.name, ptrs))
        return func(*args, **(kwargs or {}))


def _tensor_ops(n: int, **opts) -> dict[str, int]:
    """Per-op counts of the third step (no refresh), counter-only ops left out."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(12, 8, generator=gen)) for _ in range(n)]
    norms = [torch.nn.Parameter(torch.randn(8, generator=gen)) for _ in range(n // 4)]
    for p in mats + norms:
        p.grad = torch.randn(p.shape, generator=gen)
    groups = [
        {"params": mats, "names": [f"m{i}" for i in range(n)]},
        {"params": norms, "names": [f"n{i}" for i in range(len(norms))], "algorithm": "adamw"},
    ]
    opt = FRUGAL(groups, lr=1e-3, update_gap=100, fused=True, **opts)
    opt.step()
    opt.step()
    mode = _Ops()
    with mode:
        opt.step()
    counters = {t.data_ptr() for st in opt.state.values() for t in st.values() if t.dim() == 0}
    out: dict[str, int] = {}
    for name, ptrs in mode.calls:
        if ptrs and all(p in counters for p in ptrs):
            continue
        out[name] = out.get(name, 0) + 1
    return out


@pytest.mark.parametrize(
    "opts",
    [
        dict(subspace="block", density=0.25),
        dict(subspace="block", density=0.0),
        dict(algorithm="adamw"),
    ],
    ids=["block", "block-rho0", "adamw"],
)
def test_tensor_ops_do_not_grow_with_parameters(opts):
    small, large = _tensor_ops(8, **opts), _tensor_ops(32, **opts)
    assert small == large, (small, large)
    assert sum(large.values()) <= 16, large


def test_coordinate_rho0_adds_only_the_empty_gather():
    """rho = 0 coordinates: the update is one batched sign / add; only the (empty) compact
    gradient is still gathered per tensor (its empty state keeps advancing)."""
    small = _tensor_ops(8, subspace="coordinate", density=0.0)
    large = _tensor_ops(32, subspace="coordinate", density=0.0)
    grown = {k: large[k] - small.get(k, 0) for k in large if large[k] != small.get(k, 0)}
    assert grown == {"aten::index_select": 24}, (small, large)


@pytest.mark.parametrize(
    "opts, per_tensor",
    [
        (dict(subspace="coordinate", density=0.25), {"aten::index_select", "aten::index_copy_"}),
        (dict(subspace="projection", density=0.25), {"aten::mm", "aten::addmm", "aten::addmm_"}),
    ],
    ids=["coordinate", "projection"],
)
def test_split_subspaces_add_only_their_per_tensor_ops(opts, per_tensor):
    small, large = _tensor_ops(8, **opts), _tensor_ops(32, **opts)
    grown = {k for k in large if large[k] != small.get(k, 0)}
    # per-tensor GEMMs / index ops (and, for right projections, the transposes they take)
    assert grown <= per_tensor | {"aten::permute"}, (small, large)
    for name in per_tensor:
        assert large[name] - small.get(name, 0) == 24, (name, small, large)
