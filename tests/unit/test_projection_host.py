"""Host-side tables of the batched projection kernels made once per plan: ``Moments``
(``kernels.projection_state``), ``ParamBatch`` (``kernels.projection``), the address tables with
their alignment and ``uniform_strides`` (``kernels.projection_triton``), the host ``cdiv``. The
kernels run under the Triton interpreter (``PYTHONPATH=$PWD:/work/triton_site
TRITON_INTERPRET=1``, skipped otherwise); the prepared forms must give the same bits as the
per-call lists."""

from __future__ import annotations

import pytest
import torch

from tests.triton_marks import needs_interpreter

BETAS = (0.9, 0.999)


def _moments(B: int, A: int, C: int, seed: int = 0) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    ms = [0.1 * torch.randn(A, C, generator=gen) for _ in range(B)]
    vs = [torch.rand(A, C, generator=gen) for _ in range(B)]
    return ms, vs


@needs_interpreter
@pytest.mark.parametrize("steps", [[3, 3], [1, 5]], ids=["same-t", "per-item-t"])
def test_adamw_state_with_moments_equals_the_lists(steps):
    from frugal_dist.kernels.projection_state import adamw_state, moments

    B, A, C = 2, 9, 12
    x = torch.randn(B, A, C, generator=torch.Generator().manual_seed(2))
    ms1, vs1 = _moments(B, A, C)
    ms2, vs2 = [m.clone() for m in ms1], [v.clone() for v in vs1]
    u1, u2 = torch.empty_like(x), torch.empty_like(x)
    adamw_state(x, ms1, vs1, steps, BETAS, 1e-8, u1)
    mo = moments(ms2, vs2, A * C)
    for _ in range(2):  # the same Moments at every step, as a plan holds it
        adamw_state(x, mo, None, steps, BETAS, 1e-8, u2)
    adamw_state(x, ms1, vs1, steps, BETAS, 1e-8, u1)
    assert torch.equal(u1, u2)
    for a, b in zip(ms1 + vs1, ms2 + vs2):
        assert torch.equal(a, b)


def test_moments_check_once_and_reject_bad_input():
    pytest.importorskip("triton")
    from frugal_dist.kernels.projection_state import adamw_state, moments

    ms, vs = _moments(2, 4, 6)
    with pytest.raises(ValueError, match="exp_avg_sq\\[1\\] must be a contiguous float32"):
        moments(ms, [vs[0], vs[1].T], 24)
    with pytest.raises(ValueError, match="exp_avg\\[0\\] must be a contiguous float32"):
        moments([ms[0].double(), ms[1]], vs, 24)
    with pytest.raises(ValueError, match="same B >= 1"):
        moments(ms, vs[:1], 24)
    mo = moments(ms, vs, 24)
    want = 0
    for t in ms + vs:
        want |= t.data_ptr()
    assert mo.ors == want and mo.entries == 24 and mo.m_table.tolist() == [t.data_ptr() for t in ms]
    x = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="exp_avg_sqs must be None"):
        adamw_state(x, mo, vs, [1, 1], BETAS, 1e-8, torch.empty_like(x))
    with pytest.raises(ValueError, match="24 entries each, x's matrices 4x5"):
        adamw_state(torch.randn(2, 4, 5), mo, None, [1, 1], BETAS, 1e-8, torch.empty(2, 4, 5))
    with pytest.raises(ValueError, match="need 2 exp_avg"):
        adamw_state(x, mo, None, [1], BETAS, 1e-8, torch.empty_like(x))
    with pytest.raises(ValueError, match="exp_avg_sqs is needed"):
        adamw_state(x, ms, None, [1, 1], BETAS, 1e-8, torch.empty_like(x))


def test_addresses_cache_the_table_and_the_alignment():
    pytest.importorskip("triton")
    from frugal_dist.kernels.projection_triton import addresses

    base = torch.zeros(64)
    mats = [base[:16], base[16:32]]
    table, ors = addresses(mats)
    assert table.tolist() == [t.data_ptr() for t in mats]
    assert ors == mats[0].data_ptr() | mats[1].data_ptr()
    again = addresses(mats)
    assert again[0] is table and again[1] == ors  # a hit: the cached table
    odd = [base[1:17], base[16:32]]  # 4 bytes past a 16-byte boundary (base is aligned)
    assert addresses(odd)[1] & 15 == 4  # the launches' ALIGNED is then off


def test_uniform_strides_fast_path_matches_the_general_rule():
    pytest.importorskip("triton")
    from frugal_dist.kernels.projection_triton import uniform_strides

    gs = [torch.randn(4, 6) for _ in range(3)]
    out = uniform_strides(gs, 4, 6)
    assert all(a is b for a, b in zip(out, gs))  # contiguous (m, n) of one dtype: as they are
    flat = [g.reshape(-1) for g in gs]
    assert all(o.shape == (4, 6) and o.data_ptr() == g.data_ptr()
               for o, g in zip(uniform_strides(flat, 4, 6), gs))  # fmt: skip
    mixed = [gs[0], gs[1].T.contiguous().T]  # another stride pair: copied to one layout
    out = uniform_strides(mixed, 4, 6)
    assert out[0].stride() == out[1].stride() and torch.equal(out[1], gs[1])
    half = [gs[0], gs[1].half()]  # another dtype: cast to the first's
    out = uniform_strides(half, 4, 6)
    assert out[1].dtype == torch.float32 and torch.equal(out[1], gs[1].half().float())
    rows = [torch.randn(1, 8)[:, :6], torch.randn(1, 6)]  # m = 1: the general rule (the row
    out = uniform_strides(rows, 1, 6)  # stride is never used: one row), the same values
    assert torch.equal(out[0], rows[0]) and torch.equal(out[1], rows[1])


@needs_interpreter
@pytest.mark.parametrize("side", ["right", "left"])
def test_apply_with_param_batch_equals_the_list(side):
    from frugal_dist.kernels.projection import ParamBatch, apply_projection

    gen = torch.Generator().manual_seed(5)
    B, m, n, r = 2, 12, 10, 4
    dim = m if side == "left" else n
    P = torch.linalg.qr(torch.randn(B, dim, r, generator=gen)).Q.contiguous()
    G = [torch.randn(m, n, generator=gen) for _ in range(B)]
    W = [torch.randn(m, n, generator=gen) for _ in range(B)]
    a, c = (m, r) if side == "right" else (r, n)
    X = torch.randn(B, a, c, generator=gen)
    U = torch.randn(B, a, c, generator=gen)
    W1, W2 = [w.clone() for w in W], [w.clone() for w in W]
    held = ParamBatch(W2)
    hp = dict(lr=1e-2, weight_decay=0.1, s_p=0.8, s_i=0.5, precision="fp32", backend="triton")
    for _ in range(2):  # the same ParamBatch at every step, as a plan holds it
        apply_projection(W1, G, P, X, U, side, **hp)
        apply_projection(held, G, P, X, U, side, **hp)
    assert held.addresses is not None and held.checked is not None
    for w1, w2 in zip(W1, W2):
        assert torch.equal(w1, w2)


def test_param_batch_rejects_what_the_list_rejects():
    from frugal_dist.kernels.projection import ParamBatch, apply_projection

    W = [torch.randn(6, 4).T]  # not contiguous
    X = torch.randn(1, 4, 2)
    P = torch.randn(1, 6, 2)
    G = [torch.randn(4, 6)]
    with pytest.raises(ValueError, match="params\\[0\\] is not contiguous"):
        apply_projection(ParamBatch(W), G, P, X, X, "right", lr=0.1, backend="torch")


def test_host_cdiv_is_triton_cdiv():
    triton = pytest.importorskip("triton")
    from frugal_dist.kernels.projection_apply_v2 import cdiv

    for a in range(1, 70):
        for b in (1, 3, 16, 32, 64):
            assert cdiv(a, b) == triton.cdiv(a, b)
