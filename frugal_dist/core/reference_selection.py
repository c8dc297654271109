"""Subspace selection written out again, slowly and literally: the oracle of ``core.subspaces``.

Nothing here is imported from the fast path (``core.subspaces``); only the seed derivation
(``core.seeding``), which *defines* which random draw belongs to which (seed, name, refresh), is
shared. Sizes and orders follow the upstream FRUGAL code (fzmushko/FRUGAL,
``frugal/proj_optimizer_templates.py``, ``coordinate_projector.py``, ``galore_projector.py``):

* block count     a = round(n * rho)        (Python's round: half to even)
* coordinate size k = int(dim * rho)        (floor)
* projection rank r = round(d * rho), d = n (right) or m (left); svd keeps at most min(m, n)

Block orders are simulated the way upstream runs them: a pointer ``next_block_start`` kept across
refreshes and moved by a (ascending / descending, modulo n) or a/2 (mirror, modulo n//2) at each
refresh. The project's additions (``strided``, ``random_pass``) are written from their
definitions in the README; ``gradnorm`` (``ref_gradnorm_blocks``) from its definition in
docs/optimizer.md: the a tensors of largest sum of squared gradient entries, lower position first
on ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from frugal_dist.core.seeding import derive_seed, make_generator


def ref_block_count(n: int, density: float) -> int:
    return round(n * density)


def ref_active_blocks(
    n: int,
    density: float,
    order: str,
    seed: int,
    refresh: int,
    density_of: Callable[[int], float] | None = None,
) -> set[int]:
    """The tensors (model positions) active during refresh ``refresh`` of a group of n.

    ``density_of`` (a decaying density): the density of each refresh j; the count of refresh j
    is then round(n * density_of(j)), and upstream's pointer moves by each refresh's own count
    (``random``, ``ascending``, ``descending`` only)."""
    if density_of is not None:
        if order not in ("random", "ascending", "descending"):
            raise ValueError(f"a decaying density has no block order {order!r}")
        density = density_of(refresh)
    a = ref_block_count(n, density)
    if order == "mirror" and a % 2:
        raise ValueError(f"block_order='mirror' needs an even active count, got {a}")
    if a == 0:
        return set()
    if order == "random":
        gen = make_generator(derive_seed(seed, "block-random", refresh))
        return set(torch.randperm(n, generator=gen)[:a].tolist())
    if order == "random_pass":
        windows = math.ceil(n / a)
        pass_index = refresh // windows
        window = refresh % windows
        gen = make_generator(derive_seed(seed, "block-pass", pass_index))
        perm = torch.randperm(n, generator=gen).tolist()
        start = window * a
        if start + a > n:  # the last window of a pass ends at the last position
            start = n - a
        return set(perm[start : start + a])
    if order == "strided":  # ascending over positions 0, W, 2W, ..., 1, W+1, ...
        windows = math.ceil(n / a)
        interleaved = []
        for first in range(windows):
            interleaved.extend(range(first, n, windows))
        return {interleaved[i] for i in ref_active_blocks(n, density, "ascending", seed, refresh)}
    # Upstream's pointer, stepped refresh by refresh from the first one.
    active: set[int] = set()
    start = None
    for j in range(refresh + 1):
        if density_of is not None:
            a = ref_block_count(n, density_of(j))
        active = set()
        if order == "ascending":
            start = 0 if start is None else start
            for idx in range(start, start + a):
                active.add(idx % n)
            start += a
            if start >= n:
                start -= n
        elif order == "descending":
            start = n - 1 if start is None else start
            for idx in range(start, start - a, -1):
                active.add(idx % n)
            start -= a
            if start < 0:
                start += n
        elif order == "mirror":
            half = n // 2
            start = 0 if start is None else start
            for idx in range(start, start + a // 2):
                active.add(idx % half)
                active.add(n - 1 - idx % half)
            start += a // 2
            if start >= half:
                start -= half
        else:
            raise ValueError(f"unknown block order {order!r}")
    return active


def ref_gradnorm_blocks(grads: list[Tensor | None], density: float) -> set[int]:
    """``block_order="gradnorm"``: of the group's n tensors (model order; None: no gradient, a
    norm of 0), the a = round(n * rho) with the largest sum of squared gradient entries, each
    square and the running sum in float64, one entry after another; on equal sums the lower
    position wins; a NaN sum counts below every number."""
    a = ref_block_count(len(grads), density)
    norms = []
    for pos, g in enumerate(grads):
        total = 0.0
        if g is not None:
            for x in g.detach().double().reshape(-1).tolist():
                total += x * x
        norms.append((pos, total))
    chosen: set[int] = set()
    while len(chosen) < a:  # repeatedly take the best remaining tensor
        best = None
        for pos, total in norms:
            if pos in chosen:
                continue
            if best is None or _ref_beats(total, best[1]):
                best = (pos, total)
        assert best is not None
        chosen.add(best[0])
    return chosen


def _ref_beats(x: float, y: float) -> bool:
    """x ranks strictly above y (positions are visited in order, so an equal x loses)."""
    if math.isnan(x):
        return False
    return math.isnan(y) or x > y


def ref_coordinate_mask(shape: tuple[int, int], density: float, choice: str, seed: int) -> Tensor:
    """Bool (m, n) mask of the selected columns / rows / entries (``randperm(dim)[:k]``)."""
    m, n = shape
    dim = {"columns": n, "rows": m, "randk": m * n}[choice]
    k = int(dim * density)
    chosen = torch.randperm(dim, generator=make_generator(seed))[:k].tolist()
    mask = torch.zeros(m, n, dtype=torch.bool)
    for c in chosen:
        if choice == "columns":
            mask[:, c] = True
        elif choice == "rows":
            mask[c, :] = True
        else:
            mask[c // n, c % n] = True
    return mask


def ref_projection(
    shape: tuple[int, int],
    density: float,
    proj_type: str,
    side: str,
    seed: int,
    grad: Tensor | None = None,
    svd_method: str = "exact",
    previous: Tensor | None = None,
    random_device: str | torch.device | None = None,
) -> tuple[str, Tensor]:
    """(side, P): P (m, r) for a left projection, (n, r) for a right one, float32.

    ``svd_method`` (``svd`` only): ``exact`` = the top-r singular vectors; ``warm`` = one step of
    subspace iteration from ``previous`` (when it is None or of another shape: ``randomized``);
    ``randomized`` = a seeded range finder (``ref_randomized_range``). ``random_device``
    (``random`` only): the Gaussian is drawn in float32 by a generator on that device (the
    optimizer's on-device bases) instead of in float64 on the CPU."""
    m, n = shape
    if side == "auto":
        side = "right" if m >= n else "left"
    d = m if side == "left" else n
    r = round(d * density)
    if proj_type == "svd":
        r = min(r, m, n)
        assert grad is not None, "svd needs the gradient"
        g = grad.reshape(m, n)
        g = g if g.dtype == torch.float64 else g.float()  # the gradient's precision, >= float32
        if svd_method == "warm" and previous is not None and tuple(previous.shape) == (d, r):
            a = g.double() if side == "left" else g.double().T
            return side, _ref_orth(a @ (a.T @ previous.double())).float()
        if svd_method in ("randomized", "warm"):  # warm without a previous basis starts here
            return side, ref_randomized_range(g, r, side, seed).float()
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        p = u[:, :r] if side == "left" else vh[:r, :].T
        return side, p.float()
    if proj_type == "random" and random_device is not None:
        gen = torch.Generator(device=random_device)
        gen.manual_seed(int(seed))
        gauss = torch.empty(d, r, device=random_device).normal_(generator=gen)
        return side, _ref_orth(gauss.double()).float()
    gen = make_generator(seed)
    if proj_type == "random":
        q, rr = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
        for j in range(r):
            if rr[j, j] < 0:
                q[:, j] = -q[:, j]
        return side, q.float()
    if proj_type == "randperm":
        rows = sorted(torch.randperm(d, generator=gen)[:r].tolist())
        p = torch.zeros(d, r)
        for j, i in enumerate(rows):
            p[i, j] = 1.0
        return side, p
    raise ValueError(f"unknown proj_type {proj_type!r}")


# The randomized range finder's power steps (the optimizer's ``optim.svd_refresh`` states its
# own; a test checks they agree). No oversampling; the Rayleigh-Ritz rotation orders the basis.
REF_POWER_ITERS = 2


def _ref_orth(y: Tensor) -> Tensor:
    """Q of the QR factorisation of y with R's diagonal made positive (a unique Q)."""
    q, rr = torch.linalg.qr(y)
    for j in range(q.shape[1]):
        if rr[j, j] < 0:
            q[:, j] = -q[:, j]
    return q


def ref_randomized_range(g: Tensor, r: int, side: str, seed: int) -> Tensor:
    """Halko-Martinsson-Tropp, in float64: A = G (left) or G^T (right), (dim x o); Omega (o x r)
    float32 normals from a generator on G's device seeded with ``seed``; Q = orth(A Omega), then
    q = ``REF_POWER_ITERS`` times Q = orth(A A^T Q); then Rayleigh-Ritz: V = the eigenvectors of
    (Q^T A)(Q^T A)^T by decreasing eigenvalue, each with its largest-magnitude entry positive;
    P = Q V."""
    a = g.double() if side == "left" else g.double().T
    o = a.shape[1]
    gen = torch.Generator(device=g.device)
    gen.manual_seed(int(seed))
    omega = torch.empty(o, r, device=g.device).normal_(generator=gen).double()
    q = _ref_orth(a @ omega)
    for _ in range(REF_POWER_ITERS):
        q = _ref_orth(a @ (a.T @ q))
    # Rayleigh-Ritz: the singular directions of A within span(Q), largest first
    small = q.T @ a  # (r, o)
    _, vecs = torch.linalg.eigh(small @ small.T)
    out = q @ vecs.flip(-1)
    for j in range(out.shape[1]):  # sign: the largest-magnitude entry of each V column positive
        col = vecs.flip(-1)[:, j]
        if col[col.abs().argmax()] < 0:
            out[:, j] = -out[:, j]
    return out
