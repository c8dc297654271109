"""``free_scale="matched"`` on the batched Triton projection path (``kernels.projection_matched``,
CPU interpreter): ``apply_projection(matched=True)`` against a float64 oracle for every apply
kernel (plain, stacked, ``projection_apply_v2`` variants), gradients with zero rows / columns
(exact zeros of sign(R): the correction kernel) included; then whole optimizer steps of the
batched path against the per-item path (``kinds.projection.apply_one``) step by step -- svd and
random bases, left and right, fp32 / tf32 products (bf16: tests/gpu), refreshes and step-plan
steps, a pending ``clip_grad_norm_``, shapes that are not tile multiples."""

from __future__ import annotations

import math

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.kernels.projection import apply_projection, project_down
from frugal_dist.kernels.refresh import random_bases
from tests.helpers import clone_params, count_matched_launches, make_params, max_diff, set_grads
from tests.triton_marks import needs_interpreter

BASE = (32, 32, 16, 4, 1)
TILES = {"plain": BASE, "stacked": (*BASE, 1), "grouped+early": (*BASE, 0, "grouped+early"),
         "seq+persist": (*BASE, 0, "seq+persist")}  # fmt: skip
HP = dict(lr=0.05, weight_decay=0.1, s_p=0.8, s_i=0.5)


def _operands(side, shape, r, zero_lines, B=3, seed=0):
    """W, G (matrix b with b * ``zero_lines`` zero rows (right) / columns (left)), P, X, U."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    G = [torch.randn(m, n, generator=gen) for _ in range(B)]
    for b, g in enumerate(G):
        k = b * zero_lines
        if side == "right":
            g[:k] = 0.0
        else:
            g[:, :k] = 0.0
    W = [torch.randn(m, n, generator=gen) for _ in range(B)]
    P = random_bases(n if side == "right" else m, r, list(range(B)), "cpu")
    X = project_down(G, P, side, precision="fp32", backend="torch")
    U = 2.0 * torch.randn(X.shape, generator=gen)  # RMS(U) ~ 2: matched differs from fixed
    return W, G, P, X, U


def _oracle(W, G, P, X, U, side, lr, weight_decay, s_p, s_i):
    """float64: W (1 - lr wd) - lr s_p (up(U) + s_i s_t sign(R)), s_t = RMS(U) / RMS(sign R)."""
    out = []
    for w, g, p, x, u in zip(W, G, P, X, U):
        w, g, p, x, u = (t.double() for t in (w, g, p, x, u))
        up_x, up_u = (p @ x, p @ u) if side == "left" else (x @ p.T, u @ p.T)
        f = torch.sign(g - up_x)
        s_t = u.square().mean().sqrt() / f.square().mean().sqrt()
        out.append(w * (1 - lr * weight_decay) - lr * s_p * (up_u + s_i * s_t * f))
    return out


@needs_interpreter
@pytest.mark.parametrize("tile", list(TILES))
@pytest.mark.parametrize("zero_lines", [0, 5])
@pytest.mark.parametrize("side,shape,r", [("right", (70, 40), 20), ("left", (40, 70), 20)])
def test_matched_apply_matches_the_oracle(tile, zero_lines, side, shape, r):
    """Shapes that are not tile multiples, a rank that is not a K-tile multiple; matrix 0 of
    each batch has no zero in R (no correction), matrices 1, 2 have 5 / 10 zero lines."""
    W, G, P, X, U = _operands(side, shape, r, zero_lines)
    want = _oracle(W, G, P, X, U, side, **HP)
    got = [w.clone() for w in W]
    apply_projection(got, G, P, X, U, side, rule="signsgd", precision="fp32", backend="triton",
                     matched=True, **HP)  # fmt: skip
    err = max(float((a.double() - b).abs().max()) for a, b in zip(got, want))
    assert err < 1e-5, err
    if tile == "plain":  # the scale is not the fixed s_i
        fixed = [w.clone() for w in W]
        apply_projection(fixed, G, P, X, U, side, rule="signsgd", precision="fp32",
                         backend="triton", **HP)  # fmt: skip
        assert max_diff(fixed, got) > 1e-2


@needs_interpreter
@pytest.mark.parametrize("tile", list(TILES))
def test_every_kernel_counts_the_zeros_and_the_fix_applies_them(tile, monkeypatch):
    """The counters the apply kernel fills (each tile variant), and the correction: without it
    (``FIX_TOL`` infinite) the matrices with zeros keep s_a = RMS(U) (the nnz = N_F guess)."""
    from frugal_dist.kernels import projection_matched as pm
    from frugal_dist.kernels.projection_triton import fused_apply

    side, (m, n), r = "right", (70, 40), 20
    W, G, P, X, U = _operands(side, (m, n), r, 5)
    factors, counters = pm.matched_operands(U)
    c_f = pm.matched_c_f(-0.02, U.shape[1] * U.shape[2])
    no_fix = [w.clone() for w in W]
    monkeypatch.setattr(pm, "FIX_TOL", math.inf)
    fused_apply(no_fix, G, P, X, U, side, decay=1.0, c_u=0.0, c_f=c_f, rule="signsgd",
                precision="fp32", tile=TILES[tile], matched=(factors, counters))  # fmt: skip
    assert counters.tolist() == [0, 5 * n, 10 * n]
    for w0, w1, u in zip(W, no_fix, U):  # s_a: every non-zero sign moved by 0.02 RMS(U)
        step = (w1 - w0).abs()
        rms = float(u.square().mean().sqrt())
        assert torch.allclose(step[step > 0], torch.full_like(step[step > 0], 0.02 * rms))
    monkeypatch.setattr(pm, "FIX_TOL", 2.0**-22)
    fixed = [w.clone() for w in W]
    factors, counters = pm.matched_operands(U)
    fused_apply(fixed, G, P, X, U, side, decay=1.0, c_u=0.0, c_f=c_f, rule="signsgd",
                precision="fp32", tile=TILES[tile], matched=(factors, counters))  # fmt: skip
    for b, (w0, w1, u) in enumerate(zip(W, fixed, U)):
        step = (w1 - w0).abs()
        rms = float(u.square().mean().sqrt())
        want = 0.02 * rms * math.sqrt(m / (m - 5 * b))  # N_F / nnz = m n / ((m - 5 b) n)
        assert torch.allclose(step[5 * b :], torch.full_like(step[5 * b :], want), rtol=1e-5)
        assert torch.all(step[: 5 * b] == 0)


@needs_interpreter
def test_matched_needs_the_triton_backend_and_a_sign_rule():
    W, G, P, X, U = _operands("right", (40, 24), 8, 0, B=1)
    with pytest.raises(ValueError, match="backend='triton'"):
        apply_projection(W, G, P, X, U, "right", lr=0.1, backend="torch", matched=True)
    from frugal_dist.kernels.projection_matched import matched_operands
    from frugal_dist.kernels.projection_triton import fused_apply

    with pytest.raises(ValueError, match="signsgd"):
        fused_apply(W, G, P, X, U, "right", decay=1.0, c_u=0.0, c_f=-0.1, rule="sgd",
                    precision="fp32", matched=matched_operands(U))  # fmt: skip


# ------------------------------------------------------------------ whole steps: batched vs item
SHAPES = [(40, 24), (40, 24), (24, 40), (24, 40), (33, 20)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=3e-3, density=0.25, update_gap=3, weight_decay=0.05, free_scale="matched",
              inactive_lr_scale=0.5, proj_params_lr_scale=0.8)  # fmt: skip
CASES = {
    "svd-right": dict(subspace="projection", proj_type="svd", proj_side="right"),
    "svd-left": dict(subspace="projection", proj_type="svd", proj_side="left"),
    "random-right": dict(subspace="projection", proj_type="random", proj_side="right"),
    "random-left": dict(subspace="projection", proj_type="random", proj_side="left"),
}


def _grads(step, zero_lines):
    """Step ``step``'s gradients; ``zero_lines``: rows 0..k and columns 0..k of every gradient
    are zero on odd steps (dead units: exact zeros of the residual for either side)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(s, generator=gen) for s in SHAPES]
    if zero_lines and step % 2:
        for g in out:
            g[:zero_lines] = 0.0
            g[:, :zero_lines] = 0.0
    return out


def _run_pair(kw, steps, zero_lines=0, clip=None, monkeypatch=None):
    """The same run with ``kernels="triton"`` (batched) and ``"auto"`` (the CPU per-item path):
    (the largest parameter difference after each step, per step of the batched run its
    (``launch_fix`` launches, per-item projection applies))."""
    calls = count_matched_launches(monkeypatch)
    ps = make_params(SHAPES)
    qs = clone_params(ps)
    fast = FRUGAL([{"params": ps, "names": NAMES}], kernels="triton", **kw)
    calls_fast = []
    slow = FRUGAL([{"params": qs, "names": NAMES}], kernels="auto", **kw)
    diffs = []
    for step in range(steps):
        grads = _grads(step, zero_lines)
        for opt, params in ((fast, ps), (slow, qs)):
            set_grads(params, grads)
            if clip is not None:
                opt.clip_grad_norm_(clip)
            before = dict(calls)
            opt.step()
            if opt is fast:
                calls_fast.append((calls["fix"] - before["fix"], calls["item"] - before["item"]))
        diffs.append(max_diff(ps, qs))
    return diffs, calls_fast


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_batched_matched_steps_equal_the_per_item_path(case, precision, monkeypatch):
    """7 steps (refreshes at 0, 3, 6; plan steps between), zero rows and columns on odd steps;
    every projection applied by the batched kernels (no ``apply_one``): float32 rounding only
    (the svd bases of the two runs: the same code on the same gradients; tf32 products are
    float32 on the CPU). bf16: tests/gpu (the interpreter's bfloat16 ``tl.dot`` is garbage,
    see tests/unit/test_kernels_projection.py)."""
    kw = {**COMMON, **CASES[case], "proj_precision": precision}
    diffs, calls = _run_pair(kw, 7, zero_lines=3, monkeypatch=monkeypatch)
    assert max(diffs) < 2e-6, diffs
    assert all(item == 0 for _, item in calls), calls
    assert all(fix == 3 for fix, _ in calls), calls  # three shape batches per step


@needs_interpreter
@pytest.mark.parametrize("case", ["svd-right", "random-left"])
def test_batched_matched_with_a_pending_clip(case, monkeypatch):
    """``clip_grad_norm_`` (max norm well below the gradients' norm): c reaches U through the
    state kernel (plan steps) or the scaled G (full steps); sign(R) is invariant."""
    kw = {**COMMON, **CASES[case], "proj_precision": "tf32"}
    diffs, calls = _run_pair(kw, 5, zero_lines=2, clip=0.5, monkeypatch=monkeypatch)
    assert max(diffs) < 2e-6, diffs
    assert all(item == 0 for _, item in calls), calls


@needs_interpreter
def test_batched_matched_differs_without_the_correction(monkeypatch):
    """The test above is sensitive to the zeros: with the correction disabled the batched run
    leaves the per-item one on the first step with zero rows."""
    from frugal_dist.kernels import projection_matched as pm

    monkeypatch.setattr(pm, "FIX_TOL", math.inf)
    kw = {**COMMON, **CASES["random-right"], "proj_precision": "fp32"}
    diffs, _ = _run_pair(kw, 2, zero_lines=3, monkeypatch=monkeypatch)
    assert diffs[0] < 2e-6 and diffs[1] > 1e-5, diffs
