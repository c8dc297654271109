"""The oracle of ``state_free="swan"`` (``core.swan``), written out again in float64 with an
explicit eigendecomposition and sharing no code with the fast path.

For the (m, n) residual R, with a = min(m, n) and X = N (m <= n) or N^T (m > n):

    N   = GradNorm(R)                      row i: (R_i - mean(R_i)) / std(R_i); 0 if std = 0
    A   = X X^T / ||X X^T||_F = Q diag(lam) Q^T          (torch.linalg.eigh, float64)
    z_K(lam)  the K-step coupled Newton-Schulz recurrence on one eigenvalue:
              y_0 = lam, z_0 = 1, t = (3 - z y) / 2, y <- y t, z <- t z
    W   = Q diag(z_K(lam)) Q^T X            (transposed back when m > n)
    F   = W / RMS(W)                       (0 if W = 0)

Why this is the fast path's operator exactly: each matrix iterate Y_k, Z_k of the fast path is a
polynomial in A, so it shares A's eigenvectors and maps each eigenvalue by the scalar recurrence.
As K grows z_K(lam) -> lam^{-1/2} for every lam > 0, and W -> the polar factor U V^T of N (its
pseudo-inverse version where N has rank < a; at lam = 0 the term Q diag(z) Q^T X vanishes since
X has no component there); ``tests/unit/test_swan.py`` checks both limits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ref_grad_norm(r: Tensor) -> Tensor:
    """Each row of float64 ``r`` centred and divided by its (population) standard deviation."""
    out = torch.zeros_like(r)
    for i in range(r.shape[0]):
        row = r[i] - r[i].mean()
        std = float(torch.sqrt((row * row).mean()))
        if std > 0.0:
            out[i] = row / std
    return out


def ref_newton_schulz_scalar(lam: Tensor, steps: int) -> Tensor:
    """z_K(lam) of the coupled Newton-Schulz recurrence, one eigenvalue at a time."""
    out = torch.empty_like(lam)
    for i, a in enumerate(lam.tolist()):
        y, z = max(a, 0.0), 1.0  # eigh may return -1e-17 for a null direction
        for _ in range(steps):
            t = (3.0 - z * y) / 2.0
            y, z = y * t, t * z
        out[i] = z
    return out


def ref_swan_direction(r: Tensor, steps: int) -> Tensor:
    """F(R) of ``state_free="swan"`` (module docstring), float64, returned as float32."""
    x = ref_grad_norm(r.detach().double())
    m, n = x.shape
    if m > n:
        x = x.T
    gram = x @ x.T
    norm = float(torch.linalg.norm(gram))
    if norm == 0.0:
        return torch.zeros((m, n), dtype=torch.float32, device=r.device)
    lam, q = torch.linalg.eigh(gram / norm)
    w = q @ torch.diag(ref_newton_schulz_scalar(lam, steps)) @ q.T @ x
    if m > n:
        w = w.T
    rms = float(torch.sqrt((w * w).mean()))
    return (w / rms if rms > 0.0 else w).float()
