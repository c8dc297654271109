"""The cached step plan (``optim.step_plan``): steps between refreshes replay a plan built once
per refresh. Every result must be bit-identical to the full path (the plan dropped before every
step), with lr / weight decay changed every step (schedulers), route-deciding options changed
mid-run, gradients missing on some steps, and 16-bit parameters; the plan keeps no gradient."""

from __future__ import annotations

import gc
import importlib.util
import os
import weakref

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.optim import phases
from tests.helpers import SHAPES, grad_stream, make_params, set_grads

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
CASES = {
    "block": dict(subspace="block", density=0.4),
    "block_rho0": dict(subspace="block", density=0.0),
    "columns": dict(subspace="coordinate", coord_choice="columns", density=0.5),
    "rows_rho0": dict(subspace="coordinate", coord_choice="rows", density=0.0),
    "randk": dict(subspace="coordinate", coord_choice="randk", density=0.3),
    "projection": dict(subspace="projection", proj_type="random", density=0.5),
    "svd_left": dict(subspace="projection", proj_type="svd", proj_side="left", density=0.5),
    "sgdm_lion": dict(subspace="block", density=0.6, state_full="lion", state_free="sgd"),
}


def _groups(ps, opts):
    return [
        {"params": ps[:3], "names": NAMES[:3], **opts},
        {"params": ps[3:4], "names": NAMES[3:4], "algorithm": "adamw"},
        {"params": ps[4:], "names": NAMES[4:], "algorithm": "signsgd"},
    ]


def _run(opts, invalidate, steps=11, dtype=torch.float32, fused=None, hook=None, **step_opts):
    ps = make_params(dtype=dtype)
    opt = FRUGAL(
        _groups(ps, opts), lr=1e-2, update_gap=4, weight_decay=0.01, fused=fused, **step_opts
    )
    for step, grads in enumerate(grad_stream(SHAPES, steps)):
        set_grads(ps, grads)  # new gradient tensors every step, as zero_grad(set_to_none)
        for g in opt.param_groups:  # a scheduler: lr and weight decay change every step
            g["lr"] = 1e-2 * (0.9**step)
            g["weight_decay"] = 0.01 * (step % 3)
        if hook is not None:
            hook(step, opt, ps)
        if invalidate:
            opt.reset_caches()
        opt.step()
    state = opt.state_dict()["state"]
    return [p.detach().clone() for p in ps], state


def _assert_same(a, b):
    pa, sa = a
    pb, sb = b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), (i, list(sa[i]))


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_steps_equal_full_steps_with_lr_and_decay_changing_every_step(case, fused):
    _assert_same(_run(CASES[case], False, fused=fused), _run(CASES[case], True, fused=fused))


TRITON = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("case", ["block", "block_rho0", "columns", "projection", "svd_left"])
def test_plan_steps_equal_full_steps_on_the_triton_kernels(case):
    """The kernel path (fused AdamW / state-free / coordinate kernels, the projections' fused
    state and apply kernels) replayed from the plan equals its full path bit for bit."""
    opts = {**CASES[case], "proj_precision": "fp32"}
    a = _run(opts, False, kernels="triton")
    _assert_same(a, _run(opts, True, kernels="triton"))


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("case", ["projection", "svd_left"])
def test_plan_steps_equal_full_steps_on_the_bf16_projection_kernels(case):
    """bf16 operands: the state kernel's bfloat16 copy of G_sf, handed to the apply kernel from
    the plan's stash, equals the full path's stacked rows bit for bit."""
    opts = {**CASES[case], "proj_precision": "bf16"}
    a = _run(opts, False, kernels="triton")
    _assert_same(a, _run(opts, True, kernels="triton"))


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 and triton")
def test_plan_steps_batch_projections_once_per_plan(monkeypatch):
    """The projection batches (``projection_batch.batches``) are listed on the plan's first step,
    not again on its later steps: no per-item ``projection_backend`` there."""
    from frugal_dist.optim import projection_batch

    calls: list[int] = []
    real = projection_batch.projection_backend
    monkeypatch.setattr(projection_batch, "projection_backend",
                        lambda it, k: calls.append(1) or real(it, k))  # fmt: skip
    per_step, opts = [], []

    def hook(step, opt, ps):
        per_step.append(len(calls))
        opts.append(opt)

    _run({**CASES["projection"], "proj_precision": "bf16"}, False, steps=8, kernels="triton",
         hook=hook)  # fmt: skip
    per_step.append(len(calls))
    memo = opts[-1].step_plan().batch_memo
    assert memo and not memo.get(projection_batch.STASH)  # no batch result outlives its step
    done = [b - a for a, b in zip(per_step, per_step[1:])]  # calls made by steps 0..7
    # update_gap 4: steps 0 and 4 refresh, 1 and 5 build the plan, 2 and 6 replay it first (and
    # list its batches), 3 and 7 replay it again
    assert all(done[s] > 0 for s in (0, 1, 2, 4, 5, 6)), done
    assert [done[3], done[7]] == [0, 0], done


@pytest.mark.parametrize("case", ["block", "columns", "projection"])
def test_16_bit_parameters(case):
    a = _run(CASES[case], False, dtype=torch.bfloat16)
    _assert_same(a, _run(CASES[case], True, dtype=torch.bfloat16))


def _change_options(step, opt, ps):
    if step == 6:  # between refreshes: routes and selections change
        opt.param_groups[0]["inactive_lr_scale"] = 0.5
        opt.param_groups[0]["proj_params_lr_scale"] = 0.7
    if step == 7:
        opt.param_groups[0]["state_free"] = "sgd"
        opt.param_groups[1]["betas"] = (0.8, 0.99)
        opt.param_groups[1]["eps"] = 1e-6


@pytest.mark.parametrize("case", ["block", "columns", "rows_rho0", "projection"])
def test_changed_group_options_take_effect_between_refreshes(case):
    a = _run(CASES[case], False, hook=_change_options)
    _assert_same(a, _run(CASES[case], True, hook=_change_options))


def _drop_a_gradient(step, opt, ps):
    if step in (2, 6):
        ps[1].grad = None  # a parameter without gradient this step
    if step == 7:
        ps[0].grad = ps[0].grad.double().float()  # a new tensor of the same dtype


@pytest.mark.parametrize("case", ["block", "columns", "projection"])
def test_parameters_without_gradient_on_some_steps(case):
    a = _run(CASES[case], False, hook=_drop_a_gradient)
    _assert_same(a, _run(CASES[case], True, hook=_drop_a_gradient))


def test_steps_between_refreshes_do_not_plan_again(monkeypatch):
    calls = []
    real = phases.plan
    monkeypatch.setattr(phases, "plan", lambda ctx, views: calls.append(1) or real(ctx, views))
    _run(CASES["block"], False, steps=12)  # update_gap 4: refreshes at steps 0, 4, 8
    assert len(calls) == 6  # each refresh step and the step after it (which builds the plan)


def test_the_plan_keeps_no_gradient():
    ps = make_params()
    opt = FRUGAL(_groups(ps, CASES["columns"]), lr=1e-2, update_gap=10)
    refs = []
    for grads in grad_stream(SHAPES, 4):
        set_grads(ps, grads)
        opt.step()
        refs.append([weakref.ref(p.grad) for p in ps])
        for p in ps:
            p.grad = None
        gc.collect()
        assert all(r() is None for r in refs[-1])


def test_raise_on_a_plan_step_updates_nothing_and_the_run_continues():
    ps, qs = make_params(), make_params()
    opt = FRUGAL(_groups(ps, CASES["block"]), lr=1e-2, update_gap=4, nonfinite="raise")
    ref = FRUGAL(_groups(qs, CASES["block"]), lr=1e-2, update_gap=4, nonfinite="raise")
    for step, grads in enumerate(grad_stream(SHAPES, 8)):
        if step == 2:  # a plan step (refresh at 0, plan built at 1)
            bad = [g.clone() for g in grads]
            bad[2][0, 0] = float("nan")
            set_grads(ps, bad)
            before = [p.detach().clone() for p in ps]
            with pytest.raises(FloatingPointError, match=NAMES[2]):
                opt.step()
            assert all(torch.equal(a, b) for a, b in zip(before, ps))
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
    _assert_same((ps, opt.state_dict()["state"]), (qs, ref.state_dict()["state"]))


def test_resuming_between_refreshes_equals_the_uninterrupted_run():
    grads = list(grad_stream(SHAPES, 11))
    ps = make_params()
    opt = FRUGAL(_groups(ps, CASES["columns"]), lr=1e-2, update_gap=4)
    for g in grads:
        set_grads(ps, g)
        opt.step()
    qs = make_params()
    first = FRUGAL(_groups(qs, CASES["columns"]), lr=1e-2, update_gap=4)
    for g in grads[:6]:  # stops after a plan step
        set_grads(qs, g)
        first.step()
    saved = first.state_dict()
    rs = [torch.nn.Parameter(q.detach().clone()) for q in qs]
    second = FRUGAL(_groups(rs, CASES["columns"]), lr=1e-2, update_gap=4)
    second.load_state_dict(saved)
    for g in grads[6:]:
        set_grads(rs, g)
        second.step()
    _assert_same((ps, opt.state_dict()["state"]), (rs, second.state_dict()["state"]))


def _grad_layouts(step, opt, ps):
    """Plan steps (update_gap 4: 2, 3, 6, 7, 10) with gradients the prepared launches must not
    read as planned: at 3 the previous step's gradient tensors are written in place (the same
    pointers as before), at 6 one gradient is column-major (same shape and values, other
    strides; a signSGD parameter: ``kernels="triton"`` refuses strided AdamW gradients), at 7
    it is a fresh contiguous tensor again."""
    if step == 2:
        _grad_layouts.kept = [p.grad for p in ps]
    if step == 3:
        for p, kept in zip(ps, _grad_layouts.kept):
            kept.copy_(p.grad)
            p.grad = kept
    if step == 6:
        ps[4].grad = ps[4].grad.t().contiguous().t()
        assert not ps[4].grad.is_contiguous()


@pytest.mark.parametrize("case", ["block", "columns"])
def test_gradient_pointers_and_layouts_changing_between_plan_steps(case):
    a = _run(CASES[case], False, hook=_grad_layouts)
    _assert_same(a, _run(CASES[case], True, hook=_grad_layouts))


def _plan_calls(monkeypatch, **run_opts) -> list[int]:
    """The steps that took the full path (``phases.plan`` ran) in a ``_run``."""
    steps: list[int] = []
    now = [0]
    real = phases.plan
    monkeypatch.setattr(phases, "plan", lambda ctx, v: steps.append(now[0]) or real(ctx, v))
    hook = run_opts.pop("hook", None)

    def count(step, opt, ps):
        now[0] = step
        if hook is not None:
            hook(step, opt, ps)

    _run(hook=count, **run_opts)
    return steps


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("case", ["block", "columns"])
def test_prepared_launches_with_changed_gradient_pointers_and_layouts(case, monkeypatch):
    """The plan's prepared launches (``optim.plan_launches``) read each step's gradient
    pointers, whatever they are (new tensors, or last step's written in place); a gradient of
    another layout (column-major) makes the plan stale: that step takes the full path (and
    builds a new plan), bit-identical to full steps throughout."""
    opts = {**CASES[case], "proj_precision": "fp32"}
    a = _run(opts, False, kernels="triton", hook=_grad_layouts)
    _assert_same(a, _run(opts, True, kernels="triton", hook=_grad_layouts))
    full = _plan_calls(monkeypatch, opts=opts, invalidate=False, kernels="triton",
                       hook=_grad_layouts)  # fmt: skip
    assert full == [0, 1, 4, 5, 6, 8, 9], full  # 6: the column-major gradient


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("case", ["block", "columns", "projection"])
def test_plan_steps_upload_one_table(case, monkeypatch):
    """A plan step uploads one table for all its prepared launches and the inf/nan test (the
    ``StepTable``), and no per-kernel table; full steps upload per kernel."""
    from frugal_dist.kernels import elementwise_triton as tk
    from frugal_dist.kernels import finite_triton as ft
    from frugal_dist.kernels.step_table import StepTable

    per_kernel, per_plan, now = [], [], [0]
    real_upload, real_stage = tk.upload, StepTable.upload

    def upload(*args, **kw):
        per_kernel.append(now[0])
        return real_upload(*args, **kw)

    def stage(self):
        per_plan.append(now[0])
        return real_stage(self)

    monkeypatch.setattr(tk, "upload", upload)
    monkeypatch.setattr(ft, "upload", upload)
    monkeypatch.setattr(StepTable, "upload", stage)

    def hook(step, opt, ps):
        now[0] = step

    opts = {**CASES[case], "proj_precision": "fp32"}
    _run(opts, False, kernels="triton", hook=hook)
    plan_steps = [2, 3, 6, 7, 10]
    assert per_plan == plan_steps, per_plan
    if case != "projection":  # everything prepared (projection batches keep their own path)
        assert not set(per_kernel) & set(plan_steps), per_kernel
    assert set(per_kernel) >= {0, 1, 4, 5, 8, 9}, per_kernel


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_later_plan_steps_hand_projection_batches_over_without_rows(precision, monkeypatch):
    """From a plan's second step on, a projection batch whose down, state and apply all ran
    batched passes only its (B, ...) results between the phases (``projection_batch.DIRECT``):
    no ``unbind`` into per-item rows, no item holds a row; results stay bit-identical (the
    other tests of this file)."""
    from frugal_dist.optim import projection_batch

    unbinds, now = [], [0]
    real = torch.Tensor.unbind

    def unbind(self, *args, **kw):
        unbinds.append(now[0])
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "unbind", unbind)
    opts = []

    def hook(step, opt, ps):
        now[0] = step
        opts.append(opt)

    _run({**CASES["projection"], "proj_precision": precision}, False, steps=8,
         kernels="triton", hook=hook)  # fmt: skip
    plan = opts[-1].step_plan()
    assert plan.batch_memo.get(projection_batch.DIRECT)
    assert all(it.g_sf is None and it.u is None and it.g_sf_op is None for it in plan.items)
    # update_gap 4: 2 and 6 replay the plan first (rows), 3 and 7 replay it again (none)
    assert 2 in unbinds and 6 in unbinds, unbinds
    assert 3 not in unbinds and 7 not in unbinds, unbinds
