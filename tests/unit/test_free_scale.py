"""``free_scale="matched"`` (the state-free step scaled per tensor to the state-full update's
RMS): the fast path against the oracle step by step, the scale's equation on one step written
out here, the replicated engines (sign vote, shard_state inside one process: see
tests/distributed), and what is refused."""

from __future__ import annotations

import math
import os

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.kernels.elementwise import triton_available
from tests.helpers import SHAPES, clone_params, grad_stream, make_params, max_diff, set_grads

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
CASES = {
    "svd-right": dict(subspace="projection", proj_type="svd", proj_side="right"),
    "svd-left": dict(subspace="projection", proj_type="svd", proj_side="left"),
    "random": dict(subspace="projection", proj_type="random"),
    "randperm-left": dict(subspace="projection", proj_type="randperm", proj_side="left"),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "rows": dict(subspace="coordinate", coord_choice="rows"),
    "randk": dict(subspace="coordinate", coord_choice="randk"),
}
COMMON = dict(lr=3e-3, density=0.25, update_gap=5, weight_decay=0.05, free_scale="matched",
              inactive_lr_scale=0.5)  # fmt: skip
STEPS = 13  # refreshes at 0, 5, 10; steps between them replay the cached step plan


def _pair(kw: dict):
    ps = make_params()
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    return ps, qs, opt, ref


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_matched_matches_oracle_step_by_step(name, rule):
    kw = {**COMMON, **CASES[name], "state_full": rule}
    # svd bases of the two implementations differ by ~4e-6 (float32 subspace iteration of
    # nearby singular values); random bases and coordinates: the same bits
    tol = 1e-4 if CASES[name].get("proj_type") == "svd" else 1e-5
    ps, qs, opt, ref = _pair(kw)
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        assert max_diff(ps, qs) < tol, (name, step, max_diff(ps, qs))


@pytest.mark.parametrize("name", ["random", "columns"])
def test_matched_differs_from_fixed(name):
    """The option changes the run, and ``fixed`` is the default (bit-identical to omitting it)."""
    out = {}
    for scale in ("fixed", "matched", None):
        ps = make_params()
        kw = {**COMMON, **CASES[name]}
        if scale is None:
            kw.pop("free_scale")
        else:
            kw["free_scale"] = scale
        opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
        for grads in grad_stream(SHAPES, 6):
            set_grads(ps, grads)
            opt.step()
        out[scale] = ps
    assert max_diff(out["fixed"], out["matched"]) > 1e-4
    assert max_diff(out["fixed"], out[None]) == 0.0


def test_matched_scale_of_one_step_written_out():
    """One step of a right randperm projection with AdamW from zero moments: U = sign(G P)
    (bias-corrected first step, up to eps), so RMS(U) = 1; the residual is exactly zero on the r
    selected columns, so RMS(sign(R)) = sqrt(1 - r/n) and s_t = 1 / sqrt(1 - r/n). A second
    step's s_t is RMS(U_2) / sqrt(1 - r/n), U_2 recomputed from the moments."""
    torch.manual_seed(0)
    w = torch.randn(16, 8)
    p = torch.nn.Parameter(w.clone())
    kw = dict(lr=1e-2, density=0.5, subspace="projection", proj_type="randperm",
              proj_side="right", free_scale="matched", inactive_lr_scale=0.3)  # fmt: skip
    opt = FRUGAL([{"params": [p], "names": ["w"]}], **kw)
    g = torch.randn(16, 8)
    p.grad = g.clone()
    opt.step()
    basis = opt.selections_in_use()["w"][1].basis
    g_sf = g @ basis
    resid = g - g_sf @ basis.T
    u = torch.sign(g_sf)  # AdamW's first step: m_hat / sqrt(v_hat) = sign (eps ~ 1e-8 off)
    frac = float((torch.sign(resid) != 0).double().mean())
    assert frac == 0.5  # r = 4 of n = 8 columns
    expect = w - 1e-2 * (u @ basis.T) - 1e-2 * 0.3 / math.sqrt(frac) * torch.sign(resid)
    assert torch.allclose(p.detach(), expect, atol=1e-6)
    # second step: s_t = RMS(U_2) / 1
    w1 = p.detach().clone()
    g2 = torch.randn(16, 8)
    p.grad = g2.clone()
    opt.step()
    st = opt.state[p]
    b1, b2 = 0.9, 0.999
    u2 = (st["exp_avg"] / (1 - b1**2)) / ((st["exp_avg_sq"] / (1 - b2**2)).sqrt() + 1e-8)
    s_t = math.sqrt(float((u2**2).mean())) / math.sqrt(frac)
    r2 = g2 - (g2 @ basis) @ basis.T
    expect2 = w1 - 1e-2 * (u2 @ basis.T) - 1e-2 * 0.3 * s_t * torch.sign(r2)
    assert 0.1 < s_t * math.sqrt(frac) < 0.99
    assert torch.allclose(p.detach(), expect2, atol=1e-6)


def test_matched_under_sign_vote_matches_oracle():
    """``residual_comm="sign"`` inside one process is not available (it needs ranks); the
    oracle's vote path is compared with the fast path in tests/distributed. Here: the oracle's
    matched scale over a vote counts only non-zero (untied) signs."""
    q = torch.nn.Parameter(torch.zeros(4, 4))
    ref = ReferenceFRUGAL([("w", q)], lr=1.0, density=0.25, subspace="coordinate",
                          coord_choice="columns", free_scale="matched", update_gap=10)  # fmt: skip
    g1, g2 = torch.ones(4, 4), -torch.ones(4, 4)
    g2[0, :] = 1.0  # row 0: both voters +1, elsewhere a tie (vote 0)
    q.grad = (g1 + g2) / 2
    ref.step({"w": [g1, g2]})
    # U: AdamW's first step, sign of the mean gradient on the selected column (0 where the mean
    # is 0): rows 1-3 of the mean are 0, row 0 is 1 -> RMS(U) = sqrt(1/4)
    moved = q.detach()
    mask = ref.state["w"]["mask"]
    free_rows = moved[0][~mask[0]]
    # F: +1 on row 0's 3 unselected entries, 0 elsewhere: RMS(F) = sqrt(3/12); s_t = 1
    assert torch.allclose(free_rows, torch.full_like(free_rows, -1.0))
    assert torch.all(moved[1:][~mask[1:]] == 0.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(subspace="block"), "subspace='block'"),
        (dict(subspace="projection", density=0.0), "density=0"),
        (dict(subspace="coordinate", density=0.0), "density=0"),
        (dict(subspace="projection", free_scale="matchd"), "free_scale must be one of"),
    ],
)
def test_refused(kw, match):
    args = {"free_scale": "matched", **kw}
    with pytest.raises(ValueError, match=match) as e:
        FRUGAL([{"params": make_params(), "names": NAMES}], **args)
    assert "free_scale" in str(e.value)


def test_refused_in_an_added_group_keeps_the_optimizer():
    ps = make_params()
    opt = FRUGAL([{"params": ps[:2], "names": NAMES[:2]}], subspace="block")
    with pytest.raises(ValueError, match="free_scale"):
        opt.add_param_group({"params": ps[2:], "names": NAMES[2:], "free_scale": "matched"})
    assert len(opt.param_groups) == 1


def test_other_groups_are_unaffected():
    """An AdamW group next to a matched group ignores the option (whole-tensor rule)."""
    ps = make_params()
    opt = FRUGAL([{"params": ps[:2], "names": NAMES[:2], "algorithm": "adamw"},
                  {"params": ps[2:], "names": NAMES[2:]}], subspace="coordinate",
                 free_scale="matched", lr=1e-2)  # fmt: skip
    qs = clone_params(ps)
    plain = torch.optim.AdamW(qs[:2], lr=1e-2, weight_decay=0.0)
    for grads in grad_stream(SHAPES, 4):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        plain.step()
    assert max_diff(ps[:2], qs[:2]) < 1e-6


@pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" and triton_available()),
    reason="needs TRITON_INTERPRET=1, triton",
)
@pytest.mark.parametrize("name", ["svd-right", "random", "columns", "rows"])
def test_matched_with_triton_kernels_matches_oracle(name):
    """``kernels="triton"`` (the CUDA routing, interpreted): matched projections take the batched
    kernels (``kernels.projection_matched``; against the per-item path:
    tests/unit/test_projection_matched.py), coordinates the per-item path; both match the
    oracle, step plans included."""
    kw = {**COMMON, **CASES[name], "proj_precision": "fp32"}
    tol = 1e-4 if CASES[name].get("proj_type") == "svd" else 1e-5
    ps = make_params()
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], kernels="triton", **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    for step, grads in enumerate(grad_stream(SHAPES, 8)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        assert max_diff(ps, qs) < tol, (name, step, max_diff(ps, qs))
