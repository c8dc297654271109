"""kernels/projection.py and kernels/refresh.py on CUDA: every backend and precision against the
float64 oracle, the on-device refreshes' energy and determinism. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from frugal_dist.kernels.projection import (
    apply_projection,
    matmul_precision,
    project_down,
    reference_projection_step,
)
from frugal_dist.kernels.refresh import (
    captured_energy,
    optimal_energy,
    random_bases,
    svd_bases,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
HP = dict(lr=0.01, weight_decay=0.1, s_p=0.7, s_i=0.5)
# (atol of G_sf relative to its scale, fraction of W entries allowed off by a sign flip)
TOL = {"fp32": (1e-5, 1e-4), "tf32": (5e-3, 0.02), "bf16": (2e-2, 0.05)}


def _problem(side, m, n, B=4, r=64):
    gen = torch.Generator(device="cuda").manual_seed(0)
    G = [torch.randn(m, n, device="cuda", generator=gen) for _ in range(B)]
    W = [torch.randn(m, n, device="cuda", generator=gen) for _ in range(B)]
    P = random_bases(n if side == "right" else m, r, list(range(B)), "cuda")
    return G, W, P


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "bmm", "triton"])
@pytest.mark.parametrize("side,m,n", [("right", 512, 256), ("left", 256, 512), ("right", 700, 300)])
def test_step_matches_float64_oracle(precision, backend, side, m, n):
    if backend == "triton":
        pytest.importorskip("triton")
    G, W, P = _problem(side, m, n)
    X = project_down(G, P, side, precision=precision, backend=backend)
    U = torch.randn_like(X)
    W2 = [w.clone() for w in W]
    apply_projection(W2, G, P, X, U, side, precision=precision, backend=backend, **HP)
    tol, frac = TOL[precision]
    flip = 2 * HP["lr"] * HP["s_p"] * HP["s_i"]
    for b in range(len(G)):
        g_sf, w_ref = reference_projection_step(W[b], G[b], P[b], U[b], side, **HP)
        scale = g_sf.abs().max().item()
        assert (X[b].double() - g_sf).abs().max().item() <= tol * scale
        err = (W2[b].double() - w_ref).abs()
        smooth = HP["lr"] * HP["s_p"] * tol * 10 + 1e-5  # rounding away from sign flips
        assert (err > smooth).double().mean().item() <= frac
        assert err.max().item() <= flip * 1.01 + smooth


def test_backends_agree_in_fp32_on_the_down_product():
    G, _, P = _problem("right", 512, 256)
    a = project_down(G, P, "right", precision="fp32", backend="torch")
    b = project_down(G, P, "right", precision="fp32", backend="bmm")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_matmul_precision_restores_the_global_setting():
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32
    with matmul_precision("tf32"):
        pass
    with matmul_precision("fp32"):
        pass
    after = mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32
    assert before == after


@pytest.mark.parametrize("qr", ["householder", "cholesky"])
def test_random_bases_on_device(qr):
    P = random_bases(2048, 512, [1, 2, 3], "cuda", qr=qr)
    assert P.is_cuda and P.dtype == torch.float32
    eye = torch.eye(512, device="cuda").expand(3, 512, 512)
    torch.testing.assert_close(P.mT @ P, eye, atol=1e-4, rtol=0)
    assert torch.equal(P, random_bases(2048, 512, [1, 2, 3], "cuda", qr=qr))


@pytest.mark.parametrize("method,kw", [("randomized", dict(power_iters=1, oversample=8)),
                                       ("warm", dict(power_iters=1))])  # fmt: skip
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("qr", ["householder", "cholesky"])
def test_svd_sketches_on_device(method, kw, precision, qr):
    gen = torch.Generator(device="cuda").manual_seed(1)
    m, n, r = 1024, 512, 32
    G = []
    for _ in range(3):
        u = torch.linalg.qr(torch.randn(m, r, device="cuda", generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, r, device="cuda", generator=gen))[0]
        s = torch.linspace(30.0, 10.0, r, device="cuda")
        G.append((u * s) @ v.T + 0.05 * torch.randn(m, n, device="cuda", generator=gen))
    prev = None
    if method == "warm":
        prev = svd_bases([g + 0.1 * torch.randn_like(g) for g in G], r, "right", method="exact")
    P = svd_bases(G, r, "right", method=method, seeds=[1, 2, 3], previous=prev, qr=qr,
                  precision=precision, **kw)  # fmt: skip
    ratio = captured_energy(G, P, "right") / optimal_energy(G, r)
    assert (ratio >= 0.9).all(), ratio
    again = svd_bases(G, r, "right", method=method, seeds=[1, 2, 3], previous=prev, qr=qr,
                      precision=precision, **kw)  # fmt: skip
    assert torch.equal(P, again)
