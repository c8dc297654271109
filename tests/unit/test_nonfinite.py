"""Non-finite gradients (``nonfinite=skip|raise|ignore``), the fused AdamW path (``fused=True``
runs torch's fused kernel on the CPU too) and the on-device random projection option."""

from __future__ import annotations

import math

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.seeding import projection_seed
from frugal_dist.core.subspaces import projection_rank, projection_selection
from frugal_dist.kernels.finite import NonfiniteTest
from frugal_dist.kernels.refresh import random_bases
from frugal_dist.optim.nonfinite import BoundTest
from tests.helpers import SHAPES, clone_params, grad_stream, make_params, max_diff, set_grads
from tests.triton_marks import needs_interpreter

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
KINDS = {
    "block": dict(subspace="block"),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "projection": dict(subspace="projection", proj_type="random"),
    "svd": dict(subspace="projection", proj_type="svd"),
    "rho0": dict(subspace="block", density=0.0),
    "columns_rho0": dict(subspace="coordinate", coord_choice="columns", density=0.0),
}
COMMON = dict(lr=1e-2, density=0.4, update_gap=3, weight_decay=0.01)


def _opt(ps, **kw):
    split, full = ps[:3], ps[3:]
    return FRUGAL(
        [
            {"params": split, "names": NAMES[:3]},
            {"params": full, "names": NAMES[3:], "algorithm": "adamw"},
        ],
        **{**COMMON, **kw},
    )


def _snapshot(opt, ps):
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in zip(NAMES, ps)}
    return [p.detach().clone() for p in ps], state


# update_gap 3: step 3 refreshes (full path, check first), step 4 builds the step plan (full
# path), step 5 replays it (optim.step_plan: host planning first, then the check)
POISONED = {"refresh": 3, "plan_build": 4, "plan_step": 5}


@pytest.mark.parametrize("at", list(POISONED))
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("kind", list(KINDS))
def test_skip_leaves_everything_untouched_and_the_run_continues_as_if_the_step_never_was(
    kind, bad, at
):
    ps, qs = make_params(), make_params()
    opt, ref = _opt(ps, **KINDS[kind]), _opt(qs, **KINDS[kind])
    grads = list(grad_stream(SHAPES, 10))
    for step, gs in enumerate(grads):
        if step == POISONED[at]:  # a poisoned step, taken again with a finite gradient
            poisoned = [g.clone() for g in gs]
            poisoned[1][2, 1] = bad
            set_grads(ps, poisoned)
            before, state = _snapshot(opt, ps)
            opt.step()
            after, state_after = _snapshot(opt, ps)
            assert max_diff(before, after) == 0.0
            assert state.keys() == state_after.keys()
            for n in state:
                assert state[n].keys() == state_after[n].keys()
                assert all(torch.equal(state[n][k], state_after[n][k]) for k in state[n])
        set_grads(ps, gs)
        set_grads(qs, gs)
        opt.step()
        ref.step()
    assert opt.skipped_steps() == 1 and ref.skipped_steps() == 0
    # The reference took the same finite steps: identical trajectory (step counters included).
    assert max_diff(ps, qs) == 0.0
    assert all(torch.equal(opt.state[p]["step"], ref.state[q]["step"]) for p, q in zip(ps, qs))


def test_raise_names_the_first_offending_parameter_and_updates_nothing():
    ps = make_params()
    opt = _opt(ps, nonfinite="raise")
    gs = next(iter(grad_stream(SHAPES, 1)))
    gs[3][0, 0] = float("nan")
    gs[4][1, 1] = float("inf")
    set_grads(ps, gs)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(FloatingPointError, match="'layers.3.w'"):
        opt.step()
    assert max_diff(before, ps) == 0.0
    assert all(len(st) == 0 for st in opt.state.values())  # not even a step counter


def _count_kernel_checks(monkeypatch) -> list[int]:
    """Counts the calls of the Triton check that ran: ``kernels.finite.NonfiniteTest`` (full
    steps) or its launch over a step plan's table (``optim.nonfinite.BoundTest``)."""
    calls = [0]
    for cls in (NonfiniteTest, BoundTest):

        def counted(self, tensors, run=cls.__call__):
            out = run(self, tensors)
            calls[0] += out is not None
            return out

        monkeypatch.setattr(cls, "__call__", counted)
    return calls


@needs_interpreter
@pytest.mark.parametrize("at", list(POISONED))
@pytest.mark.parametrize("kind", ["block", "svd", "rho0"])
def test_the_triton_check_skips_the_same_steps(kind, at, monkeypatch):
    """``kernels="triton"`` (the one-launch check, on full and plan steps): the poisoned step
    is skipped and the run equals the torch check's run (itself checked against a clean run
    above)."""
    calls = _count_kernel_checks(monkeypatch)
    runs = []
    for kernels in ("triton", "torch"):
        ps = make_params()
        opt = _opt(ps, kernels=kernels, **KINDS[kind])
        for step, gs in enumerate(grad_stream(SHAPES, 8)):
            if step == POISONED[at]:
                poisoned = [g.clone() for g in gs]
                poisoned[2][-1, -1] = float("nan")
                set_grads(ps, poisoned)
                opt.step()
            set_grads(ps, gs)
            opt.step()
        assert opt.skipped_steps() == 1
        runs.append(ps)
        if kernels == "triton":
            assert calls[0] == 9  # every step, the skipped one too
    assert calls[0] == 9  # the torch run never used the kernel
    assert max_diff(*runs) < 1e-6  # the Triton apply kernels round differently (last bits)


@needs_interpreter
@pytest.mark.parametrize("step", [0, 2])  # a full step; a plan step (update_gap 3, built at 1)
def test_the_triton_check_raises_naming_the_parameter(step, monkeypatch):
    calls = _count_kernel_checks(monkeypatch)
    ps = make_params(dtype=torch.bfloat16)
    opt = _opt(ps, nonfinite="raise", kernels="triton", subspace="block")
    for i, gs in enumerate(grad_stream(SHAPES, step + 1)):
        if i == step:
            gs[4][-1, -1] = float("-inf")
            gs[3][0, 0] = float("nan")
        set_grads(ps, gs)
        if i < step:
            opt.step()
            continue
        before = [p.detach().clone() for p in ps]
        with pytest.raises(FloatingPointError, match="'layers.3.w'"):
            opt.step()
        assert max_diff(before, ps) == 0.0
    assert calls[0] == step + 1


def test_ignore_does_not_check():
    ps = make_params()
    opt = _opt(ps, nonfinite="ignore", subspace="block")
    gs = next(iter(grad_stream(SHAPES, 1)))
    gs[4][0, 0] = float("nan")  # in the AdamW group: the nan reaches the weights
    set_grads(ps, gs)
    opt.step()
    assert torch.isnan(ps[4]).any() and opt.skipped_steps() == 0


def test_16_bit_gradients_are_checked_without_overflow():
    ps = make_params(dtype=torch.float16)
    opt = _opt(ps, subspace="coordinate")
    gs = [g * 2000.0 for g in next(iter(grad_stream(SHAPES, 1)))]  # large but finite in fp16
    set_grads(ps, gs)
    opt.step()
    assert opt.skipped_steps() == 0
    gs[0][0, 0] = float("inf")
    set_grads(ps, gs)
    opt.step()
    assert opt.skipped_steps() == 1


@pytest.mark.parametrize("value", ["warn", None, True])
def test_bad_nonfinite_option(value):
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        _opt(make_params(), nonfinite=value)


# --------------------------------------------------------------------------- fused AdamW kernel
def test_fused_adamw_group_matches_torch_adamw():
    ps = make_params()
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "algorithm": "adamw"}], lr=3e-3, weight_decay=0.01, fused=True)
    ref = torch.optim.AdamW(qs, lr=3e-3, weight_decay=0.01)
    for grads in grad_stream(SHAPES, 50):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
    assert max_diff(ps, qs) < 1e-6


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(reset_statistics=False), dict(proj_params_lr_scale=0.5, inactive_lr_scale=0.7)],
)
def test_fused_blocks_match_the_foreach_path_across_refreshes_and_resume(extra):
    kw = dict(subspace="block", block_order="random", **extra)
    ps, qs = make_params(), make_params()
    opt, ref = _opt(ps, fused=True, **kw), _opt(qs, fused=False, **kw)
    grads = list(grad_stream(SHAPES, 20))
    for step, gs in enumerate(grads):
        if step == 10:  # resume the fused optimizer from a checkpoint mid-refresh
            sd = opt.state_dict()
            opt = _opt(ps, fused=True, **kw)
            opt.load_state_dict(sd)
        set_grads(ps, gs)
        set_grads(qs, gs)
        opt.step()
        ref.step()
    # Same AdamW math, different float32 association (fused kernel vs foreach sequence).
    assert max_diff(ps, qs) < 2e-6
    for p, q in zip(ps, qs):
        for k, v in ref.state[q].items():
            assert torch.allclose(opt.state[p][k], v, rtol=1e-5, atol=1e-7), k


def test_bad_fused_option():
    with pytest.raises(ValueError, match="fused must be"):
        _opt(make_params(), fused="yes")


# ------------------------------------------------------------------- on-device random projection
def test_proj_qr_device_param_draws_random_bases_on_the_device():
    """``proj_qr_device="param"``: the basis is ``kernels.refresh.random_bases`` on the
    parameter's device (here the CPU), orthonormal and a pure function of (seed, name, k);
    ``"auto"`` keeps the float64 CPU basis for CPU parameters (a different draw)."""
    bases = {}
    for where in ("param", "auto"):
        ps = make_params()
        opt = _opt(ps, subspace="projection", proj_type="random", proj_qr_device=where)
        set_grads(ps, next(iter(grad_stream(SHAPES, 1))))
        opt.step()
        bases[where] = opt.selections_in_use()[NAMES[0]][1].basis
    m, n = SHAPES[0][0], math.prod(SHAPES[0][1:])
    side = "right" if m >= n else "left"
    dim = m if side == "left" else n
    r = projection_rank((m, n), COMMON["density"], side)
    want = random_bases(dim, r, [projection_seed(0, NAMES[0], 0)], "cpu")[0]
    assert torch.equal(bases["param"], want)
    assert torch.allclose(want.T @ want, torch.eye(r), atol=1e-5)
    seed = projection_seed(0, NAMES[0], 0)
    auto = projection_selection((m, n), COMMON["density"], "random", "auto", seed)
    assert torch.equal(bases["auto"], auto.basis)
    assert not torch.equal(bases["param"], bases["auto"])


def test_proj_qr_device_option_trains_and_is_validated():
    ps = make_params()
    opt = _opt(ps, subspace="projection", proj_type="random", proj_qr_device="param")
    for grads in grad_stream(SHAPES, 4):
        set_grads(ps, grads)
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)
    with pytest.raises(ValueError, match="proj_qr_device must be one of"):
        _opt(make_params(), proj_qr_device="gpu")


def test_on_device_random_bases_are_drawn_batched_and_equal_the_per_matrix_draws():
    """At a refresh the optimizer draws every on-device random basis of a group in one
    ``random_bases`` call per (dim, r) (``kinds.projection.draw_random_bases``): on the CPU the
    batched draw is bit-identical to drawing each matrix alone, at every refresh."""
    import frugal_dist.optim.kinds.projection as proj

    shapes = [(12, 8), (8, 12), (12, 8), (16, 8), (10, 10), (12, 8)]
    names = [f"blocks.{i}.w" for i in range(len(shapes))]
    ps = make_params(shapes)
    opt = FRUGAL([{"params": ps, "names": names}], subspace="projection", proj_type="random",
                 proj_qr_device="param", density=0.3, update_gap=2)  # fmt: skip
    calls = []
    real = proj.random_bases

    def counting(dim, r, seeds, device, **kw):
        calls.append((dim, r, len(seeds)))
        return real(dim, r, seeds, device, **kw)

    proj.random_bases = counting
    try:
        for step, grads in enumerate(grad_stream(shapes, 4)):
            set_grads(ps, grads)
            opt.step()
            k = step // 2
            for name, shape in zip(names, shapes):
                side = "right" if shape[0] >= shape[1] else "left"
                dim = shape[0] if side == "left" else shape[1]
                r = projection_rank(shape, 0.3, side)
                want = real(dim, r, [projection_seed(0, name, k)], "cpu")[0]
                got = opt.selections_in_use()[name][1].basis
                assert torch.equal(got, want), (name, step)
    finally:
        proj.random_bases = real
    # two refreshes (steps 0 and 2), one call per (dim, r) each: the five matrices with
    # dim 8, r 2 (right of 12x8 / 16x8, left of 8x12) in one batch, the 10x10 one alone
    assert sorted(calls) == [(8, 2, 5), (8, 2, 5), (10, 3, 1), (10, 3, 1)]
