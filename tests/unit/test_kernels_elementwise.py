"""``frugal_dist.kernels.elementwise`` against slow reference formulas written out here.

The torch path runs everywhere (and must round exactly as the present ``fast_apply`` code). The
Triton path runs on CUDA or under the CPU interpreter (``PYTHONPATH=$PWD:/work/triton_site
TRITON_INTERPRET=1 pytest tests/unit/test_kernels_elementwise.py``); without either, skipped.
Tolerances: float32 results against float64 formulas (moments: a few float32 ulps of |g|).
"""

from __future__ import annotations

import math

import pytest
import torch

from frugal_dist.kernels.elementwise import (
    adamw_apply_,
    coordinate_adamw_apply_,
    coordinate_positions,
    free_apply_,
)
from tests.triton_marks import needs_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]
BETAS = (0.9, 0.999)
EPS = 1e-8
# sizes: several 4096-element tiles with a tail, one exact tile, tiny ones
FREE_SIZES = [(2, 4113), (4096,), (5,), (3, 7)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed)).to(dtype).to(DEV)


# ------------------------------------------------------------------------ slow reference formulas
def ref_free(p, g, alpha, rule, decay):
    p, g = p.double(), g.double()
    d = {"signsgd": torch.sign(g), "sgd": g, "none": torch.zeros_like(g)}[rule]
    return p * (1 - decay) - alpha * d


def ref_adamw(p, g, m, v, t, lr, wd):
    """One AdamW step in float64 (torch.optim.AdamW's equations); returns (p, m, v)."""
    b1, b2 = BETAS
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    d = (m / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + EPS)
    return p * (1 - lr * wd) - lr * d, m, v


def ref_coordinate(w, g, m, v, index, t, lr, scale, free_scale, decay, rule, axis):
    """Dense mask version: AdamW on the masked entries (row-major compact order)."""
    M, N = w.shape
    mask = torch.zeros(M, N, dtype=torch.bool, device=w.device)
    if axis == "columns":
        mask[:, index] = True
    else:
        mask[index, :] = True
    b1, b2 = BETAS
    g64 = g.double()
    gs = g64[mask]
    m2 = b1 * m.double().reshape(-1) + (1 - b1) * gs
    v2 = b2 * v.double().reshape(-1) + (1 - b2) * gs * gs
    u = (m2 / (1 - b1**t)) / (v2.sqrt() / math.sqrt(1 - b2**t) + EPS)
    d = free_scale * {"signsgd": torch.sign(g64), "sgd": g64, "none": torch.zeros_like(g64)}[rule]
    d[mask] = u
    return w.double() * (1 - decay) - lr * scale * d, m2.reshape(m.shape), v2.reshape(v.shape)


def _close(a, b, rtol=2e-6, atol=1e-7):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- free
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", ["signsgd", "sgd", "none"])
@pytest.mark.parametrize("decay", [0.0, 1e-3])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_free_apply_matches_reference(impl, rule, decay, gdtype):
    ps = [_rand(s, i) for i, s in enumerate(FREE_SIZES)]
    gs = [_rand(s, 10 + i, gdtype) for i, s in enumerate(FREE_SIZES)]
    gs[0].view(-1)[:3] = 0.0  # sign(0) = 0
    want = [ref_free(p, g, 0.01, rule, decay) for p, g in zip(ps, gs)]
    free_apply_(ps, gs, 0.01, rule=rule, decay=decay, impl=impl)
    for p, w in zip(ps, want):
        _close(p, w)


@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
def test_free_torch_path_is_bit_identical_to_the_present_fast_apply(rule):
    """The present code: group-wide ``_foreach_mul_(data, 1 - lr wd)``, then
    ``_foreach_add_(data, F(g), alpha=-lr scale)``."""
    lr, wd, scale = 3e-3, 0.1, 0.5
    ps = [_rand(s, i) for i, s in enumerate(FREE_SIZES)]
    gs = [_rand(s, 10 + i) for i, s in enumerate(FREE_SIZES)]
    old = [p.clone() for p in ps]
    torch._foreach_mul_(old, 1.0 - lr * wd)
    f = torch._foreach_sign(gs) if rule == "signsgd" else gs
    torch._foreach_add_(old, f, alpha=-lr * scale)
    free_apply_(ps, gs, lr * scale, rule=rule, decay=lr * wd, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(ps, old))


@needs_triton
def test_free_apply_triton_sign_is_bit_identical_without_decay():
    """sign(g) * alpha is exact, so p - alpha sign(g) rounds once on either path."""
    ps = [_rand(s, i) for i, s in enumerate(FREE_SIZES)]
    gs = [_rand(s, 10 + i) for i, s in enumerate(FREE_SIZES)]
    qs = [p.clone() for p in ps]
    free_apply_(ps, gs, 0.01, impl="triton")
    free_apply_(qs, gs, 0.01, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(ps, qs))


@needs_triton
def test_free_apply_mixed_inputs_misaligned_and_16bit_params():
    """A view at an odd offset (no alignment hint), a non-contiguous grad and a bf16 param (both
    taken by the torch path) in one call."""
    base = _rand((4097 * 2 + 1,), 1)
    odd = base[1:].view(2, 4097)  # 4-byte aligned only
    gt = _rand((10, 10), 2).t()  # non-contiguous
    half = _rand((33,), 3, torch.bfloat16)
    ps = [odd, _rand((10, 10), 4), half]
    gs = [_rand((2, 4097), 5), gt, _rand((33,), 6)]
    want = [ref_free(p, g, 0.01, "signsgd", 0.0) for p, g in zip(ps, gs)]
    free_apply_(ps, gs, 0.01, impl="triton")
    _close(ps[0], want[0])
    _close(ps[1].reshape(-1), want[1].reshape(-1))
    _close(ps[2], want[2], rtol=1e-2, atol=1e-2)  # bf16 result, rounded once
    assert torch.equal(base[0], _rand((4097 * 2 + 1,), 1)[0])  # outside the view: untouched


# ------------------------------------------------------------------------------------ adamw
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_apply_matches_reference_over_steps(impl, wd):
    shapes = [(2, 4113), (4096,), (3, 5)]
    ps = [_rand(s, i) for i, s in enumerate(shapes)]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    ref = [(p.double(), m.double(), v.double()) for p, m, v in zip(ps, ms, vs)]
    for step in range(4):
        gs = [_rand(s, 100 * step + i) for i, s in enumerate(shapes)]
        # per-tensor counts: tensor 1 is 5 steps ahead, tensor 2 is reset at step 2
        steps = [step + 1, step + 6, step + 1 if step < 2 else step - 1]
        if step == 2:
            ms[2].zero_()
            vs[2].zero_()
            ref[2] = (ref[2][0], torch.zeros_like(ref[2][1]), torch.zeros_like(ref[2][2]))
        ref = [ref_adamw(p, g, m, v, t, 1e-3, wd) for (p, m, v), g, t in zip(ref, gs, steps)]
        adamw_apply_(ps, gs, ms, vs, steps, lr=1e-3, betas=BETAS, eps=EPS, weight_decay=wd,
                     impl=impl)  # fmt: skip
    for p, m, v, (rp, rm, rv) in zip(ps, ms, vs, ref):
        _close(p, rp, rtol=1e-5, atol=1e-7)
        _close(m, rm, rtol=1e-5, atol=1e-7)
        _close(v, rv, rtol=1e-5, atol=1e-9)


def test_adamw_cpu_path_is_bit_identical_to_core_rules():
    """On the CPU (FRUGAL's non-fused path): decay ``_foreach_mul_``, core.rules, add."""
    from frugal_dist.core.rules import state_full_directions

    shapes = [(7, 9), (33,)]
    ps = [_rand(s, i).cpu() for i, s in enumerate(shapes)]
    gs = [_rand(s, 10 + i).cpu() for i, s in enumerate(shapes)]
    ms = [_rand(s, 20 + i).cpu() * 0.1 for i, s in enumerate(shapes)]
    vs = [_rand(s, 30 + i).cpu().abs() * 0.01 for i, s in enumerate(shapes)]
    old = [p.clone() for p in ps]
    st = [{"exp_avg": m.clone(), "exp_avg_sq": v.clone()} for m, v in zip(ms, vs)]
    torch._foreach_mul_(old, 1.0 - 1e-3 * 0.1)
    for p, d in zip(old, state_full_directions("adamw", gs, st, [3, 1], BETAS, EPS)):
        p.add_(d, alpha=-1e-3)
    adamw_apply_(ps, gs, ms, vs, [3, 1], lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.1)
    assert all(torch.equal(a, b) for a, b in zip(ps, old))
    assert all(torch.equal(a, b["exp_avg_sq"]) for a, b in zip(vs, st))


# ------------------------------------------------------------------------------ coordinates
COORD_SHAPES = [(7, 1000), (2, 5000), (3, 5), (4097, 2)]


def _coord_case(shape, axis, seed, count=2):
    M, N = shape
    dim = N if axis == "columns" else M
    k = max(1, dim // 4)
    idx = [torch.randperm(dim, generator=_gen(seed + j))[:k].sort().values.to(DEV)
           for j in range(count)]  # fmt: skip
    compact = (M, k) if axis == "columns" else (k, N)
    W = [_rand(shape, seed + 10 + j) for j in range(count)]
    ms = [_rand(compact, seed + 20 + j) * 0.1 for j in range(count)]
    vs = [_rand(compact, seed + 30 + j).abs() * 0.01 for j in range(count)]
    return W, idx, ms, vs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("axis", ["columns", "rows"])
@pytest.mark.parametrize("shape", COORD_SHAPES, ids=str)
@pytest.mark.parametrize(
    "rule,free_scale,decay",
    [
        ("signsgd", 1.0, 0.0),
        ("signsgd", 0.5, 1e-3),
        ("sgd", 0.5, 0.0),
        ("none", 1.0, 1e-3),
    ],  # fmt: skip
)
def test_coordinate_adamw_apply_matches_reference(impl, axis, shape, rule, free_scale, decay):
    W, idx, ms, vs = _coord_case(shape, axis, 7)
    for step in (1, 2):
        gs = [_rand(shape, 100 * step + j) for j in range(len(W))]
        want = [ref_coordinate(w, g, m, v, ix, step, 1e-3, 0.5, free_scale, decay, rule, axis)
                for w, g, m, v, ix in zip(W, gs, ms, vs, idx)]  # fmt: skip
        coordinate_adamw_apply_(W, gs, ms, vs, idx, [step, step], lr=1e-3, scale=0.5,
                                free_scale=free_scale, betas=BETAS, eps=EPS, decay=decay,
                                free_rule=rule, axis=axis, impl=impl)  # fmt: skip
        for w, m, v, (rw, rm, rv) in zip(W, ms, vs, want):
            _close(w, rw, rtol=1e-5, atol=1e-7)
            _close(m, rm, rtol=1e-5, atol=1e-7)
            _close(v, rv, rtol=1e-5, atol=1e-9)


def test_coordinate_torch_path_is_bit_identical_to_the_present_code():
    """The present path: decay mul; gather + core.rules; sign, mul s_i, index_copy_; add."""
    from frugal_dist.core.rules import state_full_directions

    W, idx, ms, vs = _coord_case((6, 40), "columns", 3)
    gs = [_rand((6, 40), 50 + j) for j in range(2)]
    old = [w.clone() for w in W]
    st = [{"exp_avg": m.clone(), "exp_avg_sq": v.clone()} for m, v in zip(ms, vs)]
    torch._foreach_mul_(old, 1.0 - 1e-3 * 0.1)
    u = state_full_directions("adamw", [g.index_select(1, i) for g, i in zip(gs, idx)], st,
                              [4, 4], BETAS, EPS)  # fmt: skip
    full = torch._foreach_sign(gs)
    torch._foreach_mul_(full, 0.5)
    for f, ui, i in zip(full, u, idx):
        f.index_copy_(1, i, ui)
    torch._foreach_add_(old, full, alpha=-1e-3 * 2.0)
    coordinate_adamw_apply_(W, gs, ms, vs, idx, [4, 4], lr=1e-3, scale=2.0, free_scale=0.5,
                            betas=BETAS, eps=EPS, decay=1e-3 * 0.1, impl="torch")  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(W, old))
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(ms, st))


@needs_triton
def test_coordinate_triton_takes_precomputed_positions_and_bf16_grads():
    W, idx, ms, vs = _coord_case((5, 300), "columns", 11)
    pos = [coordinate_positions(i, 300) for i in idx]
    gs = [_rand((5, 300), 60 + j, torch.bfloat16) for j in range(2)]
    want = [ref_coordinate(w, g, m, v, ix, 1, 1e-3, 1.0, 1.0, 0.0, "signsgd", "columns")
            for w, g, m, v, ix in zip(W, gs, ms, vs, idx)]  # fmt: skip
    coordinate_adamw_apply_(W, gs, ms, vs, idx, [1, 1], lr=1e-3, betas=BETAS, eps=EPS,
                            positions=pos, impl="triton")  # fmt: skip
    for w, (rw, _, _) in zip(W, want):
        _close(w, rw, rtol=1e-5, atol=1e-7)


def test_coordinate_positions():
    pos = coordinate_positions(torch.tensor([1, 4, 5]), 7)
    assert pos.tolist() == [-1, 0, -1, -1, 1, 2, -1] and pos.dtype == torch.int32
    with pytest.raises(ValueError, match="positions in"):
        coordinate_positions(torch.tensor([7]), 7)


# ------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_field():
    p, g = [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(ValueError, match="rule must be one of"):
        free_apply_(p, g, 0.1, rule="sign")
    with pytest.raises(ValueError, match="differ in length"):
        free_apply_(p, [], 0.1)
    with pytest.raises(ValueError, match="grads\\[0\\] has 4 elements"):
        free_apply_(p, [torch.zeros(4)], 0.1)
    with pytest.raises(ValueError, match="impl must be one of"):
        free_apply_(p, g, 0.1, impl="cuda")
    with pytest.raises(ValueError, match="steps\\[0\\] = 0"):
        adamw_apply_(p, g, [torch.zeros(3)], [torch.zeros(3)], [0], lr=1e-3, betas=BETAS, eps=EPS)
    W = [torch.zeros(4, 6), torch.zeros(6, 4)]
    idx = [torch.tensor([0, 1])] * 2
    with pytest.raises(ValueError, match="group the tensors by shape"):
        coordinate_adamw_apply_(W, W, [torch.zeros(4, 2)] * 2, [torch.zeros(4, 2)] * 2, idx,
                                [1, 1], lr=1e-3, betas=BETAS, eps=EPS)  # fmt: skip
    with pytest.raises(ValueError, match="axis must be one of"):
        coordinate_adamw_apply_(W[:1], W[:1], [torch.zeros(4, 2)], [torch.zeros(4, 2)], idx[:1],
                                [1], lr=1e-3, betas=BETAS, eps=EPS, axis="randk")  # fmt: skip
    with pytest.raises(ValueError, match=r"must be \(4, 2\)"):
        coordinate_adamw_apply_(W[:1], W[:1], [torch.zeros(2, 4)], [torch.zeros(2, 4)], idx[:1],
                                [1], lr=1e-3, betas=BETAS, eps=EPS)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_16bit_grads_are_promoted_on_every_path(impl):
    """AdamW and coordinate kernels take bf16 gradients as float32 values (the torch path
    converts them, the Triton kernels load them as float32)."""
    ps = [_rand((3, 50), 1)]
    gs = [_rand((3, 50), 2, torch.bfloat16)]
    m, v = [torch.zeros(3, 50, device=DEV)], [torch.zeros(3, 50, device=DEV)]
    want = ref_adamw(ps[0], gs[0], m[0], v[0], 1, 1e-3, 0.0)[0]
    if impl == "triton":  # the Triton AdamW kernel takes float32 grads only
        with pytest.raises(ValueError, match="contiguous float32"):
            adamw_apply_(ps, gs, m, v, [1], lr=1e-3, betas=BETAS, eps=EPS, impl=impl)
    else:
        adamw_apply_(ps, gs, m, v, [1], lr=1e-3, betas=BETAS, eps=EPS, impl=impl)
        _close(ps[0], want, rtol=1e-5, atol=1e-7)
    W, idx, ms, vs = _coord_case((6, 40), "rows", 5)
    G = [_rand((6, 40), 70 + j, torch.bfloat16) for j in range(2)]
    want = [ref_coordinate(w, g, mi, vi, ix, 1, 1e-3, 1.0, 1.0, 0.0, "signsgd", "rows")[0]
            for w, g, mi, vi, ix in zip(W, G, ms, vs, idx)]  # fmt: skip
    coordinate_adamw_apply_(W, G, ms, vs, idx, [1, 1], lr=1e-3, betas=BETAS, eps=EPS,
                            axis="rows", impl=impl)  # fmt: skip
    for w, rw in zip(W, want):
        _close(w, rw, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- the integration contract
ORACLE_SHAPES = [(6, 40), (40, 6), (6, 40), (6, 40), (40, 6), (33,)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("subspace", ["block", "columns", "rows"])
def test_kernel_step_reproduces_the_reference_frugal(impl, subspace):
    """A FRUGAL step written with these kernels as the module docstring's contract says (decay
    inside the kernels, host step counts, shape batches) follows ``core.reference``'s oracle."""
    from frugal_dist.core.reference import ReferenceFRUGAL
    from frugal_dist.core.seeding import block_seed, coordinate_seed
    from frugal_dist.core.subspaces import BlockSchedule, coordinate_selection, matrix_shape

    lr, wd, rho, s_p, s_i = 1e-2, 0.1, 0.5, 0.5, 0.25
    names = [f"w{i}" for i in range(len(ORACLE_SHAPES))]
    ref_p = [torch.nn.Parameter(_rand(s, i)) for i, s in enumerate(ORACLE_SHAPES)]
    mine = [p.detach().clone() for p in ref_p]
    opts = dict(block_order="descending") if subspace == "block" else dict(coord_choice=subspace)
    ref = ReferenceFRUGAL(list(zip(names, ref_p)), lr=lr, density=rho, update_gap=100,
                          subspace="block" if subspace == "block" else "coordinate",
                          inactive_lr_scale=s_i, proj_params_lr_scale=s_p, weight_decay=wd,
                          seed=3, **opts)  # fmt: skip
    if subspace == "block":
        active = BlockSchedule(len(names), rho, "descending", block_seed(3, names)).active(0)
        act = [i for i in range(len(names)) if i in active]
        free = [i for i in range(len(names)) if i not in active]
        state = [(torch.zeros_like(mine[i]), torch.zeros_like(mine[i])) for i in act]
    else:
        dim = 1 if subspace == "columns" else 0
        sels = [coordinate_selection(matrix_shape(p.shape), rho, subspace,
                                     coordinate_seed(3, n, 0)).index.to(DEV)
                for n, p in zip(names, mine)]  # fmt: skip
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(mine):
            groups.setdefault(tuple(p.shape), []).append(i)
        state = {}
        for i, p in enumerate(mine):
            shape = list(matrix_shape(p.shape))
            shape[dim] = sels[i].numel()
            state[i] = (torch.zeros(shape, device=DEV), torch.zeros(shape, device=DEV))
    for t in range(1, 4):
        gs = [_rand(s, 40 * t + i) for i, s in enumerate(ORACLE_SHAPES)]
        for p, g in zip(ref_p, gs):
            p.grad = g.clone()
        ref.step()
        if subspace == "block":
            adamw_apply_([mine[i] for i in act], [gs[i] for i in act], [m for m, _ in state],
                         [v for _, v in state], [t] * len(act), lr=lr * s_p,
                         weight_decay=wd / s_p, betas=BETAS, eps=EPS, impl=impl)  # fmt: skip
            free_apply_([mine[i] for i in free], [gs[i] for i in free], lr * s_p * s_i,
                        decay=lr * wd, impl=impl)  # fmt: skip
            continue
        for members in groups.values():
            coordinate_adamw_apply_(
                [mine[i] for i in members], [gs[i] for i in members],
                [state[i][0] for i in members], [state[i][1] for i in members],
                [sels[i] for i in members], [t] * len(members), lr=lr, scale=s_p,
                free_scale=s_i, betas=BETAS, eps=EPS, decay=lr * wd, axis=subspace, impl=impl,
            )  # fmt: skip
    for a, b in zip(mine, ref_p):
        _close(a, b.detach(), rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_int64_offsets_and_vector_coordinate_variants(monkeypatch):
    """The WIDE (int64 offset) kernels, used from 2^31 elements, forced on small tensors, and the
    coordinate kernel with 128-bit W / G access (``COORD_VECTOR``)."""
    from frugal_dist.kernels import elementwise_triton as tk

    monkeypatch.setattr(tk, "_wide", lambda numel: True)
    monkeypatch.setattr(tk, "COORD_VECTOR", True)
    ps = [_rand(s, i) for i, s in enumerate(FREE_SIZES)]
    gs = [_rand(s, 10 + i) for i, s in enumerate(FREE_SIZES)]
    want = [ref_free(p, g, 0.01, "signsgd", 1e-3) for p, g in zip(ps, gs)]
    free_apply_(ps, gs, 0.01, decay=1e-3, impl="triton")
    for p, w in zip(ps, want):
        _close(p, w)
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    want = [ref_adamw(p, g, m, v, 1, 1e-3, 0.1) for p, g, m, v in zip(ps, gs, ms, vs)]
    adamw_apply_(ps, gs, ms, vs, [1] * len(ps), lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.1,
                 impl="triton")  # fmt: skip
    for p, (w, _, _) in zip(ps, want):
        _close(p, w, rtol=1e-5, atol=1e-7)
    for axis in ("columns", "rows"):
        W, idx, cm, cv = _coord_case((7, 1000), axis, 13)
        G = [_rand((7, 1000), 80 + j) for j in range(2)]
        want = [ref_coordinate(w, g, mi, vi, ix, 2, 1e-3, 1.0, 0.5, 1e-3, "signsgd", axis)[0]
                for w, g, mi, vi, ix in zip(W, G, cm, cv, idx)]  # fmt: skip
        kw = dict(lr=1e-3, free_scale=0.5, betas=BETAS, eps=EPS, decay=1e-3, axis=axis)
        coordinate_adamw_apply_(W, G, cm, cv, idx, [2, 2], impl="triton", **kw)
        for w, rw in zip(W, want):
            _close(w, rw, rtol=1e-5, atol=1e-7)
