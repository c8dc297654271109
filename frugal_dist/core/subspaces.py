"""Which coordinates of a gradient are "state-full": block schedules, coordinate sets, projections.

Every choice here is a pure function of (seed, parameter name or group, refresh index k) -- and, for
``proj_type="svd"``, of the gradient at the refresh. Nothing communicates.

A parameter of shape (d0, d1, ...) is viewed as the matrix (m, n) = (d0, d1*...); a 1-D tensor as
(1, n).

Sizes (stated once, here; every caller uses these functions; they follow the upstream FRUGAL code,
fzmushko/FRUGAL, and have no forced minimum):

* ``block_count(n, rho)``       = round(rho * n), Python's round (half to even: round(2.5) = 2);
* ``coordinate_count(dim, rho)`` = int(dim * rho) (floor);
* ``projection_rank(shape, rho, side)`` = round(rho * d), d the projected dimension (n for a right
  projection, m for a left one; ``auto`` projects min(m, n)); ``svd`` caps it at min(m, n).

A count of 0 is an empty subspace: that tensor (or, for blocks, the whole group) gets only the
state-free update, exactly as with rho = 0.

Subspace kinds (the step side of each: ``frugal_dist.optim.kinds``):

* block      -- S = whole tensors. Of the group's n tensors, a = ``block_count(n, rho)`` are active
                during refresh k (paper/upstream orders unless marked):
                ``ascending``  positions (k*a + j) mod n, j < a (windows wrap around);
                ``descending`` positions (n-1 - k*a - j) mod n (from the last tensor, wrapping);
                ``mirror``     symmetric pairs {i, n-1-i}, i = (k*a/2 + j) mod (n // 2), j < a/2:
                               moving inward from both ends; a must be even (ValueError otherwise);
                               with n odd the middle tensor is never active (as upstream);
                ``random``     an independent draw randperm(n)[:a] per refresh, seeded by
                               (seed, k);
                ``random_pass`` (project addition) one permutation per pass of W = ceil(n/a)
                               windows, window j covering positions [min(j*a, n-a), +a): every
                               tensor once per pass (the last window overlaps when a does not
                               divide n);
                ``strided``    (project addition) ``ascending`` over the interleaved order 0, W,
                               2W, ..., 1, W+1, ... (W = ceil(n/a)), so a window's tensors are
                               spread over the whole model: under ZeRO-1/2, whose flat partition
                               gives each rank a contiguous range of tensors, the active tensors'
                               state is then spread over the ranks instead of landing on the one or
                               two ranks that own the last (or first) layers.
                ``gradnorm``   (project addition, issue 19) the a tensors with the largest squared
                               Frobenius norm of the gradient at the refresh step, sum_ij G_ij^2,
                               ties broken by the lower position (``top_blocks``). Not normalised
                               by the tensor's size: the selection then maximises the share of
                               the gradient's energy ||G||^2 that the state-full rule sees, the
                               criterion behind svd projections (the top singular vectors
                               capture the most of ||G||^2); a per-entry mean would favour small
                               tensors whose state-full part moves little of the gradient. Not a
                               function of (seed, k): the step computes it from the gradients
                               (``optim.block_gradnorm``) and ``BlockSchedule`` refuses it.
* coordinate -- S = a random subset of ``columns`` (k = int(rho*n) of them), ``rows``
                (k = int(rho*m)), or ``randk`` single entries (k = int(rho*m*n)). The compact
                coordinates are the selected entries in row-major order, so a contiguous flat
                fragment of the parameter maps to a contiguous slice of the compact state.
* projection -- S = span of an orthonormal basis P with r = ``projection_rank`` columns.
                ``right``: P is (n, r), down(G) = G P (m, r), up(U) = U P^T.
                ``left``:  P is (m, r), down(G) = P^T G (r, n), up(U) = P U.
                ``auto`` (GaLore's rule) projects the smaller dimension: right if m >= n else left.
                ``random``: QR of a Gaussian; ``randperm``: r random columns of the identity;
                ``svd``: the top-r singular vectors of the gradient at the refresh.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from frugal_dist.core.seeding import derive_seed, make_generator

STATIC_BLOCK_ORDERS = ("random", "ascending", "descending", "mirror", "strided", "random_pass")
GRADIENT_BLOCK_ORDERS = ("gradnorm",)  # chosen from the gradient at each refresh
BLOCK_ORDERS = STATIC_BLOCK_ORDERS + GRADIENT_BLOCK_ORDERS
COORD_CHOICES = ("columns", "rows", "randk")
PROJ_TYPES = ("svd", "random", "randperm")
PROJ_SIDES = ("auto", "left", "right")


def rounded_count(dim: int, density: float) -> int:
    """``round(density * dim)`` with Python's round (half to even), at most ``dim``."""
    return min(int(dim), round(float(density) * int(dim)))


def block_count(n: int, density: float) -> int:
    """Active tensors of a block group of ``n``: ``round(density * n)`` (half to even)."""
    return rounded_count(n, density)


def coordinate_count(dim: int, density: float) -> int:
    """Selected columns / rows / entries out of ``dim``: ``int(dim * density)`` (floor)."""
    return min(int(dim), int(int(dim) * float(density)))


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The (m, n) matrix view of a parameter shape: (d0, d1*d2*...), or (1, n) for 1-D."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, int(shape[0]))
    return (int(shape[0]), int(math.prod(shape[1:])))


# ----------------------------------------------------------------------------------------- block
@dataclass(frozen=True)
class BlockSchedule:
    """The active set of a group of ``num_blocks`` tensors at each refresh (see module doc).

    Raises ``ValueError`` at construction for an unknown order or ``mirror`` with an odd active
    count."""

    num_blocks: int
    density: float
    order: str
    seed: int

    def __post_init__(self) -> None:
        if self.order in GRADIENT_BLOCK_ORDERS:
            raise ValueError(
                f"block_order={self.order!r} is chosen from the gradient at each refresh, not "
                "from (seed, refresh): use top_blocks on the per-tensor sums of squares"
            )
        if self.order not in STATIC_BLOCK_ORDERS:
            raise ValueError(
                f"block_order must be one of {STATIC_BLOCK_ORDERS}, got {self.order!r}"
            )
        a = self.num_active
        if self.order == "mirror" and a % 2:
            raise ValueError(
                f"block_order='mirror' activates symmetric pairs {{i, n-1-i}} and needs an even "
                f"number of active tensors, but density={self.density} gives "
                f"round({self.density} * {self.num_blocks}) = {a} of {self.num_blocks}; choose a "
                "density giving an even count, or another block_order"
            )

    @property
    def num_active(self) -> int:
        return block_count(self.num_blocks, self.density)

    @property
    def windows_per_pass(self) -> int:
        """W = ceil(n / a): the stride of ``strided``, the windows of a ``random_pass`` pass."""
        a = self.num_active
        return 0 if a == 0 else -(-self.num_blocks // a)

    def active(self, refresh: int) -> frozenset[int]:
        """Indices (model order) of the tensors that are state-full during refresh ``refresh``
        (memoised: the step asks once per tensor per step)."""
        return _active_set(self, int(refresh))

    def _active(self, k: int) -> frozenset[int]:
        n, a = self.num_blocks, self.num_active
        if a == 0:
            return frozenset()
        if self.order == "ascending":
            return frozenset((k * a + j) % n for j in range(a))
        if self.order == "descending":
            return frozenset((n - 1 - k * a - j) % n for j in range(a))
        if self.order == "mirror":
            half, pairs = n // 2, a // 2
            low = [(k * pairs + j) % half for j in range(pairs)]
            return frozenset(low) | frozenset(n - 1 - i for i in low)
        if self.order == "strided":
            w = self.windows_per_pass
            ordering = [i for start in range(w) for i in range(start, n, w)]
            return frozenset(ordering[(k * a + j) % n] for j in range(a))
        if self.order == "random":
            gen = make_generator(derive_seed(self.seed, "block-random", k))
            return frozenset(torch.randperm(n, generator=gen)[:a].tolist())
        # random_pass
        pass_index, window = divmod(k, self.windows_per_pass)
        gen = make_generator(derive_seed(self.seed, "block-pass", pass_index))
        ordering = torch.randperm(n, generator=gen).tolist()
        start = min(window * a, n - a)
        return frozenset(ordering[start : start + a])


def top_blocks(sumsq: Tensor, count: int) -> frozenset[int]:
    """``block_order="gradnorm"``: the positions of the ``count`` largest entries of ``sumsq``
    (one sum of squares per tensor of the group, in model order), ties broken by the lower
    position; NaN ranks below every number (never chosen before a finite or infinite norm)."""
    key = torch.nan_to_num(sumsq.detach().to("cpu", torch.float64), nan=-math.inf, posinf=math.inf)
    order = torch.sort(key, descending=True, stable=True).indices  # stable: ties keep position
    return frozenset(order[: max(0, int(count))].tolist())


@functools.lru_cache(maxsize=256)
def _active_set(schedule: BlockSchedule, refresh: int) -> frozenset[int]:
    return schedule._active(refresh)


# ------------------------------------------------------------------------------------ coordinate
@dataclass
class CoordinateSelection:
    """A set of entries of an (m, n) matrix; ``index`` is sorted (column, row or flat indices)."""

    choice: str
    shape: tuple[int, int]
    index: Tensor  # int64, sorted

    @property
    def numel(self) -> int:
        m, n = self.shape
        k = int(self.index.numel())
        return {"columns": m * k, "rows": k * n, "randk": k}[self.choice]

    @property
    def compact_shape(self) -> tuple[int, ...]:
        m, n = self.shape
        k = int(self.index.numel())
        return {"columns": (m, k), "rows": (k, n), "randk": (k,)}[self.choice]

    @property
    def axis(self) -> str | None:
        """The matrix axis ``index`` picks whole lines of: "columns" or "rows" (the fused
        coordinate kernels take these), None for single entries (``randk``)."""
        return self.choice if self.choice in ("columns", "rows") else None

    @property
    def axis_length(self) -> int:
        """Length of the indexed axis: n (columns), m (rows) or m n (entries)."""
        m, n = self.shape
        return {"columns": n, "rows": m, "randk": m * n}[self.choice]

    def to(self, device: torch.device) -> CoordinateSelection:
        return CoordinateSelection(self.choice, self.shape, self.index.to(device))

    def gather(self, g: Tensor) -> Tensor:
        """The selected entries of matrix ``g`` in compact form (a new tensor)."""
        if self.choice == "columns":
            return g.index_select(1, self.index)
        if self.choice == "rows":
            return g.index_select(0, self.index)
        return g.reshape(-1).index_select(0, self.index)

    def scatter_(self, out: Tensor, compact: Tensor) -> Tensor:
        """``out[selected] = compact`` in place on matrix ``out``; returns ``out``."""
        if self.choice == "columns":
            out.index_copy_(1, self.index, compact)
        elif self.choice == "rows":
            out.index_copy_(0, self.index, compact)
        else:
            out.view(-1).index_copy_(0, self.index, compact)
        return out

    def fill_(self, out: Tensor, value: float) -> Tensor:
        """``out[selected] = value`` in place on matrix ``out``."""
        if self.choice == "columns":
            out.index_fill_(1, self.index, value)
        elif self.choice == "rows":
            out.index_fill_(0, self.index, value)
        else:
            out.view(-1).index_fill_(0, self.index, value)
        return out

    def dense_mask(self) -> Tensor:
        """A bool (m, n) mask of the selected entries."""
        m, n = self.shape
        mask = torch.zeros(m, n, dtype=torch.bool, device=self.index.device)
        return self.fill_(mask, True)


def coordinate_selection(
    shape: tuple[int, int], density: float, choice: str, seed: int
) -> CoordinateSelection:
    """Draw the coordinate subspace of an (m, n) matrix from ``seed`` (CPU generator)."""
    m, n = shape
    gen = make_generator(seed)
    if choice == "columns":
        dim = n
    elif choice == "rows":
        dim = m
    elif choice == "randk":
        dim = m * n
    else:
        raise ValueError(f"coord_choice must be one of {COORD_CHOICES}, got {choice!r}")
    k = coordinate_count(dim, density)
    index = torch.randperm(dim, generator=gen)[:k].sort().values
    return CoordinateSelection(choice, (m, n), index)


# ------------------------------------------------------------------------------------ projection
@dataclass
class ProjectionSelection:
    """An orthonormal basis ``basis`` of the state-full subspace and the side it acts on."""

    side: str  # "left" | "right"
    basis: Tensor  # (m, r) for left, (n, r) for right; float32

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def down(self, g: Tensor) -> Tensor:
        """Coordinates of matrix ``g`` in the subspace: P^T g (left) or g P (right)."""
        p = self.basis.to(g.dtype)
        return p.T @ g if self.side == "left" else g @ p

    def up(self, u: Tensor) -> Tensor:
        """The matrix whose subspace coordinates are ``u``: P u (left) or u P^T (right)."""
        p = self.basis.to(u.dtype)
        return p @ u if self.side == "left" else u @ p.T

    def residual(self, g: Tensor, g_sf: Tensor) -> Tensor:
        """``g - up(g_sf)`` as one GEMM with accumulation (a single new full-size tensor)."""
        p = self.basis.to(g.dtype)
        if self.side == "left":
            return torch.addmm(g, p, g_sf, alpha=-1.0)
        return torch.addmm(g, g_sf, p.T, alpha=-1.0)

    def up_add_(self, out: Tensor, u: Tensor, beta: float = 1.0) -> Tensor:
        """``out <- beta * out + up(u)`` in place (GEMM accumulating into ``out``)."""
        p = self.basis.to(u.dtype)
        if self.side == "left":
            return out.addmm_(p, u, beta=beta)
        return out.addmm_(u, p.T, beta=beta)


def resolve_side(side: str, shape: tuple[int, int]) -> str:
    """``auto`` -> project the smaller dimension (right if m >= n else left)."""
    if side == "auto":
        m, n = shape
        return "right" if m >= n else "left"
    if side not in ("left", "right"):
        raise ValueError(f"proj_side must be one of {PROJ_SIDES}, got {side!r}")
    return side


def projection_rank(
    shape: tuple[int, int], density: float, side: str = "auto", proj_type: str | None = None
) -> int:
    """r = round(density * d) (half to even), d the projected dimension of ``side`` (``auto``:
    min(m, n)); ``svd`` has at most min(m, n) singular vectors, so its r is capped there."""
    m, n = shape
    dim = m if resolve_side(side, shape) == "left" else n
    r = rounded_count(dim, density)
    return min(r, m, n) if proj_type == "svd" else r


def projection_selection(
    shape: tuple[int, int],
    density: float,
    proj_type: str,
    side: str,
    seed: int,
    grad: Tensor | None = None,
) -> ProjectionSelection:
    """Build the basis of a projection subspace (see module doc); ``grad`` is needed for svd.

    ``random`` and ``randperm`` bases are drawn on the CPU in float64 (identical on every rank and
    device) and returned as float32 on the CPU; ``svd`` runs on ``grad``'s device in float32.
    """
    m, n = shape
    side = resolve_side(side, shape)
    dim = m if side == "left" else n
    r = projection_rank(shape, density, side, proj_type)
    if proj_type == "random":
        gen = make_generator(seed)
        gauss = torch.randn(dim, r, generator=gen, dtype=torch.float64)
        q, rr = torch.linalg.qr(gauss, mode="reduced")
        # Fix the sign ambiguity of QR so the basis is a deterministic function of the draw.
        signs = torch.sign(torch.diagonal(rr))
        signs[signs == 0] = 1.0
        basis = (q * signs).to(torch.float32)
    elif proj_type == "randperm":
        gen = make_generator(seed)
        idx = torch.randperm(dim, generator=gen)[:r].sort().values
        basis = torch.zeros(dim, r, dtype=torch.float32)
        basis[idx, torch.arange(r)] = 1.0
    elif proj_type == "svd":
        if grad is None:
            raise ValueError("proj_type='svd' needs the gradient at the refresh")
        g = grad.reshape(m, n)
        g = g if g.dtype == torch.float64 else g.float()  # at least float32; float64 kept
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        basis = (u[:, :r] if side == "left" else vh[:r].T).to(torch.float32).contiguous()
    else:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    return ProjectionSelection(side, basis)


# ----------------------------------------------------------------------------------- fingerprints
_MIX = 2654435761


def tensor_fingerprint(t: Tensor) -> int:
    """An exact, order-independent int64 fingerprint of a tensor's values (integer arithmetic on
    its bit patterns), so ranks can compare selections without sending them."""
    flat = t.detach().reshape(-1).contiguous()
    if flat.dtype == torch.float32:
        flat = flat.view(torch.int32)
    elif flat.dtype == torch.float64:
        flat = flat.view(torch.int64)
    bits = flat.to(torch.int64)
    weights = (torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device) * _MIX) % (
        1 << 31
    )
    return int((bits * weights).sum().item()) ^ bits.numel()
