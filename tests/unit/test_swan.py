"""``state_free="swan"`` (``core.swan``, ``optim.matrix_free``): the fast Newton-Schulz operator
against its float64 eigendecomposition oracle (``core.reference_swan``), the FRUGAL fast path
against ``ReferenceFRUGAL`` step by step, and every refusal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.fragments import RowSpan
from frugal_dist.core.reference import SWAN_STEPS, ReferenceFRUGAL
from frugal_dist.core.reference_swan import ref_newton_schulz_scalar, ref_swan_direction
from frugal_dist.core.swan import NS_STEPS, grad_norm_rows, swan_direction
from frugal_dist.optim import matrix_free
from frugal_dist.optim.group_setup import check_layout_options
from frugal_dist.optim.param_groups import IN_OUT_ATTR
from tests.helpers import SHAPES, clone_params, grad_stream, make_params, max_diff, set_grads

# wide, square (GradNorm's centring makes it rank-deficient), tall, one row, LLaMA-like
OPERATOR_SHAPES = [(8, 32), (24, 24), (40, 12), (1, 16), (64, 172)]


def _polar(x: torch.Tensor) -> torch.Tensor:
    """U V^T over the singular values above 1e-9 of the largest (float64), at unit RMS."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    keep = s > 1e-9 * s.max()
    p = u[:, keep] @ vh[keep]
    return p / p.square().mean().sqrt()


def test_reference_constant_matches_the_fast_path():
    assert SWAN_STEPS == NS_STEPS


@pytest.mark.parametrize("shape", OPERATOR_SHAPES, ids=str)
def test_fast_operator_matches_the_float64_oracle(shape):
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(shape, generator=gen) * 1e-3
    fast = swan_direction(r)
    ref = ref_swan_direction(r, SWAN_STEPS)
    # The oracle is the same map exactly (each Newton-Schulz iterate is a polynomial in A, so it
    # acts eigenvalue by eigenvalue). The fast path differs by float32 rounding only: the Gram
    # matrix and 2 x 10 GEMMs of size <= 64, each ~sqrt(64) x 6e-8 relative, amplified at most
    # by z_K <= 1.5^10 ~ 58 on the smallest eigenvalues: ~3e-5 on entries of RMS 1 (measured
    # <= 3e-5 up to 512 x 1376, 1.3e-5 at 24 x 24); 1e-4 leaves a margin of 3.
    assert (fast - ref).abs().max().item() < 1e-4
    assert abs(fast.square().mean().sqrt().item() - 1.0) < 1e-5  # unit RMS, like sign(R)


def test_grad_norm_standardises_rows_and_zeroes_constant_rows():
    r = torch.randn(5, 9, dtype=torch.float64)
    r[2] = 7.0
    n = grad_norm_rows(r)
    assert torch.allclose(n.mean(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    std = n.square().mean(dim=1).sqrt()
    assert torch.allclose(std[[0, 1, 3, 4]], torch.ones(4, dtype=torch.float64))
    assert torch.equal(n[2], torch.zeros(9, dtype=torch.float64))


def test_well_conditioned_matrix_is_whitened_to_its_polar_factor():
    # a wide (8, 64) gradient: N N^T is well conditioned, 10 steps converge: F = U V^T of N at
    # unit RMS, i.e. (N N^T)^{-1/2} N up to its constant sqrt(max(m, n)) (SWAN's own scale)
    r = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    n = grad_norm_rows(r.double())
    f = swan_direction(r).double()
    assert (f - _polar(n)).abs().max().item() < 1e-5
    eig, q = torch.linalg.eigh(n @ n.T)  # (N N^T)^{-1/2} N x sqrt(n) has unit RMS already
    assert torch.allclose(q @ torch.diag(eig.rsqrt()) @ q.T @ n * 64**0.5, _polar(n), atol=1e-9)
    tall = swan_direction(r.T.contiguous()).double()  # (64, 8): X (X^T X)^{-1/2}, per row
    assert (tall - _polar(grad_norm_rows(r.T.double()))).abs().max().item() < 1e-5


def test_oracle_scalar_recurrence_converges_to_the_inverse_square_root():
    lam = torch.tensor([1.0, 0.3, 1e-2, 1e-3], dtype=torch.float64)
    z = ref_newton_schulz_scalar(lam, 40)
    assert torch.allclose(z, lam.rsqrt(), rtol=1e-12)
    # at the 10 steps used (core.swan): within 1e-3 down to 3e-3 of the largest eigenvalue
    # (singular values down to 0.055 of the largest), 2.4 % short at 1e-3
    lam = torch.tensor([1.0, 0.3, 1e-2, 3e-3], dtype=torch.float64)
    z10 = ref_newton_schulz_scalar(lam, SWAN_STEPS)
    assert ((z10 * lam.sqrt() - 1).abs() < 1e-3).all()
    short = ref_newton_schulz_scalar(torch.tensor([1e-3], dtype=torch.float64), SWAN_STEPS)
    assert 0.97 < float(short * 1e-3**0.5) < 0.98


def test_scale_invariant_and_zero_safe():
    r = torch.randn(6, 10, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(swan_direction(r), swan_direction(r * 1e-6), atol=1e-4)
    assert torch.equal(swan_direction(torch.zeros(6, 10)), torch.zeros(6, 10))
    with pytest.raises(ValueError, match="state_free='swan' whitens a matrix"):
        swan_direction(torch.zeros(6))


# ------------------------------------------------------------------ the optimizer vs the oracle
CASES = {
    "block-rho0": dict(subspace="block", density=0.0),
    "block": dict(subspace="block", density=0.4, block_order="random"),
    "projection-rho0": dict(subspace="projection", density=0.0, proj_type="random"),
    "projection-random": dict(subspace="projection", density=0.4, proj_type="random"),
    # svd with proj_side "auto" only: a forced side on a tall / wide matrix (here (8, 3) left,
    # (3, 8) right) can give rank r >= rank(G), so R is float noise whose sign (or whitening)
    # differs between any two implementations (test_optimizer_reference does the same)
    "projection-svd": dict(subspace="projection", density=0.4, proj_type="svd"),
    "projection-left": dict(subspace="projection", density=0.4, proj_type="random",
                            proj_side="left"),
    "projection-matched": dict(subspace="projection", density=0.4, proj_type="randperm",
                               free_scale="matched"),
    "projection-lion": dict(subspace="projection", density=0.4, proj_type="svd",
                            state_full="lion"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_path_matches_reference_step_by_step(case):
    names = [f"layers.{i}.w" for i in range(len(SHAPES))]
    ps = make_params()
    qs = clone_params(ps)
    kw = dict(lr=3e-3, update_gap=7, state_free="swan", weight_decay=0.05,
              inactive_lr_scale=0.5, proj_params_lr_scale=0.8, **CASES[case])  # fmt: skip
    opt = FRUGAL([{"params": ps, "names": names}], **kw)
    ref = ReferenceFRUGAL(list(zip(names, qs)), **kw)
    worst = 0.0
    for grads in grad_stream(SHAPES, 30):  # refreshes at steps 0, 7, 14, 21, 28
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        worst = max(worst, max_diff(ps, qs))
    # F differs from the float64 oracle by <= ~1e-5 per entry (float32, test above), times
    # lr s_p s_i = 1.2e-3 per step; the state-full part is the reference's own float32 path
    # (<= ulps per step, test_optimizer_reference): 30 steps stay far below 1e-5.
    assert worst < 1e-5


def test_rho_zero_is_swan_on_every_split_weight_and_keeps_no_state():
    ps = make_params()
    ws = [p.detach().clone() for p in ps]
    lr, s_i = 1e-2, 0.1
    opt = FRUGAL(ps, lr=lr, density=0.0, state_free="swan", inactive_lr_scale=s_i, update_gap=5)
    for grads in grad_stream(SHAPES, 8):
        set_grads(ps, grads)
        opt.step()
        for w, g in zip(ws, grads):
            w -= lr * s_i * ref_swan_direction(g, SWAN_STEPS)
    assert max_diff(ps, ws) < 1e-6
    for st in opt.state.values():
        assert all(v.numel() == 0 for k, v in st.items() if k not in ("step", "sf_step"))
    # and not signSGD in disguise: the two rules move the weights differently
    signs = make_params()
    sign_opt = FRUGAL(signs, lr=lr, density=0.0, inactive_lr_scale=s_i, update_gap=5)
    for grads in grad_stream(SHAPES, 8):
        set_grads(signs, grads)
        sign_opt.step()
    assert max_diff(ps, signs) > 1e-3


# ------------------------------------------------------------------ refusals
def test_unknown_rule_lists_swan():
    with pytest.raises(ValueError, match=r"state_free must be one of .*'swan'"):
        FRUGAL(make_params(), state_free="swann")


def test_coordinate_subspace_is_refused():
    with pytest.raises(ValueError, match=r"state_free='swan'.*subspace='coordinate'"):
        FRUGAL(make_params(), subspace="coordinate", state_free="swan")
    with pytest.raises(ValueError, match="subspace='block' or 'projection'"):
        ReferenceFRUGAL([("w", make_params()[0])], subspace="coordinate", state_free="swan")


@pytest.mark.parametrize("comm", ["sign", "hierarchical"])
def test_sign_residual_comm_is_refused(comm):
    with pytest.raises(ValueError, match=rf"residual_comm='{comm}'.*state_free='swan'"):
        FRUGAL(
            make_params(), density=0.0, state_free="swan", residual_comm=comm, reduce_gradients=True
        )


def test_in_out_weight_is_refused():
    ps = make_params()
    setattr(ps[0], IN_OUT_ATTR, True)
    with pytest.raises(ValueError, match=r"state_free='swan'.*stored \(in, out\)"):
        FRUGAL(ps, density=0.0, state_free="swan")


class _ShardingLayout:  # a bound engine layout (ZeRO / FSDP) as check_layout_options sees it
    pass


def test_sharded_layout_is_refused_when_bound():
    opt = FRUGAL(make_params(), density=0.0, state_free="swan")
    with pytest.raises(ValueError, match=r"state_free='swan'.*_ShardingLayout.*2 ranks"):
        check_layout_options(opt.param_groups, _ShardingLayout(), 2)
    check_layout_options(opt.param_groups, _ShardingLayout(), 1)  # one rank: whole tensors
    whole = _ShardingLayout()
    whole.whole_params = True  # a layout that keeps whole tensors per rank (fairscale OSS)
    check_layout_options(opt.param_groups, whole, 2)


def test_a_fragment_is_refused_at_the_step():
    group = {"state_free": "swan"}
    frag = SimpleNamespace(span=RowSpan(4, 6, 6, 12), group=group, name="w")
    with pytest.raises(ValueError, match=r"state_free='swan'.*'w' is a fragment"):
        matrix_free.whole_matrix(frag, torch.zeros(12))
    whole = SimpleNamespace(span=RowSpan(4, 6, 0, 24), group=group, name="w")
    assert matrix_free.whole_matrix(whole, torch.zeros(24)).shape == (4, 6)


def test_clip_grad_norm_without_the_multiply_matches_torch_clipping():
    """``FRUGAL.clip_grad_norm_`` hands swan items the scaled gradient (clip mode FULL: swan
    is not in the sign-only rules), so the step equals torch's clip then step."""
    for kw in (dict(density=0.0), dict(density=0.4, subspace="projection", proj_type="svd")):
        ps = make_params()
        qs = clone_params(ps)
        a = FRUGAL(ps, lr=1e-2, state_free="swan", update_gap=3, **kw)
        b = FRUGAL(qs, lr=1e-2, state_free="swan", update_gap=3, **kw)
        for grads in grad_stream(SHAPES, 6):
            set_grads(ps, [g * 10 for g in grads])
            set_grads(qs, [g * 10 for g in grads])
            a.clip_grad_norm_(1.0)
            a.step()
            torch.nn.utils.clip_grad_norm_(qs, 1.0)
            b.step()
        assert max_diff(ps, qs) < 1e-6, kw


def test_a_swan_group_added_under_the_sign_vote_is_refused():
    ps = make_params()
    opt = FRUGAL(ps[:2], residual_comm="sign", reduce_gradients=True)
    with pytest.raises(ValueError, match=r"residual_comm='sign'.*state_free='swan'"):
        opt.add_param_group({"params": ps[2:], "state_free": "swan", "density": 0.0})
    assert len(opt.param_groups) == 1  # not added
