"""The compiled Triton kernels of ``frugal_dist.kernels.elementwise`` on CUDA: against the torch
path and float64 formulas at LLaMA-like shapes (several tiles, odd widths, a tail), 16-bit grads,
misaligned views, and no host sync in steady state. Skipped without CUDA or triton."""

from __future__ import annotations

import math

import pytest
import torch

from frugal_dist.kernels.elementwise import (
    adamw_apply_,
    coordinate_adamw_apply_,
    coordinate_positions,
    free_apply_,
    triton_available,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
]
BETAS = (0.9, 0.999)
EPS = 1e-8
# LLaMA-1B layer widths scaled down in rows: odd N (5461) crosses rows inside a tile
SHAPES = [(64, 2048), (40, 5461), (96, 2048), (2048,), (7, 3)]


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda").to(dtype)


@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.0, 1e-4])
def test_free_apply_triton_matches_torch_path(rule, gdtype, decay):
    ps = [_rand(s, i) for i, s in enumerate(SHAPES)]
    gs = [_rand(s, 50 + i, gdtype) for i, s in enumerate(SHAPES)]
    qs = [p.clone() for p in ps]
    for _ in range(3):
        free_apply_(ps, gs, 1e-3, rule=rule, decay=decay, impl="triton")
        free_apply_(qs, gs, 1e-3, rule=rule, decay=decay, impl="torch")
    for p, q in zip(ps, qs):
        if rule == "signsgd" and decay == 0.0:
            assert torch.equal(p, q)  # alpha * sign(g) is exact: one rounding on both paths
        else:  # FMA contraction: at most a float32 ulp of p per step
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_free_apply_misaligned_view():
    base = _rand((5461 * 3 + 1,), 0)
    view = base[1:].view(3, 5461)
    g = _rand((3, 5461), 1)
    want = view.double() - 1e-3 * torch.sign(g.double())
    free_apply_([view], [g], 1e-3, impl="triton")
    torch.testing.assert_close(view.double(), want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_triton_matches_fused_and_float64(wd):
    ps = [_rand(s, i) for i, s in enumerate(SHAPES)]
    qs = [p.clone() for p in ps]
    ref = [p.double() for p in ps]
    m1, v1 = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    m2, v2 = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    rm, rv = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    b1, b2 = BETAS
    for t in range(1, 6):
        gs = [_rand(s, 100 * t + i) for i, s in enumerate(SHAPES)]
        steps = [t] * len(ps)
        adamw_apply_(ps, gs, m1, v1, steps, lr=1e-3, betas=BETAS, eps=EPS, weight_decay=wd,
                     impl="triton")  # fmt: skip
        adamw_apply_(qs, gs, m2, v2, steps, lr=1e-3, betas=BETAS, eps=EPS, weight_decay=wd,
                     impl="torch")  # fmt: skip
        for i, g in enumerate(gs):
            g = g.double()
            rm[i] = b1 * rm[i] + (1 - b1) * g
            rv[i] = b2 * rv[i] + (1 - b2) * g * g
            d = (rm[i] / (1 - b1**t)) / (rv[i].sqrt() / math.sqrt(1 - b2**t) + EPS)
            ref[i] = ref[i] * (1 - 1e-3 * wd) - 1e-3 * d
    for p, q, r in zip(ps, qs, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(p.double(), r, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("axis", ["columns", "rows"])
@pytest.mark.parametrize("shape", [(64, 2048), (40, 5461), (5461, 40)], ids=str)
def test_coordinate_triton_matches_torch_path(axis, shape):
    M, N = shape
    dim = N if axis == "columns" else M
    k = round(0.25 * dim)
    gen = torch.Generator().manual_seed(3)
    idx = [torch.randperm(dim, generator=gen)[:k].sort().values.cuda() for _ in range(3)]
    compact = (M, k) if axis == "columns" else (k, N)
    W = [_rand(shape, i) for i in range(3)]
    Wt = [w.clone() for w in W]
    m1 = [torch.zeros(compact, device="cuda") for _ in range(3)]
    v1 = [torch.zeros(compact, device="cuda") for _ in range(3)]
    m2, v2 = [x.clone() for x in m1], [x.clone() for x in v1]
    pos = [coordinate_positions(i, dim) for i in idx]
    for t in range(1, 4):
        gs = [_rand(shape, 10 * t + i) for i in range(3)]
        kw = dict(lr=1e-3, scale=0.5, free_scale=0.25, betas=BETAS, eps=EPS, decay=1e-4,
                  axis=axis)  # fmt: skip
        coordinate_adamw_apply_(W, gs, m1, v1, idx, [t] * 3, positions=pos, impl="triton", **kw)
        coordinate_adamw_apply_(Wt, gs, m2, v2, idx, [t] * 3, impl="torch", **kw)
    for a, b in zip(W + m1 + v1, Wt + m2 + v2):  # FMA contraction: float32 ulps of |g|
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_host_sync_in_steady_state():
    ps = [_rand(s, i) for i, s in enumerate(SHAPES)]
    gs = [_rand(s, 50 + i) for i, s in enumerate(SHAPES)]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    W = [_rand((40, 5461), i) for i in range(2)]
    G = [_rand((40, 5461), 9 + i) for i in range(2)]
    idx = [torch.arange(0, 5461, 4, device="cuda")] * 2
    cm = [torch.zeros(40, idx[0].numel(), device="cuda") for _ in range(2)]
    cv = [torch.zeros_like(x) for x in cm]
    pos = [coordinate_positions(i, 5461) for i in idx]

    def step(t):
        free_apply_(ps, gs, 1e-3, decay=1e-4, impl="triton")
        adamw_apply_(ps, gs, ms, vs, [t] * len(ps), lr=1e-3, betas=BETAS, eps=EPS,
                     impl="triton")  # fmt: skip
        adamw_apply_(ps, gs, ms, vs, [t] * len(ps), lr=1e-3, betas=BETAS, eps=EPS, impl="torch")
        coordinate_adamw_apply_(W, G, cm, cv, idx, [t, t], lr=1e-3, betas=BETAS, eps=EPS,
                                positions=pos, impl="triton")  # fmt: skip

    step(1)  # compiles the kernels, builds the tile maps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(2, 5):
            step(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in ps + W)


def test_coordinate_positions_without_sync():
    idx = torch.tensor([3, 1000, 5460], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pos = coordinate_positions(idx, 5461)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pos[[3, 1000, 5460]].tolist() == [0, 1, 2] and int((pos >= 0).sum()) == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensors_on_a_device_other_than_the_current_one():
    ps = [torch.randn(3, 5000, device="cuda:1")]
    gs = [torch.randn(3, 5000, device="cuda:1")]
    want = ps[0].double() - 1e-3 * torch.sign(gs[0].double())
    with torch.cuda.device(0):
        free_apply_(ps, gs, 1e-3, impl="triton")
    torch.testing.assert_close(ps[0].double(), want, rtol=1e-7, atol=1e-9)
