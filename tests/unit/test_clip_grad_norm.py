"""``FRUGAL.clip_grad_norm_``: ``opt.clip_grad_norm_(m); opt.step()`` computes what
``torch.nn.utils.clip_grad_norm_(params, m); opt.step()`` computes, without scaling the
gradients the step reads only through their signs (``optim.clipping``).

Table-driven over the subspace kinds and rules, on full steps (refreshes, plan builds) and plan
steps (update_gap 3, 8 steps), with the clip active (norm > max_norm) and inactive. Bit-equal
everywhere but projections on plan steps, whose state reads c (P^T G) instead of P^T (c G) and
whose residual sign is taken from the unscaled G: there the measured difference is bounded.
Run on the torch path (CPU) and, under ``TRITON_INTERPRET=1``, with ``kernels="triton"`` (the
prepared plan launches and the projection state kernel read c from the device scalar)."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.optim import clipping
from tests.helpers import SHAPES, make_params, max_diff
from tests.triton_marks import needs_interpreter

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
STEPS = 8
COMMON = dict(lr=1e-2, density=0.4, update_gap=3, weight_decay=0.01)
CASES = {
    "block": dict(subspace="block"),
    "block_sgd": dict(subspace="block", state_free="sgd"),
    "rho0": dict(subspace="block", density=0.0),
    "rho0_sgd": dict(subspace="block", density=0.0, state_free="sgd"),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "rows": dict(subspace="coordinate", coord_choice="rows"),
    "columns_sgd": dict(subspace="coordinate", coord_choice="columns", state_free="sgd"),
    "columns_matched": dict(subspace="coordinate", coord_choice="columns", free_scale="matched"),
    "random": dict(subspace="projection", proj_type="random"),
    "svd": dict(subspace="projection", proj_type="svd"),
    "random_sgd": dict(subspace="projection", proj_type="random", state_free="sgd"),
    "svd_matched": dict(subspace="projection", proj_type="svd", free_scale="matched"),
    "lion_block": dict(subspace="block", state_full="lion"),
    "lion_random": dict(subspace="projection", proj_type="random", state_full="lion"),
}
PROJECTION = {"random", "svd", "svd_matched", "lion_random"}  # sign-residual projections
# max |difference| of the parameters after 8 steps at lr 1e-2 (torch path, CPU, measured at
# this commit): svd 7.5e-9 (1 of 121 entries), svd_matched 2.4e-7 (5), random and lion_random
# 0; inactive clips (c = 1) bit-equal. Rounding of c Z vs P^T (c G) only: a residual sign flip
# would move an entry by ~2 lr = 2e-2, far above this bound.
PROJECTION_TOL = 1e-6


def _opt(ps, kernels: str = "auto", whole: str = "adamw", **kw) -> FRUGAL:
    split, rest = ps[:3], ps[3:]
    return FRUGAL(
        [{"params": split, "names": NAMES[:3]},
         {"params": rest, "names": NAMES[3:], "algorithm": whole}],
        kernels=kernels, **{**COMMON, **kw},
    )  # fmt: skip


def _grads(seed: int = 1, scale: float = 1.0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(s, generator=gen) for s in SHAPES] for _ in range(STEPS)]


def _run(case: dict, max_norm: float, fused: bool, kernels: str = "auto", whole: str = "adamw",
         dtype=torch.float32, grads=None) -> tuple[list, FRUGAL, list]:  # fmt: skip
    ps = make_params(dtype=dtype)
    opt = _opt(ps, kernels, whole, **case)
    norms = []
    for gs in grads or _grads():
        for p, g in zip(ps, gs):
            p.grad = g.clone().to(dtype)
        if fused:
            norms.append(opt.clip_grad_norm_(max_norm))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(ps, max_norm))
        opt.step()
    return ps, opt, norms


def _compare(name: str, max_norm: float, kernels: str = "auto", whole: str = "adamw",
             dtype=torch.float32) -> float:  # fmt: skip
    ps, opt, norms = _run(CASES[name], max_norm, True, kernels, whole, dtype)
    qs, ref, ref_norms = _run(CASES[name], max_norm, False, kernels, whole, dtype)
    assert all(torch.equal(a, b) for a, b in zip(norms, ref_norms))  # torch's norm, bit for bit
    diff = max_diff(ps, qs)
    if name in PROJECTION:
        assert diff <= PROJECTION_TOL, diff
    else:
        assert diff == 0.0, diff
        for p, q in zip(ps, qs):
            sa, sb = opt.state[p], ref.state[q]
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    return diff


@pytest.mark.parametrize("max_norm", [0.5, 1e4])  # active (norms ~10) / inactive
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_clip_then_step(name, max_norm):
    _compare(name, max_norm)


@pytest.mark.parametrize("whole", ["signsgd", "sgd", "state_full"])
def test_whole_tensor_algorithms(whole):
    _compare("block", 0.5, whole=whole)


def test_bf16_gradients_bit_equal():
    """bf16 parameters and gradients: the scaled gradient is torch's (bf16 product), then the
    step's float32 copy is made of it."""
    _compare("block", 0.5, dtype=torch.bfloat16)
    _compare("columns", 0.5, dtype=torch.bfloat16)


def test_projection_difference_is_small_and_plan_only():
    """Projections: measured; the full steps alone (update_gap 1: every step refreshes, no plan)
    are bit-equal."""
    for name in ("random", "svd"):
        case = {**CASES[name], "update_gap": 1}
        ps, _, _ = _run(case, 0.5, True)
        qs, _, _ = _run(case, 0.5, False)
        assert max_diff(ps, qs) == 0.0
    assert _compare("random", 0.5) <= PROJECTION_TOL


def test_sign_only_gradients_are_not_scaled():
    """rho 0 with signSGD reads only signs: no gradient is multiplied (the .grad is unchanged),
    while AdamW group gradients are scaled in place by the step."""
    ps = make_params()
    opt = _opt(ps, **CASES["rho0"])
    gs = _grads()[0]
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    norm = opt.clip_grad_norm_(0.5)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, gs))  # nothing scaled by the clip
    opt.step()
    coef = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps[:3], gs[:3]))  # sign-only: untouched
    assert all(torch.equal(p.grad, g * coef) for p, g in zip(ps[3:], gs[3:]))  # AdamW: c g


@pytest.mark.parametrize("at", [0, 3, 5])  # full, refresh, plan step
def test_skipped_step_consumes_the_coefficient(at):
    grads = _grads()
    grads[at][0][0, 0] = float("nan")
    runs = []
    for fused in (True, False):
        ps = make_params()
        opt = _opt(ps, **CASES["block"])
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            if fused:
                opt.clip_grad_norm_(0.5)
            else:
                opt.step(grad_norm=torch.nn.utils.clip_grad_norm_(ps, 0.5))
                continue
            opt.step()
            assert not opt.clip_pending  # consumed, also by the skipped step
        assert opt.skipped_steps() == 1
        runs.append(ps)
    assert max_diff(*runs) == 0.0


def test_second_clip_raises_and_zero_grad_drops():
    ps = make_params()
    opt = _opt(ps, **CASES["block"])
    for p, g in zip(ps, _grads()[0]):
        p.grad = g.clone()
    opt.clip_grad_norm_(0.5)
    with pytest.raises(RuntimeError, match="twice before step"):
        opt.clip_grad_norm_(0.5)
    with pytest.raises(ValueError, match="grad_norm"):
        opt.step(grad_norm=1.0)
    opt.clip_grad_norm_(0.5)  # the failed step consumed it
    opt.zero_grad()
    for p, g in zip(ps, _grads()[0]):
        p.grad = g.clone()
    opt.clip_grad_norm_(0.5)  # zero_grad dropped it
    with pytest.raises(ValueError, match="max_norm"):
        FRUGAL(make_params()).clip_grad_norm_(0.0)


def test_total_norm_given_is_used_as_is():
    """``total_norm``: the caller's norm (e.g. in the model's parameter order, as torch's clip of
    ``model.parameters()`` sums it) replaces the one computed in param-group order."""
    runs = []
    for given in (False, True):
        ps = make_params()
        opt = _opt(ps, **CASES["columns"])
        for gs in _grads():
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            total = torch.nn.utils.get_total_norm([p.grad for p in reversed(ps)])
            got = opt.clip_grad_norm_(0.5, total_norm=total if given else None)
            if given:
                assert got is total
            opt.step()
        runs.append(ps)
    assert max_diff(*runs) < 1e-6  # the two summation orders differ by float32 rounding at most
    opt = _opt(make_params(), **CASES["columns"])
    with pytest.raises(TypeError, match="total_norm"):
        opt.clip_grad_norm_(0.5, total_norm=1.0)


def test_nonfinite_ignore_scales_every_gradient():
    """No verdict under nonfinite='ignore': the step multiplies every gradient, as torch (an
    inf norm gives c = 0: the state-free signs are then 0 too, not sign(g))."""
    grads = _grads()
    grads[4][0][0, 0] = float("inf")
    runs = []
    for fused in (True, False):
        qs = make_params()
        opt = FRUGAL([{"params": qs, "names": NAMES}], nonfinite="ignore", **COMMON)
        for gs in grads:
            for p, g in zip(qs, gs):
                p.grad = g.clone()
            if fused:
                opt.clip_grad_norm_(0.5)
            else:
                torch.nn.utils.clip_grad_norm_(qs, 0.5)
            opt.step()
        runs.append([q.detach().clone() for q in qs])
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(*runs))


def test_refused_configurations():
    ps = make_params()
    opt = _opt(ps)
    for p, g in zip(ps, _grads()[0]):
        p.grad = g.clone()
    opt.clip_grad_norm_(0.5)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    opt.clip_grad_norm_(0.5)
    sim = FRUGAL([{"params": ps, "names": NAMES}], reduce_gradients=True, **COMMON)
    sim.clip_grad_norm_(0.5)
    with pytest.raises(ValueError, match="step_ranks"):
        sim.step_ranks([[p.grad.clone() for p in ps], [p.grad.clone() for p in ps]])


def test_clip_mode_table():
    """Which items read the scaled gradient (``clipping.clip_mode``), by the items of a step."""
    ps = make_params()
    seen = {}
    for name in ("block", "block_sgd", "rho0", "columns", "random", "random_sgd"):
        opt = _opt(ps, **CASES[name])
        for gs in _grads()[:2]:  # the second step builds the plan
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        plan = opt.step_plan()
        seen[name] = sorted({clipping.clip_mode(it) for it in plan.items[:3]})
    assert seen["block"] == ["full", "none"]  # active block / inactive signSGD blocks
    assert seen["block_sgd"] == ["full"]
    assert seen["rho0"] == ["none"]
    assert seen["columns"] == ["full"]
    assert seen["random"] == ["compact"]
    assert seen["random_sgd"] == ["full"]


@needs_interpreter
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
@pytest.mark.parametrize(
    "name", ["block", "block_sgd", "rho0_sgd", "columns", "rows", "columns_sgd", "random", "svd"]
)
def test_triton_kernels_read_the_coefficient(name, max_norm):
    """The prepared plan launches (whole AdamW, coordinates, free sgd) and the projection state
    kernel apply c in registers (TRITON_INTERPRET=1)."""
    _compare(name, max_norm, kernels="triton")


@needs_interpreter
def test_triton_plan_launches_get_the_coefficient(monkeypatch):
    """On plan steps the launches are passed the device scalar and no gradient of a launched
    item is multiplied outside them."""
    from frugal_dist.optim import plan_launches

    seen = []
    real = plan_launches.PlanLaunches.launch

    def spy(self, clip=None):
        seen.append(clip)
        return real(self, clip)

    scaled: list[int] = []
    real_scale = clipping.scale_

    def count_scale(grads, coef):
        scaled.append(len(grads))
        return real_scale(grads, coef)

    monkeypatch.setattr(plan_launches.PlanLaunches, "launch", spy)
    import frugal_dist.optim.step_plan as step_plan

    monkeypatch.setattr(step_plan, "scale_", count_scale)
    _run(CASES["block"], 0.5, True, kernels="triton")
    assert seen and all(c is not None for c in seen)
    assert scaled == []  # every plan item was launched: no explicit multiply on plan steps
