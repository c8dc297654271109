"""``moment_transfer="rotate"`` (projection moments carried into the new basis at a refresh):
the fast path against the oracle step by step, the rotation's equations, and what is refused."""

from __future__ import annotations

import os

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.kernels.elementwise import triton_available
from frugal_dist.optim.moment_transfer import basis_change, rotate_moments
from tests.helpers import SHAPES, clone_params, grad_stream, make_params, max_diff, set_grads

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
CASES = [
    dict(proj_type="random", proj_side="left"),
    dict(proj_type="random", proj_side="right"),
    dict(proj_type="random", proj_side="auto", proj_qr_device="param"),  # on-device draw path
    dict(proj_type="randperm", proj_side="left"),
    dict(proj_type="svd", proj_side="left"),
    dict(proj_type="svd", proj_side="right"),
    dict(proj_type="svd", proj_side="auto", svd_method="exact"),
]
# density 0.25: no svd basis of full rank min(m, n), whose residual is round-off and whose sign
# differs between any two implementations
COMMON = dict(lr=3e-3, density=0.25, update_gap=5, subspace="projection", weight_decay=0.05,
              moment_transfer="rotate")  # fmt: skip
STEPS = 23  # refreshes at steps 0, 5, 10, 15, 20: four carry-overs


def _ids(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


def _oracle_kw(kw: dict) -> dict:
    kw = dict(kw)
    kw.pop("kernels", None)
    if kw.pop("proj_qr_device", None) == "param":
        kw["random_device"] = "cpu"  # the optimizer's on-device draw, on the CPU here
    return kw


def _pair(kw: dict):
    ps = make_params()
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **_oracle_kw(kw))
    return ps, qs, opt, ref


def _check_state(opt: FRUGAL, ps, ref: ReferenceFRUGAL, step: int, rule: str, tol: float) -> None:
    for name, p in zip(NAMES, ps):
        st, rst = opt.state[p], ref.state[name]
        assert int(st["sf_step"]) == rst["t"], (name, step)
        first = st["momentum_buffer"] if rule == "sgdm" else st["exp_avg"]
        assert torch.allclose(first, rst["m"], atol=tol, rtol=tol), (name, step)
        if rule == "adamw":
            assert torch.allclose(st["exp_avg_sq"], rst["v"], atol=1e-6, rtol=1e-4), (name, step)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("rule", ["adamw", "sgdm", "lion"])
def test_rotate_matches_oracle_step_by_step(case, rule):
    kw = {**COMMON, **case, "state_full": rule}
    # svd bases of the two implementations differ by ~4e-6 (float32 subspace iteration of
    # nearby singular values), which moves O(2) moments by ~7e-5 with moment_transfer="none" as
    # well (SGDM's unnormalised momentum, O(5): ~7e-4 with "none" too); random bases: same bits
    tol = 1e-3 if case["proj_type"] == "svd" else 1e-5
    ps, qs, opt, ref = _pair(kw)
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        _check_state(opt, ps, ref, step, rule, tol)
        assert max_diff(ps, qs) < 1e-5, step
    # bias correction never restarted: the count is the number of steps
    assert all(int(opt.state[p]["sf_step"]) == STEPS for p in ps)


@pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" and triton_available()),
    reason="needs TRITON_INTERPRET=1, triton",
)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[5]], ids=_ids)
def test_rotate_through_the_batched_kernels(case):
    """The batched down / fused AdamW state / fused apply kernels (``kernels="triton"``, the
    CUDA path, here interpreted; fp32: the interpreter's bfloat16 dot is unusable) read the
    rotated moments in place, and the step plans between refreshes keep them."""
    kw = {**COMMON, **case, "kernels": "triton", "proj_precision": "fp32"}
    ps, qs, opt, ref = _pair(kw)
    tol = 1e-3 if case["proj_type"] == "svd" else 1e-5
    for step, grads in enumerate(grad_stream(SHAPES, 13)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        _check_state(opt, ps, ref, step, "adamw", tol)
        assert max_diff(ps, qs) < 1e-5, step


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:6], ids=_ids)
def test_rotate_differs_from_reset(case):
    """The option changes the run (the moments are carried, not zeroed)."""
    out = []
    for transfer in ("none", "rotate"):
        ps = make_params()
        kw = {**COMMON, **case, "moment_transfer": transfer}
        opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
        for grads in grad_stream(SHAPES, 12):
            set_grads(ps, grads)
            opt.step()
        out.append((ps, [int(opt.state[p]["sf_step"]) for p in ps]))
    assert max_diff(out[0][0], out[1][0]) > 1e-4
    assert out[0][1] == [2] * len(SHAPES) and out[1][1] == [12] * len(SHAPES)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[5]], ids=_ids)
def test_rotate_after_reload_and_cache_loss(case):
    """The previous basis is found again after ``load_state_dict`` (random: drawn again for
    refresh k - 1; svd: the saved ``proj_basis``) and after ``reset_caches()``."""
    kw = {**COMMON, **case}
    grads = list(grad_stream(SHAPES, 17))
    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    for g in grads:
        set_grads(ps, g)
        opt.step()
    qs = make_params()
    opt2 = FRUGAL([{"params": qs, "names": NAMES}], **kw)
    for i, g in enumerate(grads):
        if i == 7:  # mid-interval: the next refresh (step 10) needs the basis of refresh 1
            saved = opt2.state_dict()
            opt2 = FRUGAL([{"params": qs, "names": NAMES}], **kw)
            opt2.load_state_dict(saved)
        if i == 14:
            opt2.reset_caches()
        set_grads(qs, g)
        opt2.step()
    assert max_diff(ps, qs) == 0.0


def test_rotation_equations():
    torch.manual_seed(0)
    p_old = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))[0].float()
    p_new = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))[0].float()
    c = basis_change(p_new, p_old)
    assert torch.allclose(c, p_new.T @ p_old, atol=1e-6)
    m, v = torch.randn(3, 5), torch.rand(3, 5)
    st = {"exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    buf = st["exp_avg"]
    rotate_moments(st, "adamw", "left", c)
    assert st["exp_avg"] is buf  # in place
    assert torch.allclose(st["exp_avg"], c @ m, atol=1e-6)
    assert torch.allclose(st["exp_avg_sq"], (c * c) @ v, atol=1e-6)
    st = {"exp_avg": m.T.clone(), "exp_avg_sq": v.T.clone()}
    rotate_moments(st, "adamw", "right", c)
    assert torch.allclose(st["exp_avg"], m.T @ c.T, atol=1e-6)
    assert torch.allclose(st["exp_avg_sq"], v.T @ (c * c).T, atol=1e-6)
    # a permutation of the basis permutes the moments exactly (v included)
    perm = torch.tensor([2, 0, 1])
    cp = basis_change(p_old[:, perm], p_old)
    st = {"exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    rotate_moments(st, "adamw", "left", cp)
    assert torch.allclose(st["exp_avg"], m[perm], atol=1e-6)
    assert torch.allclose(st["exp_avg_sq"], v[perm], atol=1e-6)
    # a first moment that is the running mean of compact gradients of G's in span(P_old) is
    # exactly the running mean of the new compact gradients after the change of basis
    gs = [p_old @ torch.randn(3, 5) for _ in range(4)]
    m_old = sum(0.5**i * (p_old.T @ g) for i, g in enumerate(gs))
    m_new = sum(0.5**i * (p_new.T @ g) for i, g in enumerate(gs))
    st = {"momentum_buffer": m_old.clone()}
    rotate_moments(st, "sgdm", "left", c)
    assert torch.allclose(st["momentum_buffer"], m_new, atol=1e-5)


def test_rotate_refused_where_meaningless():
    ps = make_params()
    for bad, needle in (
        (dict(subspace="projection", moment_transfer="spin"), "moment_transfer must be one of"),
        (dict(subspace="block", moment_transfer="rotate"), "subspace='projection'"),
        (dict(subspace="coordinate", moment_transfer="rotate"), "subspace='projection'"),
        (dict(subspace="projection", moment_transfer="rotate", reset_statistics=False),
         "reset_statistics=True"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="moment_transfer") as e:
            FRUGAL([{"params": ps, "names": NAMES, **bad}])
        assert needle in str(e.value)
    # an AdamW group inherits the option from the defaults: nothing to rotate, nothing refused
    FRUGAL([{"params": ps[:2], "names": NAMES[:2], "subspace": "projection"},
            {"params": ps[2:], "names": NAMES[2:], "algorithm": "adamw"}],
           moment_transfer="rotate")  # fmt: skip
    # a refused group added later leaves the optimizer as it was
    opt = FRUGAL([{"params": ps[:2], "names": NAMES[:2], "subspace": "projection"}])
    with pytest.raises(ValueError, match="moment_transfer"):
        opt.add_param_group({"params": ps[2:], "names": NAMES[2:], "moment_transfer": "rotate"})
    assert len(opt.param_groups) == 1


def test_default_is_paper_behaviour():
    """moment_transfer defaults to "none": bit-identical to not passing it."""
    out = []
    for extra in ({}, {"moment_transfer": "none"}):
        ps = make_params()
        opt = FRUGAL([{"params": ps, "names": NAMES}], subspace="projection", update_gap=5,
                     proj_type="svd", **extra)  # fmt: skip
        for grads in grad_stream(SHAPES, 12):
            set_grads(ps, grads)
            opt.step()
        out.append(ps)
    assert max_diff(*out) == 0.0
