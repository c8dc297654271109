"""The owner side of an ``svd`` projection refresh: new bases for the matrices a rank owns.

``svd_method`` (a group option) picks how the top-r singular subspace of the gradient G at the
refresh is found (A = G for a left basis, G^T for a right one; r = ``projection_rank``):

* ``exact``      -- ``torch.linalg.svd`` of each gradient (``core.subspaces.projection_selection``,
                    the pre-kernel path, bit-identical; tens of seconds for a 1B model).
* ``warm``       -- (default) one step of subspace iteration from the previous basis:
                    P = orth(A (A^T P_prev)), ``orth`` = shifted CholeskyQR2 in float64
                    (Householder where it fails), batched over same-shape matrices
                    (``kernels.refresh.svd_bases``, ``WARM_POWER_ITERS`` power steps, no
                    oversampling). Measured on an H200 at LLaMA-1B: 0.098 s for the whole model,
                    captured energy >= 0.975 of the exact top-r
                    (benchmarks/results/kernels_projection_cuda.md). Without a previous basis of
                    the same shape (the first refresh, or after a shape change) it is
                    ``randomized`` below: no exact SVD at any refresh.
* ``randomized`` -- Halko-Martinsson-Tropp range finder: Omega (o x r) Gaussian drawn on the
                    gradient's device from ``projection_seed(seed, name, k)``, Q = orth(A Omega),
                    then ``RANDOMIZED_POWER_ITERS`` = 2 power steps Q = orth(A (A^T Q)): 5
                    products and 3 QRs per matrix, batched, then a Rayleigh-Ritz rotation
                    (an r x r ``eigh``) into singular-vector order: AdamW's moments live in
                    the basis's coordinates, and without it the 60M quality guard lost 0.015
                    of validation loss (``kernels.refresh``; the batched ``eigh`` costs about
                    1 s at LLaMA-1B, once per run). No oversampling
                    (``RANDOMIZED_OVERSAMPLE`` = 0): it buys little. Energy / exact top-r at
                    LLaMA-1B
                    shapes (``i^-0.5`` spectrum + noise, as benchmarks/kernels_projection.py,
                    CPU float32): 0.9754-0.9805 with p=0 q=2 (p=8 q=2: 0.9767-0.9815; p=8 q=1,
                    the old setting: 0.9463-0.9554).

The products run at the group's ``proj_precision`` (TF32 / bfloat16 on CUDA; fp32 on the CPU for
``tf32``); float64 gradients stay float64 up to the final float32 basis (``svd_bases``). Each
basis is computed once, by its owner, then broadcast by the caller, so every rank holds the same
bits. Communication: none here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from frugal_dist.core.seeding import projection_seed
from frugal_dist.core.subspaces import (
    matrix_shape,
    projection_rank,
    projection_selection,
    resolve_side,
)
from frugal_dist.kernels.refresh import svd_bases
from frugal_dist.optim.density_schedule import density_at
from frugal_dist.optim.projection_batch import group_precision

WARM_POWER_ITERS = 1
RANDOMIZED_OVERSAMPLE = 0
RANDOMIZED_POWER_ITERS = 2
QR = "cholesky"


def basis_shape(it: Any) -> tuple[int, int]:
    """(dim, r) of the item's svd basis at its refresh (dim = m for left, n for right)."""
    group = it.group
    shape = matrix_shape(it.view.shape)
    side = resolve_side(group["proj_side"], shape)
    r = projection_rank(shape, density_at(group, it.k), side, "svd")
    return (shape[0] if side == "left" else shape[1], r)


def owner_bases(its: list[Any], grads: list[Tensor]) -> list[Tensor]:
    """New bases (dim, r) float32 for the items this rank owns, from their full (m, n)
    gradients ``grads`` (``its[i].st["proj_basis"]``, if any, is the previous basis). Same-shape
    items of one group go through one batched ``svd_bases`` call."""
    out: list[Tensor | None] = [None] * len(its)
    batches: dict[tuple, list[int]] = {}
    for i, (it, g) in enumerate(zip(its, grads)):
        method = it.group["svd_method"]
        if method == "exact":
            out[i] = _exact(it, g)
            continue
        prev = it.st.get("proj_basis")
        if method == "warm" and (prev is None or tuple(prev.shape) != basis_shape(it)):
            method = "randomized"  # no previous basis to start from: the range finder
        key = (id(it.group), method, tuple(g.shape), g.dtype)
        batches.setdefault(key, []).append(i)
    for (_, method, _, _), idx in batches.items():
        group = its[idx[0]].group
        shape = matrix_shape(its[idx[0]].view.shape)
        side = resolve_side(group["proj_side"], shape)
        r = basis_shape(its[idx[0]])[1]
        sub = [grads[i].reshape(shape) for i in idx]
        seeds = [projection_seed(group["seed"], its[i].name, its[i].k) for i in idx]
        if method == "warm":
            prev = torch.stack([its[i].st["proj_basis"] for i in idx])
            kw = dict(previous=prev, power_iters=WARM_POWER_ITERS)
        else:
            kw = dict(oversample=RANDOMIZED_OVERSAMPLE, power_iters=RANDOMIZED_POWER_ITERS)
        bases = svd_bases(sub, r, side, method=method, seeds=seeds, qr=QR,
                          precision=group_precision(group, sub[0].device), **kw)  # fmt: skip
        for i, b in zip(idx, bases.unbind(0)):
            out[i] = b.clone()  # its own storage: the basis is optimizer state
    return [b for b in out if b is not None]


def _exact(it: Any, g: Tensor) -> Tensor:
    group = it.group
    return projection_selection(
        matrix_shape(it.view.shape), density_at(group, it.k), "svd", group["proj_side"],
        projection_seed(group["seed"], it.name, it.k), grad=g,
    ).basis  # fmt: skip
