"""The step's kernel options against the oracle (``core.reference.ReferenceFRUGAL``).

CPU: ``svd_method`` (exact / warm / randomized) and ``proj_precision`` (bf16 takes the batched
projection kernels with the torch backend). Triton paths (``kernels="triton"``) run under the CPU
interpreter (``PYTHONPATH=$PWD:/work/triton_site TRITON_INTERPRET=1``) and are skipped otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core import reference_selection as ref_sel
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.core.seeding import projection_seed
from frugal_dist.kernels.elementwise import triton_available
from frugal_dist.kernels.refresh import svd_bases
from frugal_dist.optim import svd_refresh
from frugal_dist.train.config_validation import validate_optimizer_section
from tests.helpers import clone_params, grad_stream, make_params, max_diff, set_grads

# repeated shapes: the batched paths group same-shape matrices
SHAPES = [(12, 8), (12, 8), (8, 12), (8, 12), (12, 8), (10, 10)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=1e-2, update_gap=4, weight_decay=0.05, inactive_lr_scale=0.5,
              proj_params_lr_scale=0.8)  # fmt: skip
CASES = {
    "block": dict(subspace="block", density=0.4),
    "rho0": dict(subspace="block", density=0.0),
    "columns": dict(subspace="coordinate", coord_choice="columns", density=0.3),
    "rows": dict(subspace="coordinate", coord_choice="rows", density=0.3),
    "columns-rho0": dict(subspace="coordinate", coord_choice="columns", density=0.0),
    "random": dict(subspace="projection", proj_type="random", density=0.3),
    "random-left": dict(subspace="projection", proj_type="random", proj_side="left", density=0.3),
    "svd-warm": dict(subspace="projection", proj_type="svd", density=0.3, svd_method="warm"),
    "svd-randomized": dict(
        subspace="projection", proj_type="svd", density=0.3, svd_method="randomized"
    ),  # fmt: skip
    "svd-exact": dict(subspace="projection", proj_type="svd", density=0.3, svd_method="exact"),
}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and triton_available()


def run_pair(steps: int, opt_kw: dict, **kw):
    ps = make_params(SHAPES)
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **opt_kw, **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    for grads in grad_stream(SHAPES, steps):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
    return ps, qs, opt


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("rule", ["signsgd", "sgd", "none"])
def test_cpu_step_matches_oracle(case, rule):
    """CPU (``kernels="auto"``: the plain torch path) over 3 refreshes, every svd method."""
    ps, qs, _ = run_pair(12, {}, state_free=rule, **COMMON, **CASES[case])
    # float32 association-order differences only (as test_optimizer_reference), and the
    # warm / randomized bases are float32 computations of the oracle's float64 ones (~1e-7).
    assert max_diff(ps, qs) < 1e-5


def test_warm_starts_randomized_and_then_iterates_from_the_previous_basis(monkeypatch):
    """svd_method="warm": the first refresh (no previous basis) is the randomized range finder
    (2 power steps, no exact SVD anywhere), the next ones one power step from the last basis."""
    import frugal_dist.core.subspaces as subspaces

    def no_exact_svd(*args, **kwargs):
        raise AssertionError("svd_method='warm' ran an exact SVD")

    monkeypatch.setattr(svd_refresh, "projection_selection", no_exact_svd)
    monkeypatch.setattr(subspaces.torch.linalg, "svd", no_exact_svd)
    ps = make_params(SHAPES)
    opt = FRUGAL([{"params": ps, "names": NAMES}], subspace="projection", proj_type="svd",
                 density=0.3, update_gap=2, svd_method="warm")  # fmt: skip
    stream = grad_stream(SHAPES, 3)
    g0 = next(stream)
    set_grads(ps, g0)
    opt.step()  # refresh 0: no previous basis -> randomized
    basis0 = opt.state[ps[0]]["proj_basis"].clone()
    seed0 = projection_seed(0, NAMES[0], 0)
    rnd0 = svd_bases([g0[0]], 2, "right", method="randomized", seeds=[seed0], qr=svd_refresh.QR,
                     oversample=0, power_iters=2)[0]  # fmt: skip
    assert torch.equal(basis0, rnd0)
    _, ref0 = ref_sel.ref_projection((12, 8), 0.3, "svd", "auto", seed0, grad=g0[0],
                                     svd_method="warm")  # fmt: skip
    assert torch.allclose(basis0, ref0, atol=1e-5)  # the oracle's float64 range finder
    set_grads(ps, next(stream))
    opt.step()
    g2 = next(stream)
    set_grads(ps, g2)
    opt.step()  # refresh 1: one power step from basis0
    a = g2[0].double().T  # right projection of a 12 x 8 matrix: A = G^T
    _, want = ref_sel.ref_projection((12, 8), 0.3, "svd", "auto", 0, grad=g2[0],
                                     svd_method="warm", previous=basis0)  # fmt: skip
    got = opt.state[ps[0]]["proj_basis"]
    assert got.shape == want.shape == (8, 2)
    assert torch.allclose(got, want, atol=1e-5)
    # and it is A A^T P_prev orthonormalised, not the exact basis
    y = a @ (a.T @ basis0.double())
    assert torch.allclose(got.double() @ (got.double().T @ y), y, atol=1e-4 * y.abs().max())


def test_oracle_and_fast_randomized_settings_agree():
    assert svd_refresh.RANDOMIZED_OVERSAMPLE == 0  # the oracle's range finder has none
    assert ref_sel.REF_POWER_ITERS == svd_refresh.RANDOMIZED_POWER_ITERS == 2
    assert svd_refresh.WARM_POWER_ITERS == 1


@pytest.mark.parametrize("case", ["random", "random-left", "svd-warm"])
def test_cpu_bf16_projection_follows_the_oracle(case):
    """``proj_precision="bf16"`` on the CPU takes the batched projection kernels (torch backend,
    bfloat16 operands and residual buffer): G_sf, U and R carry ~2^-8 relative error, so
    sign(R) flips where |R| is that small; each flip moves a weight by 2 lr s_p s_i = 8e-3.
    Measured max difference over 12 steps: 0.008-0.010 (the weights moved 0.06-0.08); bound
    0.03. The exact-fp32 run stays at 1e-5."""
    ps, qs, _ = run_pair(12, {}, proj_precision="bf16", **COMMON, **CASES[case])
    assert max_diff(ps, qs) < 0.03
    moved = max_diff(qs, make_params(SHAPES))
    assert moved > 0.05  # the tolerance is small against what the step moves


def test_old_checkpoints_without_the_new_group_options_load():
    ps = make_params(SHAPES)
    opt = FRUGAL([{"params": ps, "names": NAMES}], subspace="projection", proj_type="svd")
    set_grads(ps, next(iter(grad_stream(SHAPES, 1))))
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["proj_precision"], g["svd_method"]
    opt2 = FRUGAL([{"params": ps, "names": NAMES}], subspace="projection", proj_type="svd")
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["svd_method"] == "warm"
    opt2.step()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(proj_precision="fp16"), "proj_precision must be one of"),
        (dict(svd_method="lanczos"), "svd_method must be one of"),
        (dict(kernels="cuda"), "kernels must be one of"),
        (dict(proj_qr_device="gpu"), "proj_qr_device must be one of"),
    ],
)
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        FRUGAL(make_params(SHAPES), **kw)


def test_config_section_validates_the_new_options():
    validate_optimizer_section({"name": "frugal", "proj_precision": "bf16", "svd_method": "exact",
                                "kernels": "torch", "proj_qr_device": "cpu"})  # fmt: skip
    for key, bad in (("proj_precision", "fp8"), ("svd_method", "qr"), ("kernels", "cuda"),
                     ("proj_qr_device", "gpu")):  # fmt: skip
        with pytest.raises(ValueError, match=f"optimizer.{key} must be one of|{key} must be"):
            validate_optimizer_section({"name": "frugal", key: bad})


# ------------------------------------------------------------------------ Triton (interpreter)
@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("rule", ["signsgd", "none"])
def test_triton_step_matches_oracle(case, rule):
    """``kernels="triton"`` on CPU tensors under the interpreter: free / AdamW / coordinate
    kernels and the fused projection apply (fp32 products) against the oracle over 2 refreshes.
    The kernels multiply by reciprocals of the bias corrections and may contract into FMAs
    (float32 last-bit differences, see kernels.elementwise): bounded like the torch path."""
    ps, qs, opt = run_pair(6, {"kernels": "triton"}, state_free=rule, proj_precision="fp32",
                           **{**COMMON, "update_gap": 3}, **CASES[case])  # fmt: skip
    assert max_diff(ps, qs) < 1e-5


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")
def test_triton_adamw_group_matches_oracle():
    ps = make_params(SHAPES)
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES, "algorithm": "adamw"}], kernels="triton",
                 fused=True, lr=1e-2, weight_decay=0.05)  # fmt: skip
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), algorithm="adamw", lr=1e-2, weight_decay=0.05)
    for grads in grad_stream(SHAPES, 5):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
    assert max_diff(ps, qs) < 1e-5
