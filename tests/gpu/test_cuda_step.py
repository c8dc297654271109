"""The CUDA paths of the FRUGAL step: Triton AdamW / state-free / coordinate kernels and batched
projections, no host sync in a step, non-finite skip, on-device random projections. Skipped without
CUDA (CI runs none of this; run on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from tests.helpers import SHAPES, grad_stream, make_params, set_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
KINDS = {
    "block": dict(subspace="block", block_order="random"),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "projection": dict(subspace="projection", proj_type="random"),
    "block-rho0": dict(subspace="block", density=0.0),
}


def _opt(ps, **kw):
    return FRUGAL(
        [{"params": ps[:3], "names": NAMES[:3]},
         {"params": ps[3:], "names": NAMES[3:], "algorithm": "adamw"}],
        **{**dict(lr=1e-2, density=0.4, update_gap=4, weight_decay=0.01), **kw},
    )  # fmt: skip


def _diff(a, b) -> float:
    return max((x.detach().cpu() - y.detach().cpu()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_matches_cpu_across_refreshes_and_resume(kind):
    cpu = make_params()
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    # the same (CPU float64) random bases and IEEE fp32 projection GEMMs on both devices
    kw = dict(KINDS[kind], proj_qr_device="cpu", proj_precision="fp32")
    opt_c, opt_g = _opt(cpu, **kw), _opt(gpu, **kw)
    for step, gs in enumerate(grad_stream(SHAPES, 14)):
        if step == 7:  # the step counts must follow a reloaded state
            sd = opt_g.state_dict()
            opt_g = _opt(gpu, **kw)
            opt_g.load_state_dict(sd)
        set_grads(cpu, gs)
        set_grads(gpu, [g.cuda() for g in gs])
        opt_c.step()
        opt_g.step()
    assert _diff(cpu, gpu) < 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_host_sync_in_a_step_between_refreshes(kind):
    """The steps a step plan replays do not sync. Syncs are allowed in the refresh step and in
    the full step after it, which builds the plan (step counters read once, the launch tables'
    fixed entries uploaded once: ``optim.step_plan``, ``kernels.step_table``)."""
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    opt = _opt(ps, nonfinite="ignore", update_gap=100, **KINDS[kind])
    grads = [[g.cuda() for g in gs] for gs in grad_stream(SHAPES, 6)]
    for gs in grads[:2]:  # the refresh, then the full step that builds the plan
        set_grads(ps, gs)
        opt.step()
    torch.cuda.synchronize()
    assert opt.step_plan() is not None
    for gs in grads[2:]:
        set_grads(ps, gs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.step_plan() is not None


def test_nonfinite_skip_on_cuda():
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    opt = _opt(ps)
    gs = [g.cuda() for g in next(iter(grad_stream(SHAPES, 1)))]
    gs[2][0, 0] = float("nan")
    set_grads(ps, gs)
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert opt.skipped_steps() == 1 and _diff(before, ps) == 0.0


def test_on_device_random_projection_is_deterministic():
    outs = []
    for _ in range(2):
        ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
        opt = _opt(ps, subspace="projection", proj_type="random", proj_qr_device="param")
        for gs in grad_stream(SHAPES, 6):
            set_grads(ps, [g.cuda() for g in gs])
            opt.step()
        outs.append([p.detach().clone() for p in ps])
    assert _diff(outs[0], outs[1]) == 0.0
