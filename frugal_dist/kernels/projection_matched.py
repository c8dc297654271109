"""``free_scale="matched"`` in the batched Triton projection apply (``optim.free_scale``).

Per matrix b of a batch (U_b: the compact state-full direction, N_U entries; F_b = sign(R_b)
over the N_F = m n entries of the residual R_b = G_b - up(X_b)):

    s_t = RMS(U_b) / RMS(F_b) = ||U_b|| / sqrt(N_U) * sqrt(N_F / nnz_b),   nnz_b = #{F_b != 0}
    W_b <- W_b (1 - lr wd) - lr s_p (up(U_b) + s_i s_t F_b)

||U_b|| is cheap (the compact U, read once by one ``vector_norm`` per batch), but nnz_b counts
the non-zero signs of R_b, which the fused apply kernel forms tile by tile and never stores.
The apply therefore runs in two steps, with no host sync:

1. the apply kernel (``projection_triton`` / ``projection_apply_v2``, ``MATCHED``) takes
   c_f = -lr s_p s_i / sqrt(N_U) and multiplies it by the per-matrix factor ||U_b|| read from
   a device array (as the clip coefficient is read by the state kernel): it applies
   s_a = ||U_b|| / sqrt(N_U) = s_t assuming nnz_b = N_F -- R has no exact zeros, the usual case
   -- and, in the same pass, adds each tile's number of exact zeros of F to an int32 counter
   per matrix (an integer atomic: its total does not depend on the order);
2. ``_fix_kernel`` reads the counters on the device: a matrix with z_b zeros gets
   W_b += c_f ||U_b|| (sqrt(N_F / nnz_b) - 1) F_b, i.e. the missing part of s_t, recomputing
   F_b with the apply's own product (same tiles, K order and precision). A matrix without
   zeros (or one whose correction is below ``FIX_TOL``, below) costs its programs one 4-byte
   load: on the usual step the launch does nothing but exit. nnz_b = 0 needs nothing (F = 0).

Exactness: the update is the per-item path's (``kinds.projection.apply_one``) equation: step 1
is exact when R_b has no zeros, step 2 adds exactly s_t - s_a otherwise (one more rounding of
W, a float32 ulp). sqrt(N_F / nnz) - 1 is evaluated as q / (sqrt(1 + q) + 1), q = z / nnz, so
a few zeros among 10^7 entries are not lost to cancellation. ``FIX_TOL`` = 2^-22: a correction
whose relative size (s_t - s_a) / s_a is at most that (z / N_F below ~2^-21: a few isolated
zeros in a large matrix, e.g. a product that rounds to G exactly) is skipped; s_t is then used
with a relative error below 2^-22, less than the float32 rounding of the per-item path's own
sum of N_U squares (for N_U >= 2^16) and far below the effect of the bf16 / tf32 products on
sign(R). Zero rows or columns of G (right: zero rows; left: zero columns give exact zeros of
R) always exceed it. Non-finite gradients (``nonfinite="ignore"``): NaN reaches U, so both
paths write NaN, not necessarily into the same entries.

Cost per batch and step: one ``vector_norm`` over the compact U (2 or 4 B per compact entry
read), a (B,) int32 counter zeroed (one memset), the counting in the apply (one tile
reduction and at most one atomic per tile), and one ``_fix_kernel`` launch whose programs each
read the B counters and exit; a matrix with zeros above ``FIX_TOL`` costs one more product
pass (read G, W, X, P; write W). No full-size temporary. Communication: none (whole matrices;
fragments keep the per-item path and ``free_scale.reduce_scales``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from frugal_dist.kernels.projection_apply_v2 import cdiv, free_term, sm_count

FIX_TOL = 2.0**-22  # relative size of the skipped scale corrections (module doc)
FIX_PROGRAMS_PER_SM = 4


def matched_operands(U: Tensor) -> tuple[Tensor, Tensor]:
    """(||U_b|| as a (B,) float32 device array, a zeroed (B,) int32 counter array) for the
    stacked compact updates ``U`` (B, a, c) of any layout and float dtype. Two launches."""
    factors = torch.linalg.vector_norm(U, dim=(1, 2), dtype=torch.float32)
    return factors, torch.zeros(U.shape[0], dtype=torch.int32, device=U.device)


def matched_c_f(c_f: float, u_entries: int) -> float:
    """The apply's host coefficient of F under ``matched``: c_f / sqrt(N_U) (the kernel
    multiplies by ||U_b||)."""
    return c_f / math.sqrt(u_entries)


@triton.jit
def _fix_kernel(
    w_addrs, g_addrs, p_ptr, x_ptr, fs_ptr, cnt_ptr,
    m, n, count, n_f, c_f, tol,
    s_gm, s_gn, s_pb, s_p0, s_p1, s_xb, s_x0, s_x1,
    r: tl.constexpr, LEFT: tl.constexpr, G_ELEM: tl.constexpr, PREC: tl.constexpr,
    OP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """A grid of programs walks the ``count`` matrices; for each one whose counter says F had
    zeros (above ``tol``), the programs share its tiles: W += c_f fs[b] (sqrt(N_F / nnz) - 1)
    sign(G - up(X)), up(X) as ``projection_triton._apply_kernel``'s first product."""
    tiles_n = tl.cdiv(n, BN)
    tiles = tl.cdiv(m, BM) * tiles_n
    step = tl.num_programs(0)
    b = tl.program_id(0) * 0
    while b < count:
        zeros = tl.load(cnt_ptr + b)
        nnz = n_f - zeros
        q = zeros.to(tl.float32) / tl.maximum(nnz, 1).to(tl.float32)
        rel = q / (tl.sqrt(1.0 + q) + 1.0)  # sqrt(N_F / nnz) - 1 without cancellation
        if (nnz > 0) & (rel > tol):
            coef = c_f * tl.load(fs_ptr + b) * rel
            b64 = b.to(tl.int64)
            w_ptr = tl.load(w_addrs + b64).to(tl.pointer_type(tl.float32))
            g_ptr = tl.load(g_addrs + b64).to(tl.pointer_type(G_ELEM))
            pb = p_ptr + b64 * s_pb
            xb = x_ptr + b64 * s_xb
            t = tl.program_id(0)
            while t < tiles:
                rm = (t // tiles_n) * BM + tl.arange(0, BM)
                rn = (t % tiles_n) * BN + tl.arange(0, BN)
                om = rm % m
                on = rn % n
                acc1 = tl.zeros((BM, BN), dtype=tl.float32)
                for k0 in range(0, r, BK):
                    rk = k0 + tl.arange(0, BK)
                    if LEFT:  # P (m, r) rows om; X (r, n)
                        a_off = om[:, None] * s_p0 + rk[None, :] * s_p1
                        x_off = rk[:, None] * s_x0 + on[None, :] * s_x1
                        if EVEN_K:
                            a = tl.load(pb + a_off)
                            b1 = tl.load(xb + x_off)
                        else:
                            a = tl.load(pb + a_off, mask=rk[None, :] < r, other=0.0)
                            b1 = tl.load(xb + x_off, mask=rk[:, None] < r, other=0.0)
                        acc1 = tl.dot(a.to(OP), b1.to(OP), acc1, input_precision=PREC)
                    else:  # X (m, r) rows om; P (n, r): the B tile is P[on, rk]
                        b_off = on[None, :] * s_p0 + rk[:, None] * s_p1
                        x_off = om[:, None] * s_x0 + rk[None, :] * s_x1
                        if EVEN_K:
                            bt = tl.load(pb + b_off)
                            a1 = tl.load(xb + x_off)
                        else:
                            bt = tl.load(pb + b_off, mask=rk[:, None] < r, other=0.0)
                            a1 = tl.load(xb + x_off, mask=rk[None, :] < r, other=0.0)
                        acc1 = tl.dot(a1.to(OP), bt.to(OP), acc1, input_precision=PREC)
                mask = (rm < m)[:, None] & (rn < n)[None, :]
                g = tl.load(g_ptr + rm[:, None] * s_gm + rn[None, :] * s_gn, mask=mask, other=0.0)
                w_at = w_ptr + rm[:, None] * n + rn[None, :]
                w = tl.load(w_at, mask=mask, other=0.0)
                tl.store(w_at, w + coef * free_term(g, acc1, 0), mask=mask)
                t += step
        b += 1


def launch_fix(
    w_table: Tensor, g_table: Tensor, g_strides: tuple[int, int], P: Tensor, X: Tensor,
    matched: tuple[Tensor, Tensor], m: int, n: int, side: str, *, c_f: float,
    consts: dict, bm: int, bn: int, bk: int, warps: int, stages: int,
) -> None:  # fmt: skip
    """Step 2 of the module doc for the B matrices of the address tables, after the apply
    kernel that filled ``matched``'s counters with the same (P, X) and c_f (the host
    coefficient, ``matched_c_f``). ``consts``: G_ELEM, PREC, OP of the apply. One launch."""
    factors, counters = matched
    B, r = P.shape[0], P.shape[-1]
    tiles = cdiv(m, bm) * cdiv(n, bn)
    grid = min(tiles, sm_count(P.device) * FIX_PROGRAMS_PER_SM)
    _fix_kernel[(grid,)](
        w_table, g_table, P, X, factors, counters, m, n, B, m * n, float(c_f), float(FIX_TOL),
        g_strides[0], g_strides[1], P.stride(0), P.stride(1), P.stride(2),
        X.stride(0), X.stride(1), X.stride(2),
        r=r, LEFT=side == "left", BM=bm, BN=bn, BK=bk, EVEN_K=r % bk == 0, num_warps=warps,
        num_stages=stages, **consts,
    )  # fmt: skip
