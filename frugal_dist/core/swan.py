"""SWAN's stateless update used as FRUGAL's state-free direction F(R) (``state_free="swan"``).

A project addition beyond the FRUGAL paper (issue 19, FRUGAL+): the state-free part of a split
matrix gets the update of SWAN (Ma, Gong, Scetbon, Meeds, "SWAN: SGD with Normalization and
Whitening Enables Stateless LLM Training", arXiv 2412.13148, ICML 2025) instead of sign(R). No
state is kept. For the (m, n) state-free residual R of one matrix (at ``density=0`` the whole
gradient; stored (out, in) as ``nn.Linear``):

    GradNorm:       N = (R - mu 1^T) / s        row by row: mu_i = mean_j R_ij,
                                                s_i = sqrt(mean_j (R_ij - mu_i)^2)  (s_i = 0: the
                                                centred row is 0 and stays 0)
    GradWhitening:  W = (N N^T)^{-1/2} N        m <= n;  m > n: W = N (N^T N)^{-1/2}, the same
                                                polar factor U V^T of N = U S V^T (the pseudo-
                                                inverse root where N has rank < min(m, n))
    scale:          F = W / RMS(W),  RMS(W) = sqrt(sum W^2 / (m n))     (W = 0: F = 0)

Step size: F has unit RMS, like sign(R) (RMS 1 where R has no zero entry), so ``lr`` and
``inactive_lr_scale`` keep their meaning: W <- W - lr s_p s_i F moves the state-free entries by
the same root mean square as signSGD. SWAN itself rescales by a constant of the shape; for a
converged whitening (W = U V^T, ||W||_F^2 = min(m, n)) that is the factor sqrt(max(m, n)), i.e.
this very RMS, and it equals ||N||_F / ||W||_F (||N||_F^2 = m n after GradNorm). Dividing by the
measured RMS instead keeps the step at unit RMS also where Newton-Schulz has not converged on the
smallest singular values, and makes the result independent of the Gram matrix's scale (the
1 / sqrt(||A||_F) of the normalisation below cancels).

(N N^T)^{-1/2} by the coupled Newton-Schulz iteration for the matrix square root (Higham,
"Functions of Matrices", 2008, eq. 6.35; SWAN's GradWhitening operator), on the Gram matrix of
the smaller side normalised by its Frobenius norm (every eigenvalue in [0, 1], where the iteration
converges):

    A = N N^T / ||N N^T||_F,  Y_0 = A,  Z_0 = I
    T_k = (3 I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k      (k < ``NS_STEPS``)
    Z_K ~ A^{-1/2},  W ~ Z_K N (up to the positive factor ||N N^T||_F^{1/2}, removed by the scale)

Every Y_k, Z_k is a polynomial in A, so the iteration acts on each eigenvalue a of A alone:
z(a) y(a) = a z(a)^2 -> 1 quadratically near 1 and grows by 9/4 per step while small. With
``NS_STEPS`` = 10, eigenvalues down to 3e-3 of the largest (singular values of N down to 0.055 of
the largest) get a^{-1/2} within 1e-3; at 1e-3 it is 2.4 % short, at 1e-4 47 %: the near-null
directions (a square gradient's smallest singular values; GradNorm's centring makes N 1 = 0, so a
square N is singular) are whitened only partially, as by any fixed Newton-Schulz budget (Muon's
too). The step count is this project's choice (the SWAN paper's is not restated here).
GEMMs in float32 (SWAN whitens in FP32 too): 2 (a^3) x 2 per step for the a x a Gram, a = min(m,
n), plus a^2 b twice for the Gram and Z N.

Test oracle: ``core.reference_swan`` (float64, an explicit eigendecomposition of A), no shared
code.
"""

from __future__ import annotations

import torch
from torch import Tensor

NS_STEPS = 10  # coupled Newton-Schulz steps (module docstring)


def grad_norm_rows(r: Tensor) -> Tensor:
    """SWAN's GradNorm of a float32 (m, n) matrix: each row centred and divided by its standard
    deviation over the n columns (a constant row becomes 0). A new tensor."""
    centred = r - r.mean(dim=1, keepdim=True)
    std = centred.square().mean(dim=1, keepdim=True).sqrt_()
    return centred.div_(torch.where(std > 0, std, torch.ones_like(std)))


def whiten(x: Tensor, steps: int = NS_STEPS) -> Tensor:
    """SWAN's GradWhitening of a float32 (m, n) matrix up to a positive factor: Z_K X (m <= n)
    or X Z_K (m > n), Z_K the coupled Newton-Schulz approximation of A^{-1/2} of the
    Frobenius-normalised Gram matrix A of the smaller side (module docstring)."""
    wide = x.shape[0] <= x.shape[1]
    a = x if wide else x.mT
    gram = a @ a.mT
    norm = torch.linalg.matrix_norm(gram)
    y = gram / torch.where(norm > 0, norm, torch.ones_like(norm))
    eye = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    z = eye
    for _ in range(steps):
        t = torch.addmm(eye, z, y, beta=1.5, alpha=-0.5)  # (3 I - Z Y) / 2
        y = y @ t
        z = t @ z
    out = z @ a
    return out if wide else out.mT


def swan_direction(residual: Tensor, steps: int = NS_STEPS) -> Tensor:
    """F(R) of ``state_free="swan"`` for one (m, n) matrix: GradNorm, GradWhitening, unit RMS
    (module docstring). Computed in float32; a new float32 tensor of R's shape."""
    if residual.dim() != 2:
        raise ValueError(
            f"state_free='swan' whitens a matrix; got a tensor of shape {tuple(residual.shape)} "
            "(pass the (m, n) matrix view of the parameter)"
        )
    if residual.numel() == 0:
        return torch.zeros(residual.shape, dtype=torch.float32, device=residual.device)
    w = whiten(grad_norm_rows(residual.float()), steps)
    rms = w.square().mean().sqrt()
    return w.div_(torch.where(rms > 0, rms, torch.ones_like(rms)))
