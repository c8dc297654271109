"""kernels/projection.py and kernels/refresh.py against slow float64 formulas (CPU).

The oracle of the step is ``reference_projection_step`` (the equations of core/reference.py
written out per matrix in float64); the oracle of a refresh is the exact SVD (Eckart-Young:
``optimal_energy``)."""

from __future__ import annotations

import pytest
import torch

from frugal_dist.core.subspaces import ProjectionSelection, projection_selection
from frugal_dist.kernels.projection import (
    apply_projection,
    chunks,
    matmul_precision,
    project_down,
    reference_projection_step,
)
from frugal_dist.kernels.refresh import (
    captured_energy,
    optimal_energy,
    orthonormalize,
    random_bases,
    svd_bases,
)

CASES = [("right", (40, 24)), ("left", (24, 40)), ("right", (32, 32)), ("left", (32, 32))]
HP = dict(lr=0.1, weight_decay=0.1, s_p=0.7, s_i=0.5)


def _problem(side, shape, B=3, r=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    G = [torch.randn(m, n, generator=gen) for _ in range(B)]
    W = [torch.randn(m, n, generator=gen) for _ in range(B)]
    dim = n if side == "right" else m
    P = random_bases(dim, r, [seed * 10 + b for b in range(B)], "cpu")
    return G, W, P


def _low_rank_plus_noise(B, m, n, r, noise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        s = torch.linspace(3.0, 1.0, r)  # distinct singular values, then a noise floor
        u = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
        out.append((u * s) @ v.T * 10 + noise * torch.randn(m, n, generator=gen))
    return out


# ------------------------------------------------------------------------------ the step
@pytest.mark.parametrize("backend", ["torch", "bmm"])
@pytest.mark.parametrize("rule", ["signsgd", "sgd", "none"])
@pytest.mark.parametrize("side,shape", CASES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fp32_step_matches_reference(backend, rule, side, shape, wd):
    G, W, P = _problem(side, shape)
    X = project_down(G, P, side, precision="fp32", backend=backend)
    U = torch.randn_like(X)
    W2 = [w.clone() for w in W]
    hp = {**HP, "weight_decay": wd}
    # chunk_elems small: several chunks of the stacked batch
    apply_projection(W2, G, P, X, U, side, rule=rule, precision="fp32", backend=backend,
                     chunk_elems=2 * shape[0] * shape[1], **hp)  # fmt: skip
    for b in range(len(G)):
        g_sf, w_ref = reference_projection_step(W[b], G[b], P[b], U[b], side, rule=rule, **hp)
        torch.testing.assert_close(X[b].double(), g_sf, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(W2[b].double(), w_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side,shape", CASES[:2])
def test_down_matches_projection_selection(side, shape):
    """The batched down equals core's ProjectionSelection.down, matrix by matrix."""
    G, _, P = _problem(side, shape)
    X = project_down(torch.stack(G), P, side, precision="fp32", backend="bmm")
    for b in range(len(G)):
        torch.testing.assert_close(X[b], ProjectionSelection(side, P[b]).down(G[b]))


@pytest.mark.parametrize("backend", ["torch", "bmm"])
@pytest.mark.parametrize("side,shape", CASES[:2])
def test_bf16_step_close_to_reference(backend, side, shape):
    """bf16 operands: G_sf to bf16 rounding; W off only where sign(R) flips (|R| ~ 0), by at most
    2 lr s_p s_i there, on a small fraction of entries."""
    G, W, P = _problem(side, shape, r=8)
    X = project_down(G, P, side, precision="bf16", backend=backend)
    U = torch.randn_like(X)
    W2 = [w.clone() for w in W]
    apply_projection(W2, G, P, X, U, side, precision="bf16", backend=backend, **HP)
    flip = 2 * HP["lr"] * HP["s_p"] * HP["s_i"]
    for b in range(len(G)):
        g_sf, w_ref = reference_projection_step(W[b], G[b], P[b], U[b], side, **HP)
        torch.testing.assert_close(X[b].double(), g_sf, atol=3e-2, rtol=2e-2)
        err = (W2[b].double() - w_ref).abs()
        assert err.max() <= flip * 1.01 + 1e-2
        assert (err > 1e-2).float().mean() < 0.03


def test_apply_rejects_bad_input():
    G, W, P = _problem("right", (40, 24))
    X = project_down(G, P, "right", precision="fp32")
    with pytest.raises(ValueError, match="precision"):
        apply_projection(W, G, P, X, X, "right", lr=0.1, precision="fp16")
    with pytest.raises(ValueError, match="rule"):
        apply_projection(W, G, P, X, X, "right", lr=0.1, rule="adam")
    with pytest.raises(ValueError, match="not contiguous"):
        apply_projection([w.T for w in W], G, P, X, X, "right", lr=0.1)
    with pytest.raises(ValueError, match="u must be"):
        apply_projection(W, G, P, X, X[:, :, :3], "right", lr=0.1)
    with pytest.raises(ValueError, match="basis with 24 rows"):
        project_down([torch.randn(5, 5)], P[:1], "right")


def test_chunks_cover_every_item_once():
    assert chunks(5, 10, 25) == [(0, 2), (2, 4), (4, 5)]
    assert chunks(3, 100, 1) == [(0, 1), (1, 2), (2, 3)]  # at least one item per chunk


# ------------------------------------------------------------------------------ refreshes
@pytest.mark.parametrize("qr", ["householder", "cholesky"])
def test_random_bases_orthonormal_and_deterministic(qr):
    P = random_bases(50, 7, [1, 2, 3], "cpu", qr=qr)
    eye = torch.eye(7).expand(3, 7, 7)
    torch.testing.assert_close(P.mT @ P, eye, atol=1e-5, rtol=0)
    assert torch.equal(P, random_bases(50, 7, [1, 2, 3], "cpu", qr=qr))  # same seeds: same bits
    assert torch.equal(P[1], random_bases(50, 7, [2], "cpu", qr=qr)[0])  # per-matrix seed only
    assert not torch.allclose(P[0], P[1])


def test_random_bases_qr_methods_agree():
    """Both QRs give the Q with diag(R) > 0, which is unique for a full-rank Gaussian."""
    a = random_bases(60, 9, [4, 5], "cpu", qr="householder")
    b = random_bases(60, 9, [4, 5], "cpu", qr="cholesky")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cholesky_qr_falls_back_on_rank_deficient_input():
    Y = torch.randn(2, 30, 6)
    Y[1, :, 3:] = 0.0  # rank 3 of 6: Cholesky QR cannot orthonormalise it
    Q = orthonormalize(Y, "cholesky")
    torch.testing.assert_close(Q.mT @ Q, torch.eye(6).expand(2, 6, 6), atol=1e-5, rtol=0)
    # the span of the 3 real columns is kept
    proj = Q[1] @ (Q[1].T @ Y[1, :, :3])
    torch.testing.assert_close(proj, Y[1, :, :3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_exact_matches_core_svd_span(side):
    G = _low_rank_plus_noise(2, 36, 28, 5, 0.1)
    P = svd_bases(G, 5, side, method="exact")
    for b in range(2):
        dim = 36 if side == "left" else 28  # the rank is counted on the projected dimension
        ref = projection_selection((36, 28), 5 / dim, "svd", side, 0, grad=G[b]).basis
        torch.testing.assert_close(P[b] @ P[b].T, ref @ ref.T, atol=1e-4, rtol=0)  # same span


METHODS = [
    ("randomized", dict(power_iters=1)),
    ("randomized", dict(power_iters=1, oversample=8)),
    ("warm", dict(power_iters=1)),
    ("warm", dict(power_iters=2, oversample=4)),
]


@pytest.mark.parametrize("method,kw", METHODS)
@pytest.mark.parametrize("qr", ["householder", "cholesky"])
@pytest.mark.parametrize("side,shape", [("left", (48, 80)), ("right", (80, 48))])
def test_sketches_capture_the_top_energy(method, kw, qr, side, shape):
    """Low rank plus noise: the sketches reach >= 0.9 of the exact top-r energy; warm starts from
    the exact basis of a perturbed gradient (the previous refresh)."""
    r, B = 8, 3
    G = _low_rank_plus_noise(B, *shape, r, noise=0.5)
    prev = None
    if method == "warm":
        prev_g = [g + 2.0 * torch.randn_like(g) for g in G]
        prev = svd_bases(prev_g, r, side, method="exact")
    P = svd_bases(G, r, side, method=method, seeds=[11, 12, 13], previous=prev, qr=qr, **kw)
    dim = shape[0] if side == "left" else shape[1]
    assert P.shape == (B, dim, r)
    torch.testing.assert_close(P.mT @ P, torch.eye(r).expand(B, r, r), atol=1e-5, rtol=0)
    ratio = captured_energy(G, P, side) / optimal_energy(G, r)
    assert (ratio >= 0.9).all(), ratio
    assert (ratio <= 1 + 1e-9).all(), ratio  # nothing beats Eckart-Young
    again = svd_bases(G, r, side, method=method, seeds=[11, 12, 13], previous=prev, qr=qr, **kw)
    assert torch.equal(P, again)  # deterministic from the seeds


def test_sketch_on_plain_noise_is_still_orthonormal_and_sane():
    """No low-rank structure: a sketch still gives an orthonormal basis capturing at least the
    rank/dim share a random basis gets on average."""
    G = [torch.randn(64, 40) for _ in range(2)]
    P = svd_bases(G, 10, "right", method="randomized", seeds=[1, 2], power_iters=1)
    assert (captured_energy(G, P, "right") >= 10 / 40).all()


def test_power_iteration_improves_the_plain_range_finder():
    """The plain range finder (q = 0, no oversampling) falls short (~0.67 of the best here), one
    power step closes the gap."""
    G = _low_rank_plus_noise(3, 48, 80, 8, noise=0.5)
    best = optimal_energy(G, 8)
    q0 = svd_bases(G, 8, "left", method="randomized", seeds=[1, 2, 3], power_iters=0)
    q1 = svd_bases(G, 8, "left", method="randomized", seeds=[1, 2, 3], power_iters=1)
    assert (captured_energy(G, q1, "left") > captured_energy(G, q0, "left")).all()
    assert (captured_energy(G, q1, "left") / best >= 0.9).all()


def test_warm_without_previous_is_randomized():
    G = _low_rank_plus_noise(2, 40, 30, 4, 0.5)
    a = svd_bases(G, 4, "left", method="warm", seeds=[3, 4])
    b = svd_bases(G, 4, "left", method="randomized", seeds=[3, 4])
    assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["left", "right"])
def test_float64_gradients_stay_float64_up_to_the_basis(side):
    """float64 input: products and QR in float64, one rounding to float32 at the end. ``warm``
    is bit-identical to the float64 power step written out (the optimizer's former float64
    branch); ``randomized`` matches the float64 oracle (``ref_randomized_range``, Householder
    instead of CholeskyQR2: ~1e-15 apart before the rounding)."""
    from frugal_dist.core.reference_selection import REF_POWER_ITERS, ref_randomized_range

    G = torch.stack(_low_rank_plus_noise(3, 40, 30, 4, 0.5)).double()
    r = 4
    A = G if side == "left" else G.mT
    prev = svd_bases(G.float(), r, side, method="exact")
    warm = svd_bases(G, r, side, method="warm", previous=prev, qr="cholesky")
    want = orthonormalize(A @ (A.mT @ prev.double()), "cholesky")
    assert want.dtype == torch.float64
    assert warm.dtype == torch.float32
    assert torch.equal(warm, want.float())
    rnd = svd_bases(G, r, side, method="randomized", seeds=[5, 6, 7], qr="cholesky",
                    power_iters=REF_POWER_ITERS)  # fmt: skip
    for b, seed in enumerate([5, 6, 7]):
        ref = ref_randomized_range(G[b], r, side, seed)
        torch.testing.assert_close(rnd[b].double(), ref, atol=1e-6, rtol=0)
    # float32 input of the same gradient: the float32 path, not the same bits
    assert not torch.equal(warm, svd_bases(G.float(), r, side, method="warm", previous=prev))


def test_svd_bases_chunked_equals_unchunked():
    G = _low_rank_plus_noise(5, 30, 20, 3, 0.5)
    a = svd_bases(G, 3, "right", method="randomized", seeds=list(range(5)))
    b = svd_bases(G, 3, "right", method="randomized", seeds=list(range(5)), chunk_elems=1200)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_svd_bases_rejects_bad_input():
    G = [torch.randn(10, 8)]
    with pytest.raises(ValueError, match="method"):
        svd_bases(G, 2, "left", method="lanczos")
    with pytest.raises(ValueError, match="one seed per matrix"):
        svd_bases(G, 2, "left", method="randomized")
    with pytest.raises(ValueError, match="previous must be"):
        svd_bases(G, 2, "left", method="warm", previous=torch.zeros(1, 8, 2), seeds=[0])
    with pytest.raises(ValueError, match="power_iters >= 1"):
        svd_bases(G, 2, "left", method="warm", seeds=[0], power_iters=0)
    with pytest.raises(ValueError, match="rank must be"):
        svd_bases(G, 9, "left", method="exact")


def test_energy_metrics():
    G = [torch.diag(torch.tensor([3.0, 2.0, 1.0]))]
    e1 = torch.eye(3)[:, :1].unsqueeze(0)
    assert captured_energy(G, e1, "left").item() == pytest.approx(9 / 14)
    assert optimal_energy(G, 1).item() == pytest.approx(9 / 14)
    assert optimal_energy(G, 2).item() == pytest.approx(13 / 14)
    assert captured_energy([torch.zeros(3, 3)], e1, "left").item() == 1.0


# ------------------------------------------------------------------------- triton (interpreter)
def _triton_or_skip():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":  # these tests use CPU tensors
        pytest.skip("the triton backend on CPU tensors needs TRITON_INTERPRET=1 (CUDA: tests/gpu)")
    pytest.importorskip("triton")


@pytest.mark.parametrize("rule", ["signsgd", "sgd", "none"])
@pytest.mark.parametrize("side,shape", [("right", (70, 40)), ("left", (40, 70))])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_triton_fused_apply_matches_reference(rule, side, shape, wd):
    """fp32 only here: the CPU interpreter's tl.dot on bfloat16 operands returns garbage (even
    for a plain 16x16 product), so bf16 is checked in tests/gpu. Shapes are not tile multiples
    and the rank (20) is not a multiple of the K tile (16): every mask is exercised."""
    _triton_or_skip()
    G, W, P = _problem(side, shape, B=2, r=20)
    X = project_down(G, P, side, precision="fp32", backend="triton")
    U = torch.randn_like(X)
    W2 = [w.clone() for w in W]
    hp = {**HP, "weight_decay": wd}
    apply_projection(W2, G, P, X, U, side, rule=rule, precision="fp32", backend="triton", **hp)
    for b in range(len(G)):
        _, w_ref = reference_projection_step(W[b], G[b], P[b], U[b], side, rule=rule, **hp)
        torch.testing.assert_close(W2[b].double(), w_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side,shape", [("right", (70, 40)), ("left", (40, 70))])
@pytest.mark.parametrize("grads_kind", ["fp32", "bf16", "non-contiguous", "stacked"])
def test_triton_down_matches_reference(side, shape, grads_kind):
    """The batched Triton down product (fp32: see above) against the float64 oracle's G_sf, for
    float32, bfloat16, transposed-view and stacked (B, m, n) gradients; the rank (20) and the
    contracted dimension (40 or 70) are not multiples of the K tile (16)."""
    _triton_or_skip()
    G, _, P = _problem(side, shape, B=2, r=20)
    if grads_kind == "bf16":
        G = [g.bfloat16() for g in G]
    elif grads_kind == "non-contiguous":
        G = [g.T.contiguous().T for g in G]
    elif grads_kind == "stacked":
        G = torch.stack(G)
    X = project_down(G, P, side, precision="fp32", backend="triton")
    for b in range(2):
        g_sf, _ = reference_projection_step(G[b].float(), G[b].float(), P[b], X[b] * 0, side,
                                            lr=0.0, rule="none")  # fmt: skip
        torch.testing.assert_close(X[b].double(), g_sf, atol=1e-5, rtol=1e-5)


def test_triton_sign_propagates_nan_like_torch():
    _triton_or_skip()
    G, W, P = _problem("right", (40, 24), B=1, r=4)
    G[0][3, 5] = float("nan")
    X = project_down(G, P, "right", precision="fp32", backend="torch")
    apply_projection(W, G, P, X, torch.zeros_like(X), "right", lr=0.1, backend="triton",
                     precision="fp32")  # fmt: skip
    assert W[0][3].isnan().any()  # the NaN row's residual is NaN wherever G_sf spreads it


def test_matmul_precision_restores_the_flag():
    """(The legacy ``allow_tf32`` getter raises once the new API was used, so only the new flag
    is read here; tests/gpu checks a fresh process's state.)"""
    mm = torch.backends.cuda.matmul
    saved = mm.fp32_precision
    try:
        for setup in ("none", "tf32", "ieee"):
            mm.fp32_precision = setup
            before = mm.fp32_precision
            for p in ("fp32", "tf32", "bf16"):
                with matmul_precision(p):
                    assert mm.fp32_precision == ("ieee" if p == "fp32" else "tf32")
            assert mm.fp32_precision == before
    finally:
        mm.fp32_precision = saved


@pytest.mark.parametrize("backend", ["torch", "bmm", "triton"])
@pytest.mark.parametrize("grads_kind", ["bf16", "non-contiguous"])
def test_apply_takes_bf16_and_strided_gradients(backend, grads_kind):
    """16-bit gradients (promoted in the residual) and non-contiguous ones (strides honoured)."""
    if backend == "triton":
        _triton_or_skip()
    _, W, P = _problem("right", (70, 40), B=2, r=20)
    gen = torch.Generator().manual_seed(5)
    if grads_kind == "bf16":
        G = [torch.randn(70, 40, generator=gen).bfloat16() for _ in range(2)]
    else:
        G = [torch.randn(40, 70, generator=gen).T for _ in range(2)]
    X = project_down(G, P, "right", precision="fp32", backend="torch")
    U = torch.randn_like(X)
    W2 = [w.clone() for w in W]
    apply_projection(W2, G, P, X, U, "right", precision="fp32", backend=backend, **HP)
    for b in range(2):
        _, w_ref = reference_projection_step(W[b], G[b].float(), P[b], U[b], "right", **HP)
        torch.testing.assert_close(W2[b].double(), w_ref, atol=1e-5, rtol=1e-5)


def test_triton_tiles_file_overrides_defaults_and_rejects_bad_entries(tmp_path):
    """kernels/projection_tiles.json (the measured tile table): entries override the built-in
    defaults per kernel and precision; a malformed entry is an error naming it."""
    pt = pytest.importorskip("frugal_dist.kernels.projection_triton")
    f = tmp_path / "tiles.json"
    f.write_text('{"apply": {"bf16": [64, 32, 16, 4, 2]}, "down_backend": {"tf32": "bmm"}}')
    tiles, down = pt.load_tiles(f)
    assert tiles["apply"]["bf16"] == (64, 32, 16, 4, 2)
    assert tiles["apply"]["tf32"] == pt._DEFAULT_TILES["apply"]["tf32"]
    assert down == {"fp32": "triton", "tf32": "bmm", "bf16": "triton"}
    f.write_text('{"down": {"tf32": [64, 32, 16]}}')
    with pytest.raises(ValueError, match="down.tf32"):
        pt.load_tiles(f)
    f.write_text('{"down_backend": {"bf16": "cublas"}}')
    with pytest.raises(ValueError, match="down_backend.bf16"):
        pt.load_tiles(f)
    assert pt.load_tiles(tmp_path / "absent.json")[0] == pt._DEFAULT_TILES
