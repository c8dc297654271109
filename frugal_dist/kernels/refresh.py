"""Projection refreshes on the device, batched over same-shape matrices.

Every function takes B matrices of one shape (m, n) and returns bases (B, dim, r), float32, with
dim = m for ``left`` (P spans the top left singular vectors: down(G) = P^T G) and dim = n for
``right`` (top right singular vectors: down(G) = G P). Write A = G (left) or A = G^T (right),
a (dim x o) matrix whose dominant column space is wanted, and k = min(r + oversample, dim, o).
float64 gradients are kept in float64 throughout (products, QR, Rayleigh-Ritz; ``precision`` does
not apply) and only the bases are rounded to float32: float32 rounding of G would turn last-bit
gradient differences (between engines' reduction orders) into basis differences.

``svd_bases(method=...)``:

* ``exact``       -- ``torch.linalg.svd`` of every matrix (the old path; tens of seconds at 1B).
* ``randomized``  -- Halko-Martinsson-Tropp range finder: Y = A Omega with a seeded Gaussian
                     Omega (o x k), then ``power_iters`` times Q = orth(A (A^T orth(Y))).
                     Products: (1 + 2 q) of (dim x o) . k.
* ``warm``        -- subspace iteration from the previous basis: Q = [P_prev | Omega_p / sqrt(dim)]
                     (Omega_p: k - r seeded Gaussian columns), then ``power_iters`` (>= 1) times
                     Q = orth(A (A^T Q)). One step = 2 products and one thin QR; without a
                     previous basis it is ``randomized`` (with the caller's ``power_iters``).

With oversampling (k > r) a Rayleigh-Ritz step keeps the best r directions of span(Q): the
top-r eigenvectors V of C = (Q^T A)(Q^T A)^T (k x k, float64), P = Q V (one more product).
With k = r the basis is Q itself (only the span matters for down / up / residual). The batched
k x k ``eigh`` dominates an oversampled refresh on CUDA (H200, LLaMA-1B, k = r + 8 = 520: warm
p=8 1.113 s against p=0 0.102 s: the products differ by 1.6 %, the rest is Rayleigh-Ritz),
while p=8 buys little energy over p=0 at the same power steps (CPU, 1B shapes, q=2: 0.9767 vs
0.9754 of the exact top-r), so the optimizer's refreshes use p = 0 (``optim.svd_refresh``).

``orth`` (``qr=``): ``householder`` (``torch.linalg.qr``, diag(R) >= 0) or ``cholesky``
(shifted CholeskyQR2 in float64: two Gram products and two triangular solves per matrix, all
batched; an entry whose Cholesky fails or whose Q^T Q is off the identity by more than 1e-6,
e.g. a rank-deficient Y, is redone with Householder).

``random_bases``: Haar-orthonormal bases orth(Gaussian) drawn on the device from per-matrix seeds
(derive them from (seed, name, refresh), ``core.seeding.projection_seed``). Same device model,
torch version and seed -> the same bits on every rank; CPU and CUDA draws differ.

``captured_energy`` / ``optimal_energy``: ||down(G)||^2 / ||G||^2 of a basis, and the best a
rank-r basis can reach (sum of the top r squared singular values over ||G||_F^2).

Communication: none (callers split matrices over owners and broadcast the bases).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from frugal_dist.kernels.projection import (
    CHUNK_ELEMS,
    PRECISIONS,
    SIDES,
    Batch,
    as_batch,
    check_choice,
    chunks,
    matmul_precision,
    mm32,
    operand_dtype,
)

METHODS = ("exact", "randomized", "warm")
QR_METHODS = ("householder", "cholesky")
ORTHO_TOL = 1e-6


# ------------------------------------------------------------------------------ building blocks
def gaussian(count: int, rows: int, cols: int, seeds: Sequence[int], device) -> Tensor:
    """(count, rows, cols) float32 standard normals, matrix b drawn by a generator on ``device``
    seeded with ``seeds[b]``."""
    if len(seeds) != count:
        raise ValueError(f"seeds has {len(seeds)} entries for {count} matrices")
    device = torch.device(device)
    out = torch.empty(count, rows, cols, device=device, dtype=torch.float32)
    for b, seed in enumerate(seeds):
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        out[b].normal_(generator=gen)
    return out


def _householder(Y: Tensor) -> Tensor:
    q, r = torch.linalg.qr(Y, mode="reduced")
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs.unsqueeze(-2)


def _cholesky_qr2(Y: Tensor) -> tuple[Tensor, Tensor]:
    """(Q in float64, bad entries) by shifted CholeskyQR2 (Fukaya et al. 2020)."""
    y = Y.double()
    d, k = y.shape[-2], y.shape[-1]
    eye = torch.eye(k, dtype=torch.float64, device=y.device)
    bad = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    for i in range(2):
        gram = y.mT @ y
        if i == 0:  # shift ~ 11 (d k + k (k + 1)) u ||Y||_F^2 keeps the factorisation defined
            tr = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
            shift = 11 * (d * k + k * (k + 1)) * torch.finfo(torch.float64).eps * tr
            gram = gram + shift[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(gram)
        bad |= info != 0
        chol = torch.where(bad[:, None, None], eye, chol)
        y = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False)
    err = (y.mT @ y - eye).abs().amax(dim=(-2, -1))
    return y, bad | ~(err <= ORTHO_TOL)


def orthonormalize(Y: Tensor, qr: str = "householder") -> Tensor:
    """An orthonormal basis (B, d, k) of each Y[b]'s column space (k <= d), with the R factor's
    diagonal positive (so a full-rank Y gives a unique Q): float64 for a float64 Y, else
    float32."""
    check_choice("qr", qr, QR_METHODS)
    if Y.shape[-1] > Y.shape[-2]:
        raise ValueError(f"cannot orthonormalise {Y.shape[-1]} columns in dimension {Y.shape[-2]}")
    dt = torch.float64 if Y.dtype == torch.float64 else torch.float32
    if qr == "householder" or Y.shape[-1] == 0:
        return _householder(Y.to(dt))
    q, bad = _cholesky_qr2(Y)
    q = q.to(dt)
    if bool(bad.any()):  # one host sync per refresh chunk
        idx = bad.nonzero().flatten()
        q[idx] = _householder(Y[idx].to(dt))
    return q


def _operator(G: Tensor, side: str) -> Tensor:
    """A = G (left) or G^T (right): (B, dim, o), a view."""
    return G if side == "left" else G.mT


def _stacked(grads: Batch, lo: int, hi: int, m: int, n: int, dt: torch.dtype) -> Tensor:
    if isinstance(grads, Tensor) and grads.dim() == 3 and grads.dtype == dt:
        return grads[lo:hi]
    out = torch.empty(hi - lo, m, n, device=grads[0].device, dtype=dt)
    torch._foreach_copy_(list(out.unbind(0)), [g.reshape(m, n) for g in grads[lo:hi]])
    return out


# ------------------------------------------------------------------------------ the refreshes
def _sketch_bases(
    A: Tensor, r: int, k: int, method: str, seeds: Sequence[int] | None,
    prev: Tensor | None, power_iters: int, qr: str,
) -> Tensor:  # fmt: skip
    """Bases (B, dim, r) of one chunk: A (B, dim, o) in the operand dtype (see module doc);
    float32, or float64 for a float64 A."""
    B, dim, o = A.shape
    dt = A.dtype
    wide = dt == torch.float64  # float64 products and bases, no float32 rounding before the end
    mm = torch.matmul if wide else mm32
    if method == "warm" and prev is not None:
        # No QR of the start: the previous basis is orthonormal and the extra Gaussian columns
        # (unit expected norm) need only be independent of it; A A^T Q is orthonormalised below.
        Q = prev.to(torch.float64 if wide else torch.float32)
        if k > r:
            extra = gaussian(B, dim, k - r, seeds, A.device) / dim**0.5
            Q = torch.cat([Q, extra.to(Q.dtype)], dim=-1)
    else:
        Q = orthonormalize(mm(A, gaussian(B, o, k, seeds, A.device).to(dt)), qr)
    for _ in range(power_iters):
        Z = mm(A.mT, Q.to(dt))
        Q = orthonormalize(mm(A, Z.to(dt)), qr)
    if k == r:
        return Q.contiguous()
    Bm = mm(Q.to(dt).mT, A).double()  # (B, k, o)
    _, vecs = torch.linalg.eigh(Bm @ Bm.mT)  # ascending eigenvalues
    V = vecs[..., -r:].flip(-1).to(Q.dtype)
    return (Q @ V).contiguous()


@torch.no_grad()
def svd_bases(
    grads: Batch,
    rank: int,
    side: str,
    *,
    method: str = "warm",
    seeds: Sequence[int] | None = None,
    previous: Batch | None = None,
    oversample: int = 0,
    power_iters: int = 1,
    qr: str = "householder",
    precision: str = "tf32",
    chunk_elems: int = CHUNK_ELEMS,
) -> Tensor:
    """Bases (B, dim, rank) float32 spanning (approximately, or exactly for ``exact``) the top
    ``rank`` singular vectors of each gradient (module docstring). ``grads``: a list of (m, n)
    matrices or a (B, m, n) tensor; ``seeds``: one int per matrix (needed unless ``exact``, or
    ``warm`` with ``previous`` and no oversampling); ``previous``: (B, dim, rank) bases of the
    last refresh (``warm``). ``precision`` applies to the (dim x o) products (``tf32`` /
    ``bf16`` on CUDA); the QR, Gram and eigen steps run in float32 / float64. float64
    ``grads`` run every step in float64 (all methods) and are rounded to float32 at the end.
    Temporaries: one stacked chunk of ``chunk_elems`` entries at a time. Communication: none."""
    check_choice("method", method, METHODS)
    check_choice("side", side, SIDES)
    check_choice("precision", precision, PRECISIONS)
    B = len(grads)
    if B == 0:
        raise ValueError("svd_bases: grads is empty")
    g0 = grads[0]
    m, n = (grads.shape[1], grads.shape[2]) if isinstance(grads, Tensor) else tuple(g0.shape)
    if len(g0.shape) != 2 and not isinstance(grads, Tensor):
        raise ValueError(f"grads must be (m, n) matrices, got shape {tuple(g0.shape)}")
    dim, o = (m, n) if side == "left" else (n, m)
    if not 0 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [0, {min(m, n)}] for {m}x{n}, got {rank}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, "
                         f"{power_iters}")  # fmt: skip
    k = min(rank + oversample, dim, o)
    prev = None
    if method == "warm":
        if power_iters < 1:
            raise ValueError("method='warm' needs power_iters >= 1 (one step: 2 products + QR)")
        if previous is not None:
            prev = as_batch(previous, "previous")
            if tuple(prev.shape) != (B, dim, rank):
                raise ValueError(f"previous must be ({B}, {dim}, {rank}) for {side} bases of "
                                 f"{m}x{n}, got {tuple(prev.shape)}")  # fmt: skip
    needs_seeds = method == "randomized" or (method == "warm" and (prev is None or k > rank))
    if needs_seeds and (seeds is None or len(seeds) != B):
        raise ValueError(f"method={method!r} needs one seed per matrix ({B}), got "
                         f"{None if seeds is None else len(seeds)}")  # fmt: skip
    dev = g0.device
    out = torch.empty(B, dim, rank, device=dev, dtype=torch.float32)
    if rank == 0:
        return out
    exact = method == "exact"
    if g0.dtype == torch.float64:
        dt = torch.float64
    else:
        dt = torch.float32 if exact else operand_dtype(precision)
    with matmul_precision("fp32" if exact else precision):
        for lo, hi in chunks(B, m * n, chunk_elems):
            G = _stacked(grads, lo, hi, m, n, dt)
            if exact:
                u, _, vh = torch.linalg.svd(G, full_matrices=False)
                out[lo:hi] = u[..., :rank] if side == "left" else vh[:, :rank].mT
                continue
            out[lo:hi] = _sketch_bases(
                _operator(G, side), rank, k, method, None if seeds is None else seeds[lo:hi],
                None if prev is None else prev[lo:hi], power_iters, qr,
            )  # fmt: skip
    return out


@torch.no_grad()
def random_bases(
    dim: int, rank: int, seeds: Sequence[int], device, *, qr: str = "cholesky",
    chunk_elems: int = CHUNK_ELEMS,
) -> Tensor:  # fmt: skip
    """(len(seeds), dim, rank) Haar-orthonormal bases drawn on ``device``: orth of a Gaussian
    from each seed (diag(R) > 0). ``dim``: m for left projections, n for right."""
    if not 0 <= rank <= dim:
        raise ValueError(f"rank must be in [0, {dim}], got {rank}")
    B = len(seeds)
    out = torch.empty(B, dim, rank, device=device, dtype=torch.float32)
    for lo, hi in chunks(B, dim * rank, chunk_elems):
        out[lo:hi] = orthonormalize(gaussian(hi - lo, dim, rank, seeds[lo:hi], device), qr)
    return out


# ------------------------------------------------------------------------------ metrics
@torch.no_grad()
def captured_energy(grads: Batch, bases: Batch, side: str) -> Tensor:
    """(B,) float64: ||down(G)||_F^2 / ||G||_F^2 per matrix (1 for a zero matrix)."""
    check_choice("side", side, SIDES)
    G = as_batch(grads, "grads").double()
    P = as_batch(bases, "bases").double()
    down = P.mT @ G if side == "left" else G @ P
    total = G.square().sum(dim=(-2, -1))
    kept = down.square().sum(dim=(-2, -1))
    return torch.where(total > 0, kept / total.clamp_min(1e-300), torch.ones_like(total))


@torch.no_grad()
def optimal_energy(grads: Batch, rank: int) -> Tensor:
    """(B,) float64: the largest fraction of ||G||_F^2 a rank-``rank`` basis captures (Eckart-
    Young: the top ``rank`` squared singular values over their sum)."""
    s2 = torch.linalg.svdvals(as_batch(grads, "grads").double()).square()
    total = s2.sum(-1)
    return torch.where(total > 0, s2[..., :rank].sum(-1) / total.clamp_min(1e-300),
                       torch.ones_like(total))  # fmt: skip
