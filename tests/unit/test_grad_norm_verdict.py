"""``FRUGAL.step(grad_norm=...)``: the inf/nan verdict from the caller's total norm (the clip's)
instead of reading every gradient (``optim.nonfinite.check_grad_norm``). Finite steps are
bit-equal to steps without it, on full and plan steps; a non-finite norm skips / raises exactly
as the gradient check does; the gradient check itself never runs."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.optim import nonfinite
from tests.helpers import SHAPES, make_params, max_diff, set_grads
from tests.triton_marks import needs_interpreter
from tests.unit.test_nonfinite import KINDS, NAMES, POISONED, _count_kernel_checks, _opt, _snapshot

STEPS = 8  # update_gap 3: refreshes (full path), plan builds (full path), plan steps


def _grads(steps: int = STEPS, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def _total_norm(ps) -> torch.Tensor:
    """What ``clip_grad_norm_`` returns (without clipping, so both runs see the same gradients)."""
    return torch.nn.utils.get_total_norm([p.grad for p in ps])


def _state(opt, ps):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]


def _assert_same(opt_a, ps_a, opt_b, ps_b):
    assert max_diff(ps_a, ps_b) == 0.0
    for sa, sb in zip(_state(opt_a, ps_a), _state(opt_b, ps_b)):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _forbid_gradient_check(monkeypatch) -> None:
    """Any read of the gradients for the inf/nan test fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the gradients were read for the inf/nan test")

    monkeypatch.setattr(nonfinite, "grads_are_finite", forbidden)
    monkeypatch.setattr(nonfinite, "max_abs_norms", forbidden)
    import frugal_dist.optim.phases as phases

    monkeypatch.setattr(phases, "grads_are_finite", forbidden)


@pytest.mark.parametrize("as_float", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_finite_steps_with_grad_norm_are_bit_equal_on_full_and_plan_steps(
    kind, as_float, monkeypatch
):
    ps, qs = make_params(), make_params()
    opt, ref = _opt(ps, **KINDS[kind]), _opt(qs, **KINDS[kind])
    plan_steps = 0
    for gs in _grads():
        set_grads(qs, gs)
        ref.step()
        set_grads(ps, gs)
        norm = _total_norm(ps)
        with monkeypatch.context() as m:
            _forbid_gradient_check(m)
            plan_steps += opt.step_plan() is not None
            opt.step(grad_norm=norm.item() if as_float else norm)
        _assert_same(opt, ps, ref, qs)
    assert 0 < plan_steps < STEPS  # both the plan path and the full path ran
    assert opt.skipped_steps() == 0


@needs_interpreter
@pytest.mark.parametrize("kind", ["block", "columns", "rho0", "svd"])
def test_triton_kernels_with_grad_norm_launch_no_check_and_are_bit_equal(kind, monkeypatch):
    calls = _count_kernel_checks(monkeypatch)
    ps, qs = make_params(), make_params()
    opt = _opt(ps, kernels="triton", **KINDS[kind])
    ref = _opt(qs, kernels="triton", **KINDS[kind])
    for gs in _grads():
        set_grads(qs, gs)
        ref.step()
        set_grads(ps, gs)
        opt.step(grad_norm=_total_norm(ps))
        _assert_same(opt, ps, ref, qs)
    assert calls[0] == STEPS  # the reference's checks only


@pytest.mark.parametrize("at", list(POISONED))
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("kind", ["block", "columns", "svd", "rho0"])
def test_a_nonfinite_norm_skips_and_touches_nothing(kind, bad, at, monkeypatch):
    """The poisoned gradient makes the (torch-computed) norm ``bad``; the step is skipped with
    parameters, state and counters untouched, and the run continues as the clean reference."""
    ps, qs = make_params(), make_params()
    opt, ref = _opt(ps, **KINDS[kind]), _opt(qs, **KINDS[kind])
    for step, gs in enumerate(_grads()):
        if step == POISONED[at]:
            poisoned = [g.clone() for g in gs]
            poisoned[1][2, 1] = bad
            set_grads(ps, poisoned)
            norm = _total_norm(ps)
            assert not torch.isfinite(norm)
            before, state = _snapshot(opt, ps)
            with monkeypatch.context() as m:
                _forbid_gradient_check(m)
                opt.step(grad_norm=norm)
            after, state_after = _snapshot(opt, ps)
            assert max_diff(before, after) == 0.0
            assert state.keys() == state_after.keys()
            for n in state:
                assert all(torch.equal(state[n][k], state_after[n][k]) for k in state[n])
            assert opt.skipped_steps() == 1
        set_grads(ps, gs)
        set_grads(qs, gs)
        opt.step(grad_norm=_total_norm(ps))
        ref.step()
    assert opt.skipped_steps() == 1 and ref.skipped_steps() == 0
    _assert_same(opt, ps, ref, qs)


def test_finite_gradients_whose_norm_overflows_float32_skip_with_grad_norm_only():
    """Documented: elements ~1e19 are finite, but their squares overflow the float32 norm."""
    ps, qs = make_params(), make_params()
    opt, ref = _opt(ps, subspace="block"), _opt(qs, subspace="block")
    gs = [torch.full(s, 1e19) for s in SHAPES]
    set_grads(ps, gs)
    set_grads(qs, gs)
    norm = _total_norm(ps)
    assert torch.isinf(norm) and all(torch.isfinite(g).all() for g in gs)
    opt.step(grad_norm=norm)
    ref.step()
    assert opt.skipped_steps() == 1 and ref.skipped_steps() == 0
    assert all(len(opt.state[p]) == 0 for p in ps)


@pytest.mark.parametrize("plan_step", [False, True])
def test_raise_names_the_parameter_and_updates_nothing(plan_step):
    ps = make_params()
    opt = _opt(ps, nonfinite="raise", subspace="block")
    grads = _grads(3)
    if plan_step:  # steps 0 and 1 taken: step 2 replays the plan
        for gs in grads[:2]:
            set_grads(ps, gs)
            opt.step(grad_norm=_total_norm(ps))
        assert opt.step_plan() is not None
    gs = grads[2]
    gs[3][0, 0] = float("nan")
    gs[4][1, 1] = float("inf")
    set_grads(ps, gs)
    before, state = _snapshot(opt, ps)
    with pytest.raises(FloatingPointError, match=r"grad_norm=nan.*'layers\.3\.w'"):
        opt.step(grad_norm=_total_norm(ps))
    after, state_after = _snapshot(opt, ps)
    assert max_diff(before, after) == 0.0
    for n in state:
        assert all(torch.equal(state[n][k], state_after[n][k]) for k in state[n])


def test_raise_on_an_overflowing_norm_says_no_local_gradient_holds_inf_nan():
    ps = make_params()
    opt = _opt(ps, nonfinite="raise")
    set_grads(ps, _grads(1)[0])
    with pytest.raises(FloatingPointError, match="in no local gradient"):
        opt.step(grad_norm=float("inf"))


def test_ignore_takes_the_step_whatever_the_norm():
    ps, qs = make_params(), make_params()
    opt, ref = _opt(ps, nonfinite="ignore"), _opt(qs, nonfinite="ignore")
    gs = _grads(1)[0]
    set_grads(ps, gs)
    set_grads(qs, gs)
    opt.step(grad_norm=torch.tensor(float("nan")))
    ref.step()
    assert opt.skipped_steps() == 0
    _assert_same(opt, ps, ref, qs)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ("1.0", TypeError, "grad_norm must be the total gradient norm"),
        ([1.0], TypeError, "got list"),
        (True, TypeError, "got bool"),
        (torch.ones(1), ValueError, r"0-d floating-point tensor .*shape \(1,\)"),
        (torch.ones(2, 2), ValueError, r"shape \(2, 2\)"),
        (torch.tensor(3), ValueError, "dtype torch.int64"),
    ],
)
def test_bad_grad_norm_is_refused_naming_it(bad, error, match):
    ps = make_params()
    opt = _opt(ps)
    set_grads(ps, _grads(1)[0])
    with pytest.raises(error, match=match):
        opt.step(grad_norm=bad)
    assert all(len(opt.state[p]) == 0 for p in ps)


def test_grad_norm_with_a_closure_is_refused():
    ps = make_params()
    opt = _opt(ps)
    with pytest.raises(ValueError, match="grad_norm with a closure"):
        opt.step(lambda: 0.0, grad_norm=1.0)


def test_grad_norm_is_keyword_only():
    ps = make_params()
    opt = _opt(ps)
    set_grads(ps, _grads(1)[0])
    with pytest.raises(TypeError):
        opt.step(None, 1.0)  # type: ignore[misc]


def test_an_integer_norm_is_a_finite_verdict():
    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES}], lr=1e-2)
    set_grads(ps, _grads(1)[0])
    opt.step(grad_norm=3)
    assert opt.skipped_steps() == 0 and all("step" in opt.state[p] for p in ps)
