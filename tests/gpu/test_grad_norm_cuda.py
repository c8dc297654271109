"""``FRUGAL.step(grad_norm=...)`` on CUDA: the inf/nan verdict from the caller's norm launches no
``_nonfinite_kernel`` (the one-launch gradient test of ``kernels.finite``) on full or plan steps,
while a step without it launches exactly one; results are bit-equal; a nan norm skips.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from tests.helpers import grad_stream, make_params, set_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
SHAPES = [(64, 48), (48, 64), (40, 40), (64,)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
CASES = {
    "block": dict(subspace="block", density=0.25),
    "rho0": dict(subspace="block", density=0.0),
    "columns": dict(subspace="coordinate", coord_choice="columns", density=0.25),
    "svd": dict(subspace="projection", proj_type="svd", density=0.25),
}
CHECK = "_nonfinite_kernel"


def _opt(ps, case):
    groups = [
        {"params": ps[:3], "names": NAMES[:3], **CASES[case]},
        {"params": ps[3:], "names": NAMES[3:], "algorithm": "adamw"},
    ]
    return FRUGAL(groups, lr=1e-2, update_gap=4, weight_decay=0.05)


def _profiled_step(opt, grad_norm) -> list[str]:
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        if grad_norm is None:
            opt.step()
        else:
            opt.step(grad_norm=grad_norm)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("case", list(CASES))
def test_grad_norm_steps_launch_no_nonfinite_kernel_and_equal_checked_steps(case):
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    qs = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    opt, ref = _opt(ps, case), _opt(qs, case)
    plan_steps = 0
    for gs in grad_stream(SHAPES, 7):  # update_gap 4: full and plan steps
        gs = [g.cuda() for g in gs]
        set_grads(qs, gs)
        ref_names = _profiled_step(ref, None)
        assert sum(CHECK in n for n in ref_names) == 1, ref_names
        set_grads(ps, gs)
        norm = torch.nn.utils.get_total_norm([p.grad for p in ps])  # outside the step
        plan_steps += opt.step_plan() is not None
        names = _profiled_step(opt, norm)
        assert not [n for n in names if CHECK in n], names
    assert 0 < plan_steps < 7
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    for p, q in zip(ps, qs):
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in opt.state[p])


def test_a_nan_norm_skips_without_the_kernel():
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    opt = _opt(ps, "block")
    for step, gs in enumerate(grad_stream(SHAPES, 3)):
        set_grads(ps, [g.cuda() for g in gs])
        if step == 2:  # a plan step
            before = [p.detach().clone() for p in ps]
            names = _profiled_step(opt, torch.tensor(float("nan"), device="cuda"))
            assert not [n for n in names if CHECK in n], names
            assert all(torch.equal(a, p) for a, p in zip(before, ps))
            assert opt.skipped_steps() == 1
        else:
            opt.step(grad_norm=torch.nn.utils.get_total_norm([p.grad for p in ps]))
