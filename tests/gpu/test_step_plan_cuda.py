"""The cached step plan on CUDA (``optim.step_plan``, Triton kernels by default): steps replayed
from the plan equal full steps bit for bit, a non-finite step in the plan's range is skipped
without a trace, and the plan makes a step's host time shorter. Skipped without CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from frugal_dist import FRUGAL
from tests.helpers import grad_stream, make_params, set_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
SHAPES = [(64, 48), (64, 48), (48, 64), (48, 64), (64, 48), (40, 40), (64,), (64,)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
CASES = {
    "block": dict(subspace="block", density=0.4),
    "rho0": dict(subspace="block", density=0.0),
    "columns": dict(subspace="coordinate", coord_choice="columns", density=0.3),
    "random": dict(subspace="projection", proj_type="random", density=0.3),
    "svd": dict(subspace="projection", proj_type="svd", density=0.3),
}


def _opt(ps, case, **kw):
    groups = [
        {"params": ps[:6], "names": NAMES[:6], **CASES[case]},
        {"params": ps[6:], "names": NAMES[6:], "algorithm": "adamw"},
    ]
    return FRUGAL(groups, lr=1e-2, update_gap=5, weight_decay=0.05, inactive_lr_scale=0.5, **kw)


def _run(case, invalidate, steps=13, poison_at=None, layouts=False):
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    opt = _opt(ps, case)
    kept = None
    for step, grads in enumerate(grad_stream(SHAPES, steps)):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * 0.9**step  # a scheduler
        if step == poison_at:
            bad = [g.clone() for g in grads]
            bad[2][1, 1] = float("inf")
            set_grads(ps, [g.cuda() for g in bad])
            opt.step()  # skipped
        set_grads(ps, [g.cuda() for g in grads])
        if layouts:  # update_gap 5: plan steps 2-4, 7-9, 12
            if step == 2:
                kept = [p.grad for p in ps]
            if step == 3:  # last step's gradient tensors written in place: the same pointers
                for p, k in zip(ps, kept):
                    p.grad = k.copy_(p.grad)
            if step == 7:  # column-major gradients (same values): the plan goes stale
                for i in (0, 2):
                    ps[i].grad = ps[i].grad.t().contiguous().t()
        if invalidate:
            opt.reset_caches()
        opt.step()
    state = opt.state_dict()["state"]
    return ps, state, opt.skipped_steps()


def _same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    for i in a[1]:
        assert all(torch.equal(a[1][i][k], b[1][i][k]) for k in a[1][i])


@pytest.mark.parametrize("case", list(CASES))
def test_plan_steps_equal_full_steps(case):
    _same(_run(case, False), _run(case, True))


@pytest.mark.parametrize("case", list(CASES))
def test_plan_steps_with_changed_gradient_pointers_and_layouts(case):
    """The prepared launches (``optim.plan_launches``) read each step's gradient pointers; a
    strided gradient sends that step to the full path: bit-identical to full steps."""
    _same(_run(case, False, layouts=True), _run(case, True, layouts=True))


@pytest.mark.parametrize("case", ["block", "rho0", "columns"])
def test_plan_prepares_every_launch(case):
    """Block, rho = 0 and columns plans leave nothing to the generic phases: every update and
    the inf/nan test launch from the plan's one table."""
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    opt = _opt(ps, case)
    for grads in grad_stream(SHAPES, 3):
        set_grads(ps, [g.cuda() for g in grads])
        opt.step()
    plan = opt.step_plan()
    assert plan is not None and plan.launches is not None
    assert not plan.rest and not plan.routed
    assert plan.launches.finite_check is not None


@pytest.mark.parametrize("at", [5, 6, 8])  # refresh, plan build, plan step (update_gap 5)
@pytest.mark.parametrize("case", list(CASES))
def test_skipped_step_leaves_the_trajectory_unchanged(case, at):
    got = _run(case, False, poison_at=at)
    assert got[2] == 1
    _same(got, _run(case, False))


def _host_ms(case, invalidate, steps=30):
    shapes = [(256, 256)] * 96 + [(256,)] * 64
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    groups = [
        {"params": ps[:96], "names": [f"w{i}" for i in range(96)], **CASES[case]},
        {"params": ps[96:], "names": [f"n{i}" for i in range(64)], "algorithm": "adamw"},
    ]
    opt = FRUGAL(groups, lr=1e-3, update_gap=10_000)
    grads = [torch.randn_like(p) for p in ps]
    times = []
    for _ in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if invalidate:
            opt.reset_caches()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times[5:])[len(times[5:]) // 2] * 1e3


@pytest.mark.parametrize("case", ["block", "rho0", "columns"])
def test_plan_steps_take_less_host_time(case):
    planned, full = _host_ms(case, False), _host_ms(case, True)
    print(f"{case}: host ms per step, plan {planned:.3f}, full path {full:.3f}")
    assert planned < full


def test_step_table_uploads_each_steps_entries_in_stream_order():
    """``kernels.step_table.StepTable``: fixed entries once, per-step slots rewritten through
    two alternating pinned buffers; each upload is what the next kernel on the stream reads,
    even when the host runs ahead of the device."""
    from frugal_dist.kernels.step_table import StepTable

    table = StepTable([7, 0, 9, 0], torch.device("cuda"))
    seen = []
    for step in range(6):
        host = table.begin()
        host[1] = step
        host[3] = -step
        table.upload()
        torch.cuda._sleep(1_000_000)  # the device lags: later uploads queue behind this
        seen.append(table.table.clone())
    got = [t.tolist() for t in seen]
    assert got == [[7, s, 9, -s] for s in range(6)], got
