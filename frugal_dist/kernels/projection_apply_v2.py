"""Structural variants of the projection apply kernel (``projection_triton.fused_apply``).

The same update as ``projection_triton._apply_kernel`` (two float32 accumulators over K = r,
then the epilogue), for B same-shape matrices, with the work laid out differently:

    acc1 = A1 B1 = up(G_sf),  acc2 = A2 B2 = up(U)
    W   <- W (1 - lr wd) + c_u acc2 + c_f F(G - acc1)

Every operand is read as tiles of a row store: A tiles (BM x BK) of an (m, r) store, B tiles
(BK x BN) as transposed (BN x BK) tiles of an (n, r) store (right: A1 = X, A2 = U, B1 = B2 = P,
the P tile loaded once; left: A1 = A2 = P, loaded once, B1 = X, B2 = U in their (B, n, r)
K-contiguous storage). The variant (the 7th field of an apply tile) is ``+``-joined tokens:

* ``grouped``   -- tiles visited in super-rows of ``GROUP_M`` = 8 tile rows (the tutorial's
                   L2 ordering): neighbouring programs share A and B operand tiles.
* ``early``     -- the epilogue's W and G tiles are loaded before the K loop, so their HBM
                   reads overlap the products (costs 2 BM BN registers per CTA).
* ``seq``       -- the products one after the other (acc1, then c_f F(G - acc1) kept, then
                   acc2): one accumulator at a time, so larger tiles fit the registers, at
                   the cost of reading the shared operand tile twice. ``early`` then loads
                   W and G before the first product. (GPU: F = identity may round
                   differently, the final add not being fused.)
* ``persist<k>``-- a persistent grid of k programs per SM looping over (matrix, tile) work
                   items (``persist`` = 1 per SM).
* ``regs<n>``   -- at most n registers per thread (ptxas ``maxnreg``): more programs per SM
                   (the plain 64 x 64 tiles take ~220; the SM has 64 Ki), at the risk of spills.
* ``tma``       -- the operand tiles through TMA tensor descriptors (``TensorDescriptor`` of
                   ``triton.tools.tensor_descriptor``) on the stacked operands flattened to
                   (B rows, r); where the running triton lacks them, or the operands cannot be
                   described (16-byte alignment), the pointer loads run instead (same result).

Results equal ``_apply_kernel``'s with the same (BM, BN, BK) bit for bit: the same products
in the same K order and the same epilogue (``update_tile``). Memory traffic as the module doc
of ``projection_triton``: read G and W, write W, operand tiles from L2. Communication: none.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # triton >= 3.4 (host-side TMA descriptors)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None

VARIANT_TOKENS = re.compile(r"grouped|early|seq|tma|persist\d*|regs\d+")
GROUP_M = 8
_INTERPRET_SMS = 2  # the persistent grid under the CPU interpreter: the loop runs several items


def parse_variant(variant: str) -> dict[str, Any]:
    """The knobs of a variant string (module doc); ``base`` = the plain kernels of
    ``projection_triton``. A ValueError naming the bad token otherwise."""
    flags: dict[str, Any] = {"grouped": False, "early": False, "seq": False, "tma": False,
                             "persist": 0, "maxnreg": None}  # fmt: skip
    if not isinstance(variant, str) or variant == "":
        raise ValueError(f"an apply tile's variant must be 'base' or '+'-joined tokens of "
                         f"grouped, early, tma, persist<k>, regs<n>; got {variant!r}")  # fmt: skip
    if variant == "base":
        return flags
    for tok in variant.split("+"):
        if not VARIANT_TOKENS.fullmatch(tok):
            raise ValueError(f"apply tile variant {variant!r}: unknown token {tok!r} "
                             "(use grouped, early, tma, persist<k>, regs<n> joined by '+', "
                             "or 'base')")  # fmt: skip
        if tok.startswith("persist"):
            k = int(tok[len("persist") :] or 1)
            if k < 1:
                raise ValueError(f"apply tile variant {variant!r}: persist<k> needs k >= 1")
            flags["persist"] = k
        elif tok.startswith("regs"):
            n = int(tok[len("regs") :])
            if not 24 <= n <= 255:
                raise ValueError(f"apply tile variant {variant!r}: regs<n> needs 24 <= n <= 255")
            flags["maxnreg"] = n
        else:
            flags[tok] = True
    return flags


def tma_available() -> bool:
    """Whether this triton has host-side tensor descriptors (the ``tma`` token)."""
    return TensorDescriptor is not None


@triton.jit
def _masked_tile(ptr, rm, rn, m, n, s_m, s_n):
    mask = (rm < m)[:, None] & (rn < n)[None, :]
    return tl.load(ptr + rm[:, None] * s_m + rn[None, :] * s_n, mask=mask, other=0.0)


@triton.jit
def load_wg(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, RULE: tl.constexpr):
    """The (BM x BN) tiles of W (contiguous float32) and G (its own dtype; W again if unused)."""
    w = _masked_tile(w_ptr, rm, rn, m, n, n, 1)
    if RULE != 2:
        g = _masked_tile(g_ptr, rm, rn, m, n, s_gm, s_gn)
    else:
        g = w
    return w, g


@triton.jit
def free_term(g, acc1, RULE: tl.constexpr):
    """F(G - acc1): sign (NaN propagates, as ``torch.sign``) or identity."""
    res = g.to(tl.float32) - acc1
    if RULE == 0:
        res = tl.where(res > 0, 1.0, tl.where(res < 0, -1.0, res * 0.0))
    return res


@triton.jit
def count_zeros(f, mask, cnt_ptr):
    """``free_scale="matched"``: add the tile's number of exact zeros of F (inside ``mask``) to
    the matrix's int32 counter (an integer atomic: the total does not depend on the order)."""
    zeros = tl.sum(tl.sum(tl.where(mask & (f == 0.0), 1, 0), axis=1), axis=0)
    if zeros > 0:
        tl.atomic_add(cnt_ptr, zeros, sem="relaxed")  # read by the next launch


@triton.jit
def matched_coef(c_f, fs_ptr, b, MATCHED: tl.constexpr):
    """The matrix's state-free coefficient: ``c_f`` times its per-matrix factor ``fs_ptr[b]``
    (``free_scale="matched"``: ||U_b||, ``kernels.projection_matched``), else ``c_f``."""
    if MATCHED:
        c_f = c_f * tl.load(fs_ptr + b)
    return c_f


@triton.jit
def store_update(w_ptr, w, g, rm, rn, m, n, acc1, acc2, decay, c_u, c_f, RULE: tl.constexpr,
                 cnt_ptr, MATCHED: tl.constexpr):  # fmt: skip
    """W[rm, rn] <- w decay + c_u acc2 + c_f F(g - acc1) (F by ``RULE``: sign, identity, 0);
    ``MATCHED``: F's exact zeros counted at ``cnt_ptr`` (``count_zeros``)."""
    mask = (rm < m)[:, None] & (rn < n)[None, :]
    out = w * decay + c_u * acc2
    if RULE != 2:
        f = free_term(g, acc1, RULE)
        out += c_f * f
        if MATCHED:
            count_zeros(f, mask, cnt_ptr)
    tl.store(w_ptr + rm[:, None] * n + rn[None, :], out, mask=mask)


@triton.jit
def update_tile(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, acc1, acc2, decay, c_u, c_f,
                RULE: tl.constexpr, cnt_ptr, MATCHED: tl.constexpr):  # fmt: skip
    """W[rm, rn] <- W decay + c_u acc2 + c_f F(G - acc1): reads G and W once, writes W once."""
    w, g = load_wg(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, RULE)
    store_update(w_ptr, w, g, rm, rn, m, n, acc1, acc2, decay, c_u, c_f, RULE, cnt_ptr, MATCHED)


@triton.jit
def _tile_coords(q, tiles_m, tiles_n, GROUP: tl.constexpr):
    """(tile row, tile column) of a matrix's q-th work item: row-major, or in super-rows of
    ``GROUP`` tile rows walked column by column."""
    if GROUP > 1:
        width = GROUP * tiles_n
        first = (q // width) * GROUP
        size = tl.minimum(tiles_m - first, GROUP)
        pid_m = first + (q % width) % size
        pid_n = (q % width) // size
    else:
        pid_m = q // tiles_n
        pid_n = q % tiles_n
    return pid_m, pid_n


@triton.jit
def _rows_tile(src, b, row0, k0, rows, s_b, s_r, s_k, r: tl.constexpr, BR: tl.constexpr,
               BK: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """Rows row0 .. row0 + BR - 1 (wrapped mod ``rows`` for pointers: their products land
    outside W and are masked; TMA: the next matrix's rows or zeros, masked alike), columns
    k0 .. k0 + BK - 1 of matrix b's (rows, r) store: a (BR x BK) tile."""
    if TMA:
        tile = src.load([b * rows + row0, k0])
    else:
        ri = (row0 + tl.arange(0, BR)) % rows
        rk = k0 + tl.arange(0, BK)
        off = b.to(tl.int64) * s_b + ri[:, None] * s_r + rk[None, :] * s_k
        if EVEN_K:
            tile = tl.load(src + off)
        else:
            tile = tl.load(src + off, mask=rk[None, :] < r, other=0.0)
    return tile


@triton.jit
def _product(sa, sb, b, pid_m, pid_n, m, n, s_ab, s_ar, s_ak, s_bb, s_br, s_bk,
             r: tl.constexpr, PREC: tl.constexpr, OP: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
             TMA: tl.constexpr):  # fmt: skip
    """One (BM x BN) product over K = r: A tiles of ``sa``'s rows times B tiles of ``sb``'s
    rows transposed, in the K order of the two-product loop (the same float32 sums)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, r, BK):
        x = _rows_tile(sa, b, pid_m * BM, k0, m, s_ab, s_ar, s_ak, r, BM, BK, EVEN_K, TMA)
        y = _rows_tile(sb, b, pid_n * BN, k0, n, s_bb, s_br, s_bk, r, BN, BK, EVEN_K, TMA)
        acc = tl.dot(x.to(OP), y.to(OP).T, acc, input_precision=PREC)
    return acc


@triton.jit
def _apply_v2_kernel(
    w_addrs, g_addrs, a1, a2, b1, b2,
    m, n, count,
    s_gm, s_gn,
    s_a1b, s_a1r, s_a1k, s_a2b, s_a2r, s_a2k, s_b1b, s_b1r, s_b1k, s_b2b, s_b2r, s_b2k,
    decay, c_u, c_f, fs_ptr, cnt_ptr,
    r: tl.constexpr, SHARE_A: tl.constexpr, RULE: tl.constexpr, G_ELEM: tl.constexpr,
    PREC: tl.constexpr, OP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, GROUP: tl.constexpr,
    EARLY: tl.constexpr, ALIGNED: tl.constexpr, SEQ: tl.constexpr, MATCHED: tl.constexpr,
):  # fmt: skip
    """Programs loop over the ``count`` x tiles work items (one each unless the grid is
    persistent). ``SHARE_A`` (left): one A tile (P) for both products, else one B tile (P).
    ``MATCHED``: c_f times ``fs_ptr[b]``, F's zeros counted at ``cnt_ptr[b]`` (``store_update``)."""
    tiles_m = tl.cdiv(m, BM)
    tiles_n = tl.cdiv(n, BN)
    per = tiles_m * tiles_n
    total = per * count
    step = tl.num_programs(0)
    t = tl.program_id(0)
    while t < total:  # (a while loop: the CPU interpreter cannot range() over run-time bounds)
        b = t // per
        pid_m, pid_n = _tile_coords(t - b * per, tiles_m, tiles_n, GROUP)
        c_fb = matched_coef(c_f, fs_ptr, b, MATCHED)
        w_ptr = tl.load(w_addrs + b).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(g_addrs + b).to(tl.pointer_type(G_ELEM))
        if ALIGNED:  # the host checked: 16-byte W / G addresses (vector loads and stores)
            w_ptr = tl.multiple_of(w_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        if SEQ:  # one product at a time: acc1 -> c_f F(G - acc1), then acc2
            if EARLY:
                w, g = load_wg(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, RULE)
            if RULE != 2:
                acc1 = _product(a1, b1, b, pid_m, pid_n, m, n, s_a1b, s_a1r, s_a1k, s_b1b,
                                s_b1r, s_b1k, r, PREC, OP, BM, BN, BK, EVEN_K, TMA)  # fmt: skip
                if not EARLY:
                    g = _masked_tile(g_ptr, rm, rn, m, n, s_gm, s_gn)
                f = free_term(g, acc1, RULE)
                t_free = c_fb * f
                if MATCHED:
                    count_zeros(f, (rm < m)[:, None] & (rn < n)[None, :], cnt_ptr + b)
            acc2 = _product(a2, b2, b, pid_m, pid_n, m, n, s_a2b, s_a2r, s_a2k, s_b2b, s_b2r,
                            s_b2k, r, PREC, OP, BM, BN, BK, EVEN_K, TMA)  # fmt: skip
            if not EARLY:
                w = _masked_tile(w_ptr, rm, rn, m, n, n, 1)
            out = w * decay + c_u * acc2
            if RULE != 2:
                out += t_free
            mask = (rm < m)[:, None] & (rn < n)[None, :]
            tl.store(w_ptr + rm[:, None] * n + rn[None, :], out, mask=mask)
        else:
            if EARLY:
                w, g = load_wg(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, RULE)
            acc1 = tl.zeros((BM, BN), dtype=tl.float32)
            acc2 = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, r, BK):
                if SHARE_A:  # left: P tile shared; X, U tiles transposed
                    a = _rows_tile(a1, b, pid_m * BM, k0, m, s_a1b, s_a1r, s_a1k, r, BM, BK,
                                   EVEN_K, TMA).to(OP)  # fmt: skip
                    y2 = _rows_tile(b2, b, pid_n * BN, k0, n, s_b2b, s_b2r, s_b2k, r, BN, BK,
                                    EVEN_K, TMA)  # fmt: skip
                    acc2 = tl.dot(a, y2.to(OP).T, acc2, input_precision=PREC)
                    if RULE != 2:
                        y1 = _rows_tile(b1, b, pid_n * BN, k0, n, s_b1b, s_b1r, s_b1k, r, BN,
                                        BK, EVEN_K, TMA)  # fmt: skip
                        acc1 = tl.dot(a, y1.to(OP).T, acc1, input_precision=PREC)
                else:  # right: P tile shared (transposed); X, U tiles
                    y = _rows_tile(b1, b, pid_n * BN, k0, n, s_b1b, s_b1r, s_b1k, r, BN, BK,
                                   EVEN_K, TMA).to(OP).T  # fmt: skip
                    x2 = _rows_tile(a2, b, pid_m * BM, k0, m, s_a2b, s_a2r, s_a2k, r, BM, BK,
                                    EVEN_K, TMA)  # fmt: skip
                    acc2 = tl.dot(x2.to(OP), y, acc2, input_precision=PREC)
                    if RULE != 2:
                        x1 = _rows_tile(a1, b, pid_m * BM, k0, m, s_a1b, s_a1r, s_a1k, r, BM,
                                        BK, EVEN_K, TMA)  # fmt: skip
                        acc1 = tl.dot(x1.to(OP), y, acc1, input_precision=PREC)
            if not EARLY:
                w, g = load_wg(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, RULE)
            store_update(w_ptr, w, g, rm, rn, m, n, acc1, acc2, decay, c_u, c_fb, RULE,
                         cnt_ptr + b, MATCHED)  # fmt: skip
        t += step


# ------------------------------------------------------------------------------------ host side
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of positive ints: ``triton.cdiv`` on the host without its
    ``constexpr_function`` wrapper (argument unwrapping: a few microseconds per call, several
    calls per launch)."""
    return -(-a // b)


def operand_stores(P: Tensor, X: Tensor, U: Tensor, side: str) -> list[Tensor]:
    """[A1, A2, B1, B2] as (B, rows, r) row stores (module doc): left X and U (B, r, n) are
    read through their (B, n, r) views ``.mT``."""
    if side == "left":
        return [P, P, X.mT, U.mT]
    return [X, U, P, P]


def _descriptor(t: Tensor, block: list[int]) -> Any:
    """A 2-D TMA descriptor of the (B, rows, r) store flattened to (B rows, r), or None where
    it cannot describe it (not flattenable, or not 16-byte aligned)."""
    B, rows, r = t.shape
    esz = t.element_size()
    if t.stride(2) != 1 or t.stride(0) != rows * t.stride(1) or (t.stride(1) * esz) % 16:
        return None
    if t.data_ptr() % 16 or (r * esz) < 16:
        return None
    return TensorDescriptor(t, [B * rows, r], [t.stride(1), 1], block)


def descriptors(stores: list[Tensor], bm: int, bn: int, bk: int) -> list[Any] | None:
    """TMA descriptors of ``operand_stores`` (A blocks BM x BK, B blocks BN x BK), or None
    where this triton lacks them or a store cannot be described."""
    if not tma_available():
        return None
    descs = [_descriptor(t, [bm if i < 2 else bn, bk]) for i, t in enumerate(stores)]
    return descs if all(d is not None for d in descs) else None


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (``_INTERPRET_SMS`` elsewhere): the size of a
    persistent grid."""
    if device.type != "cuda":
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(
    variant: dict[str, Any], w_table: Tensor, g_table: Tensor, g_strides: tuple[int, int],
    P: Tensor, X: Tensor, U: Tensor, m: int, n: int, side: str, *, decay: float, c_u: float,
    c_f: float, consts: dict[str, Any], bm: int, bn: int, bk: int, warps: int, stages: int,
    aligned: bool, matched: tuple[Tensor, Tensor] | None = None,
) -> None:  # fmt: skip
    """One launch of ``_apply_v2_kernel`` for the B matrices whose addresses are in the tables.
    ``consts``: the kernel's RULE, G_ELEM, PREC, OP constexprs (``projection_triton``);
    ``aligned``: every W and G address is a multiple of 16 bytes (the epilogue's loads and
    stores are then vectorized where the row length allows: the table's addresses are opaque
    to the compiler, which otherwise assumes 4-byte alignment and moves scalars);
    ``matched``: (the (B,) float32 factors of c_f, the (B,) int32 zero counters) of
    ``free_scale="matched"`` (``kernels.projection_matched``). A
    ``tma`` variant whose operands ``descriptors`` declines runs the pointer loads (the same
    products: the same result)."""
    B, r = P.shape[0], P.shape[-1]
    stores = operand_stores(P, X, U, side)
    descs = descriptors(stores, bm, bn, bk) if variant["tma"] else None
    total = B * cdiv(m, bm) * cdiv(n, bn)
    grid = min(total, sm_count(P.device) * variant["persist"]) if variant["persist"] else total
    strides = [s for t in stores for s in t.stride()]
    fs, cnt = matched if matched is not None else (w_table, w_table)  # unread without MATCHED
    _apply_v2_kernel[(grid,)](
        w_table, g_table, *(descs or stores), m, n, B, g_strides[0], g_strides[1], *strides,
        float(decay), float(c_u), float(c_f), fs, cnt,
        r=r, SHARE_A=side == "left", BM=bm, BN=bn, BK=bk, EVEN_K=r % bk == 0,
        TMA=descs is not None, GROUP=GROUP_M if variant["grouped"] else 1,
        EARLY=variant["early"], ALIGNED=aligned, SEQ=variant["seq"],
        MATCHED=matched is not None, num_warps=warps,
        num_stages=stages, **consts,
        **({"maxnreg": variant["maxnreg"]} if variant["maxnreg"] else {}),
    )  # fmt: skip
