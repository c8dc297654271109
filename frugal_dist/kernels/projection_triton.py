"""A fused Triton apply of the projection step: both up-products and the update in one kernel.

For one matrix (the ``triton`` backend of ``kernels.projection.apply_projection``), each
(BM x BN) tile of W is updated in one pass:

    right (P: n x r, X = G_sf and U: m x r):  A1 = X, A2 = U, B1 = B2 = P^T  (B tile shared)
    left  (P: m x r, X = G_sf and U: r x n):  A1 = A2 = P (A tile shared),  B1 = X, B2 = U
    acc1 = A1 B1 = up(G_sf),  acc2 = A2 B2 = up(U)                       (float32 accumulators)
    W   <- W (1 - lr wd) + c_u acc2 + c_f F(G - acc1),   c_u = -lr s_p, c_f = -lr s_p s_i

F: ``signsgd`` sign (NaN propagates, as ``torch.sign``), ``sgd`` identity, ``none`` 0 (acc1 and
the G read skipped). Memory traffic: read G and W, write W (12 bytes per float32 entry) plus the
(m + n) r operand tiles, against ~44 bytes for the ``bmm`` backend's separate passes (stack,
residual, sign, up(U), add). No temporaries. Precision: ``fp32`` -> ``tl.dot`` ieee, ``tf32`` ->
tf32, ``bf16`` -> operand tiles cast to bfloat16 (float32 accumulate; W, G, the epilogue stay
float32, so it is more exact than the ``bmm`` backend's bfloat16 buffer).

Needs triton (a CUDA device, or ``TRITON_INTERPRET=1`` on the CPU for tests). One launch per
matrix; tile sizes are autotuned per (m, n, r, side) on first use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

RULE_CODES = {"signsgd": 0, "sgd": 1, "none": 2}
_INPUT_PRECISION = {"fp32": "ieee", "tf32": "tf32", "bf16": "tf32"}


def _configs() -> list[triton.Config]:
    out = []
    # two (BM x BN) float32 accumulators take 2 BM BN / (32 num_warps) registers per thread
    for bm, bn, bk, warps, stages in [(128, 128, 32, 8, 3), (128, 64, 32, 8, 3),
                                      (64, 128, 32, 8, 3), (128, 64, 32, 4, 3),
                                      (64, 128, 32, 4, 3), (64, 64, 64, 4, 2)]:  # fmt: skip
        out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps,
                                 num_stages=stages))  # fmt: skip
    return out


@triton.jit
def _fused_apply_kernel(
    w_ptr, g_ptr, p_ptr, x_ptr, u_ptr,
    m, n,
    s_wm, s_wn, s_gm, s_gn, s_pd, s_pk, s_xa, s_xb, s_ua, s_ub,
    decay, c_u, c_f,
    r: tl.constexpr,  # the rank: a compile-time loop bound (few distinct values per model)
    LEFT: tl.constexpr, RULE: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_m = rm < m
    mask_n = rn < n
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, r, BK):
        rk = k0 + tl.arange(0, BK)
        mask_k = rk < r
        if LEFT:  # P (m, r) rows rm; X, U (r, n)
            a = tl.load(p_ptr + rm[:, None] * s_pd + rk[None, :] * s_pk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            b2 = tl.load(u_ptr + rk[:, None] * s_ua + rn[None, :] * s_ub,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
            if BF16:
                a = a.to(tl.bfloat16)
                b2 = b2.to(tl.bfloat16)
            acc2 = tl.dot(a, b2, acc2, input_precision=PREC)
            if RULE != 2:
                b1 = tl.load(x_ptr + rk[:, None] * s_xa + rn[None, :] * s_xb,
                             mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
                if BF16:
                    b1 = b1.to(tl.bfloat16)
                acc1 = tl.dot(a, b1, acc1, input_precision=PREC)
        else:  # X, U (m, r) rows rm; P (n, r): the B tile is P^T[rk, rn] = P[rn, rk]
            b = tl.load(p_ptr + rn[None, :] * s_pd + rk[:, None] * s_pk,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
            a2 = tl.load(u_ptr + rm[:, None] * s_ua + rk[None, :] * s_ub,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            if BF16:
                b = b.to(tl.bfloat16)
                a2 = a2.to(tl.bfloat16)
            acc2 = tl.dot(a2, b, acc2, input_precision=PREC)
            if RULE != 2:
                a1 = tl.load(x_ptr + rm[:, None] * s_xa + rk[None, :] * s_xb,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
                if BF16:
                    a1 = a1.to(tl.bfloat16)
                acc1 = tl.dot(a1, b, acc1, input_precision=PREC)
    mask = mask_m[:, None] & mask_n[None, :]
    w_offs = rm[:, None] * s_wm + rn[None, :] * s_wn
    w = tl.load(w_ptr + w_offs, mask=mask, other=0.0)
    out = w * decay + c_u * acc2
    if RULE != 2:
        g = tl.load(g_ptr + rm[:, None] * s_gm + rn[None, :] * s_gn, mask=mask, other=0.0)
        res = g.to(tl.float32) - acc1
        if RULE == 0:
            res = tl.where(res > 0, 1.0, tl.where(res < 0, -1.0, res * 0.0))
        out += c_f * res
    tl.store(w_ptr + w_offs, out, mask=mask)


# On a GPU the tile sizes are autotuned (W restored between trials); the CPU interpreter has no
# benchmarker, so it runs one fixed small tile.
_tuned_kernel = triton.autotune(configs=_configs(), key=["m", "n", "r", "LEFT", "RULE", "BF16"],
                                restore_value=["w_ptr"])(_fused_apply_kernel)  # fmt: skip
_INTERPRET_META = {"BM": 32, "BN": 32, "BK": 16}


def fused_apply_one(
    w: Tensor, g: Tensor, p: Tensor, x: Tensor, u: Tensor, side: str, *, decay: float,
    c_u: float, c_f: float, rule: str, precision: str,
) -> None:  # fmt: skip
    """W <- W decay + c_u up(U) + c_f F(G - up(X)) in place for one (m, n) matrix (module doc).
    ``w``: float32 (m, n) view; ``g``: (m, n) float32 / bfloat16 / float16; ``p``, ``x``, ``u``
    float32. Communication: none."""
    m, n = w.shape
    r = p.shape[1]
    left = side == "left"
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    interpret = w.device.type != "cuda"
    kernel = _fused_apply_kernel if interpret else _tuned_kernel
    meta = _INTERPRET_META if interpret else {}
    kernel[grid](
        w, g, p, x, u, m, n,
        w.stride(0), w.stride(1), g.stride(0), g.stride(1), p.stride(0), p.stride(1),
        x.stride(0), x.stride(1), u.stride(0), u.stride(1),
        float(decay), float(c_u), float(c_f),
        r=r, LEFT=left, RULE=RULE_CODES[rule], BF16=precision == "bf16",
        PREC=_INPUT_PRECISION[precision], **meta,
    )  # fmt: skip


def triton_usable(device: torch.device) -> bool:
    """True where the kernel can run: a CUDA device, or the CPU under TRITON_INTERPRET=1."""
    import os

    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
