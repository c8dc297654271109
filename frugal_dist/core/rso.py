"""RSO core math (Chen et al., ICML 2025): random projections and the low-activation linear.

An RSO layer with frozen weight W (m x n), trainable B (m x r) and a scalar c (the weight decay
of W accumulated since the last merge, 1 without weight decay) computes, for inputs X (N x n),

    Y = c X W^T + (X P) B^T                            P (n x r): random, fixed for one outer step

Backward needs only X P (N x r) from the forward pass (plus W, P, B, which are parameters or
buffers, not activations):

    dL/dB = G^T (X P)            (m x r)  = (G^T X) P: the full-weight gradient projected by P
    dL/dX = c G W + (G B) P^T    (N x n)  = G (c W + B P^T)

so the activation memory of the layer shrinks from n to r columns. After an outer iteration the
update is merged, ``W <- c W + B P^T``, ``B <- 0``, ``c <- 1``, and the next P is drawn.

P is a pure function of ``(seed, name, outer)`` (``rso_projection``): every rank draws the same P
without any message. Kinds: ``"gaussian"`` -- i.i.d. N(0, 1/r) entries (E[P P^T] = I_n);
``"orthonormal"`` -- Haar-distributed orthonormal columns (P^T P = I_r) from the QR decomposition
of a Gaussian matrix with the signs of diag(R) fixed.

This module imports torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from frugal_dist.core.seeding import derive_seed, make_generator
from frugal_dist.core.subspaces import rounded_count

PROJ_TYPES = ("gaussian", "orthonormal")


def rso_seed(base_seed: int, name: str, outer: int) -> int:
    """Seed of layer ``name``'s projection at outer iteration ``outer``."""
    return derive_seed(base_seed, "rso", name, int(outer))


def rso_rank(in_features: int, rank: int | None = None, density: float | None = None) -> int:
    """The subspace rank r: ``rank`` if given, else ``round(density * in_features)`` (Python's
    round, half to even, as every FRUGAL size: ``core.subspaces.rounded_count``), in [1, n] (an
    RSO layer needs at least one trainable column of B)."""
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1 (or None to use density), got {rank!r}")
        return min(rank, in_features)
    if density is None or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1] when rank is None, got {density!r}")
    return max(1, rounded_count(in_features, density))


def rso_projection(
    n: int, r: int, seed: int, proj_type: str = "gaussian", dtype: torch.dtype = torch.float32
) -> Tensor:
    """P (n x r) on the CPU from ``seed`` (identical on every rank and device)."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {list(PROJ_TYPES)}, got {proj_type!r}")
    if not 1 <= r <= n:
        raise ValueError(f"rank r={r} must be in [1, n={n}]")
    gen = make_generator(seed)
    g = torch.randn(n, r, generator=gen, dtype=torch.float64)
    if proj_type == "gaussian":
        p = g / math.sqrt(r)
    else:
        q, rr = torch.linalg.qr(g, mode="reduced")
        signs = torch.sign(torch.diagonal(rr))
        signs[signs == 0] = 1.0
        p = q * signs
    return p.to(dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The ``torch.autocast`` compute dtype active for ``device_type``, or None when off."""
    try:  # torch >= 2.4: per-device-type queries
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older signature: no argument (CUDA), CPU has its own query
        cpu = getattr(torch, "is_autocast_cpu_enabled", lambda: False)
        enabled = cpu() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


class RSOLinearFunction(torch.autograd.Function):
    """``Y = X W^T + (X P) B^T``; saves ``X P`` (not X) for backward. W and P get no gradient.

    Autocast: under ``torch.autocast(device, dtype=c)`` X, W, P and B are cast to c and both
    matmuls run in c with autocast off (so mixed dtypes never meet); Y is in c, like
    ``nn.Linear``'s output. ``X P`` is saved in c; W, P and B are saved as given (parameters,
    no extra memory) and cast again in backward, which computes in c and returns dX and dB in
    the dtypes of X and B (float32 masters get float32 gradients). Without autocast every
    operation runs in the inputs' own dtype."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, proj: Tensor, b: Tensor, scale: float = 1.0
    ) -> Tensor:
        cdt = autocast_dtype(x.device.type)
        ctx.compute_dtype = cdt
        ctx.x_dtype, ctx.b_dtype = x.dtype, b.dtype
        ctx.scale = float(scale)
        if cdt is None:
            xp = x @ proj
            xw = x @ weight.t()
            y = (xw if scale == 1.0 else xw * scale) + xp @ b.t()
        else:
            with torch.autocast(x.device.type, enabled=False):
                xc = x.to(cdt)
                xp = xc @ proj.to(cdt)
                xw = xc @ weight.to(cdt).t()
                y = (xw if scale == 1.0 else xw * scale) + xp @ b.to(cdt).t()
        ctx.save_for_backward(xp, weight, proj, b)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        xp, weight, proj, b = ctx.saved_tensors
        cdt = ctx.compute_dtype
        if cdt is not None:
            grad_y, weight, proj, b = (t.to(cdt) for t in (grad_y, weight, proj, b))
        grad_x = grad_b = None
        with torch.autocast(grad_y.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gw = grad_y @ weight
                if ctx.scale != 1.0:
                    gw = gw * ctx.scale
                grad_x = (gw + (grad_y @ b) @ proj.t()).to(ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                g2 = grad_y.reshape(-1, grad_y.shape[-1])
                grad_b = (g2.t() @ xp.reshape(-1, xp.shape[-1])).to(ctx.b_dtype)
        return grad_x, None, None, grad_b, None


def rso_linear(x: Tensor, weight: Tensor, proj: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """Functional form of ``RSOLinearFunction`` (bias is added by the caller); ``scale`` = c."""
    return RSOLinearFunction.apply(x, weight, proj, b, scale)


@torch.no_grad()
def merge_delta(b: Tensor, proj: Tensor, dtype: torch.dtype) -> Tensor:
    """``B P^T`` computed in float32 and cast to ``dtype`` (the merge ``W <- c W + B P^T``)."""
    return (b.float() @ proj.float().t()).to(dtype)
