"""Triton kernels of the projection step, batched over B same-shape matrices (one launch each).

Apply (``fused_apply``, the ``triton`` backend of ``kernels.projection.apply_projection``): each
(BM x BN) tile of each W_b is updated in one pass, the grid being (tiles, B):

    right (P: n x r, X = G_sf and U: m x r):  A1 = X, A2 = U, B1 = B2 = P^T  (B tile shared)
    left  (P: m x r, X = G_sf and U: r x n):  A1 = A2 = P (A tile shared),  B1 = X, B2 = U
    acc1 = A1 B1 = up(G_sf),  acc2 = A2 B2 = up(U)                       (float32 accumulators)
    W   <- W (1 - lr wd) + c_u acc2 + c_f F(G - acc1),   c_u = -lr s_p, c_f = -lr s_p s_i

F: ``signsgd`` sign (NaN propagates, as ``torch.sign``), ``sgd`` identity, ``none`` 0 (acc1 and
the G read skipped). Memory traffic: read G and W, write W (12 bytes per float32 entry) plus the
(m + n) r operand tiles (L2-resident: a few MiB per matrix). No temporaries.

Down (``fused_down``, the ``triton`` backend of ``project_down``): out_b = G_b P_b (right,
(m, r)) or P_b^T G_b (left, (r, n), computed as (G_b^T P_b)^T), reading G in its own dtype
once (the ``bf16`` tiles are rounded in registers: no bfloat16 copy of G is written).

Both kernels read W and G through a table of B device addresses (the matrices are separate
tensors), the bases and compact operands as stacked (B, ., .) tensors. Precision: ``fp32`` ->
``tl.dot`` ieee, ``tf32`` -> tf32 on float32 operands, ``bf16`` -> bfloat16 operands (float32
accumulate; W, G and the epilogue stay float32): operands handed over as float32 (G always, X
from the down product, P where no bfloat16 stack is kept) are rounded in registers, so the step
writes no bfloat16 copies. Tile sizes
come from a fixed table (``TILES``, measured on an H200 by
``benchmarks/kernels_projection_tiles.py``), not from run-time autotuning, so every rank runs the
same arithmetic (same result on any world size).

Needs triton (a CUDA device, or ``TRITON_INTERPRET=1`` on the CPU for tests).
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, is_
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from frugal_dist.kernels import projection_apply_v2 as v2
from frugal_dist.kernels.projection_apply_v2 import cdiv, matched_coef, update_tile

RULE_CODES = {"signsgd": 0, "sgd": 1, "none": 2}
SIDES = ("left", "right")
# the down product of the triton backend: this module's kernel, one cuBLAS bmm over G stacked
# into a temporary, or one cuBLAS mm per matrix (no copy of G; B launches)
DOWN_BACKENDS = ("triton", "bmm", "mm")
_INPUT_PRECISION = {"fp32": "ieee", "tf32": "tf32", "bf16": "tf32"}
_OPERAND = {"fp32": tl.float32, "tf32": tl.float32, "bf16": tl.bfloat16}
_ELEM = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# (BM, BN, BK, num_warps, num_stages) by kernel and precision. Built-in defaults, overridden by
# projection_tiles.json beside this file: the best candidates of a sweep on an H200 at LLaMA-1B
# shapes (r = 512), written by benchmarks/kernels_projection_tiles.py --write-tiles. Its
# ``down_backend`` names, per precision, the fastest down product there (``DOWN_BACKENDS``).
TILES_FILE = Path(__file__).with_name("projection_tiles.json")
_DEFAULT_TILES = {
    "apply": {"bf16": (128, 128, 64, 8, 3), "tf32": (128, 128, 32, 8, 3),
              "fp32": (64, 64, 32, 4, 2)},
    "down": {"bf16": (128, 128, 64, 8, 3), "tf32": (128, 128, 32, 8, 3),
             "fp32": (64, 64, 32, 4, 2)},
}  # fmt: skip
# (BM, BN, BK, warps, stages); apply: optionally a 6th, ``stacked`` (0 / 1), and a 7th, the
# ``variant`` (``projection_apply_v2``: 'base' or e.g. 'grouped+early'; needs stacked = 0)
Tile = tuple[Any, ...]


def _tile_key_ok(kind: str, key: str) -> bool:
    """``<precision>``, ``<precision>.<m>x<n>`` (one matrix shape's tile), or for the apply
    ``<precision>.<side>`` (a side's own tile)."""
    prec, _, rest = key.partition(".")
    if prec not in _INPUT_PRECISION:
        return False
    return rest == "" or (kind == "apply" and rest in SIDES) or bool(re.fullmatch(r"\d+x\d+", rest))


DOWN_VARIANTS = ("base", "aligned")  # a down tile's optional 6th field


def _tile_ok(kind: str, t: Any) -> bool:
    n_ok = (len(t) == 5 or (kind == "apply" and len(t) in (6, 7) and t[5] in (0, 1))
            or (kind == "down" and len(t) == 6 and t[5] in DOWN_VARIANTS))  # fmt: skip
    return n_ok and all(isinstance(x, int) and x > 0 for x in t[:5])


def tile_variant(t: Tile) -> dict[str, Any] | None:
    """The knobs of an apply tile's 7th field (None: the plain kernels, 'base' or absent); a
    ValueError naming the field and the fix for a bad one or one combined with stacked = 1."""
    if len(t) < 7 or t[6] == "base":
        return None
    flags = v2.parse_variant(t[6])
    if t[5] != 0:
        raise ValueError(f"apply tile {list(t)!r}: the variant {t[6]!r} is a two-product kernel; "
                         "set the 6th field (stacked) to 0 or the variant to 'base'")  # fmt: skip
    return flags


def load_tiles(path: Path = TILES_FILE) -> tuple[dict[str, dict[str, Tile]], dict[str, str]]:
    """(tiles by kernel and precision, down backend by precision): the defaults above updated
    from ``path`` when it exists. Keys may name a matrix shape (``bf16.2048x5461``: the tile of
    the (2048, 5461) matrices) and, for the apply, a side (``bf16.right``); the most specific
    present key wins (shape, side, precision). Apply tiles may carry a 6th entry, 1 =
    ``_apply_stacked_kernel`` (one dot on stacked operands), 0 / absent = ``_apply_kernel``,
    and a 7th, the variant of ``projection_apply_v2`` ('base' / absent: the kernels here)."""
    tiles = {k: dict(v) for k, v in _DEFAULT_TILES.items()}
    down_backend = {p: "triton" for p in _INPUT_PRECISION}
    if path.exists():
        data = json.loads(path.read_text())
        for kind in tiles:
            for prec, t in data.get(kind, {}).items():
                if not (_tile_key_ok(kind, prec) and isinstance(t, list) and _tile_ok(kind, t)):
                    raise ValueError(f"{path}: {kind}.{prec} must be five positive ints (BM, "
                                     f"BN, BK, warps, stages; apply: and optionally 'stacked' "
                                     f"0/1, then a variant string; down: optionally "
                                     f"{' or '.join(DOWN_VARIANTS)}), keyed by a precision "
                                     f"(apply: or precision.side), got {t!r}")  # fmt: skip
                if kind == "apply":
                    try:
                        tile_variant(t)
                    except ValueError as exc:
                        raise ValueError(f"{path}: apply.{prec}: {exc}") from None
                tiles[kind][prec] = tuple(t)
        for prec, how in data.get("down_backend", {}).items():
            if prec not in _INPUT_PRECISION or how not in DOWN_BACKENDS:
                raise ValueError(f"{path}: down_backend.{prec} must be one of "
                                 f"{list(DOWN_BACKENDS)}, got {how!r}")  # fmt: skip
            down_backend[prec] = how
    return tiles, down_backend


TILES, DOWN_BACKEND = load_tiles()
_INTERPRET_TILE = (32, 32, 16, 4, 1)


@triton.jit
def _apply_kernel(
    w_addrs, g_addrs, p_ptr, x_ptr, u_ptr,
    m, n,
    s_gm, s_gn, s_pb, s_p0, s_p1, s_xb, s_x0, s_x1, s_ub, s_u0, s_u1,
    decay, c_u, c_f, fs_ptr, cnt_ptr,
    r: tl.constexpr,  # the rank: a compile-time loop bound (few distinct values per model)
    LEFT: tl.constexpr, RULE: tl.constexpr, G_ELEM: tl.constexpr, PREC: tl.constexpr,
    OP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, MATCHED: tl.constexpr,
):  # fmt: skip
    """``OP``: the products' operand dtype; P, X, U tiles of another dtype (float32 X in the
    ``bf16`` precision) are rounded to it in registers. ``MATCHED`` (``free_scale="matched"``,
    ``kernels.projection_matched``): c_f times ``fs_ptr[b]``, F's zeros counted at
    ``cnt_ptr[b]``."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(n, BN)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    w_ptr = tl.load(w_addrs + b).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(g_addrs + b).to(tl.pointer_type(G_ELEM))
    p_ptr += b * s_pb
    x_ptr += b * s_xb
    u_ptr += b * s_ub
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    # operand rows wrap around (their products land outside W and are masked at the store)
    om = rm % m
    on = rn % n
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, r, BK):
        rk = k0 + tl.arange(0, BK)
        if LEFT:  # P (m, r) rows om; X, U (r, n)
            a_off = om[:, None] * s_p0 + rk[None, :] * s_p1
            x_off = rk[:, None] * s_x0 + on[None, :] * s_x1
            u_off = rk[:, None] * s_u0 + on[None, :] * s_u1
            if EVEN_K:
                a = tl.load(p_ptr + a_off)
                b2 = tl.load(u_ptr + u_off)
            else:
                a = tl.load(p_ptr + a_off, mask=rk[None, :] < r, other=0.0)
                b2 = tl.load(u_ptr + u_off, mask=rk[:, None] < r, other=0.0)
            a = a.to(OP)
            acc2 = tl.dot(a, b2.to(OP), acc2, input_precision=PREC)
            if RULE != 2:
                if EVEN_K:
                    b1 = tl.load(x_ptr + x_off)
                else:
                    b1 = tl.load(x_ptr + x_off, mask=rk[:, None] < r, other=0.0)
                acc1 = tl.dot(a, b1.to(OP), acc1, input_precision=PREC)
        else:  # X, U (m, r) rows om; P (n, r): the B tile is P^T[rk, on] = P[on, rk]
            b_off = on[None, :] * s_p0 + rk[:, None] * s_p1
            x_off = om[:, None] * s_x0 + rk[None, :] * s_x1
            u_off = om[:, None] * s_u0 + rk[None, :] * s_u1
            if EVEN_K:
                bt = tl.load(p_ptr + b_off)
                a2 = tl.load(u_ptr + u_off)
            else:
                bt = tl.load(p_ptr + b_off, mask=rk[:, None] < r, other=0.0)
                a2 = tl.load(u_ptr + u_off, mask=rk[None, :] < r, other=0.0)
            bt = bt.to(OP)
            acc2 = tl.dot(a2.to(OP), bt, acc2, input_precision=PREC)
            if RULE != 2:
                if EVEN_K:
                    a1 = tl.load(x_ptr + x_off)
                else:
                    a1 = tl.load(x_ptr + x_off, mask=rk[None, :] < r, other=0.0)
                acc1 = tl.dot(a1.to(OP), bt, acc1, input_precision=PREC)
    update_tile(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, acc1, acc2, decay, c_u,
                matched_coef(c_f, fs_ptr, b, MATCHED), RULE, cnt_ptr + b, MATCHED)  # fmt: skip


@triton.jit
def _apply_stacked_kernel(
    w_addrs, g_addrs, p_ptr, x_ptr,
    m, n, u_delta,
    s_gm, s_gn, s_pb, s_p0, s_p1, s_xb, s_x0, s_x1,
    decay, c_u, c_f, fs_ptr, cnt_ptr,
    r: tl.constexpr, LEFT: tl.constexpr, RULE: tl.constexpr, G_ELEM: tl.constexpr,
    PREC: tl.constexpr, OP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, EVEN_K: tl.constexpr, MATCHED: tl.constexpr,
):  # fmt: skip
    """``_apply_kernel`` with both products as ONE ``tl.dot`` on stacked operands: right,
    A' = [X rows; U rows] (2 BM x BK) times the shared P^T tile -> (2 BM x BN); left, the shared
    P tile times B' = [X cols | U cols] (BK x 2 BN) -> (BM x 2 BN); the accumulator is split in
    the epilogue. The same flops and operand bytes as two dots, as one standard GEMM tile. U is
    read at ``x_ptr + u_delta`` with X's strides (the host checks: same dtype and layout)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(n, BN)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    w_ptr = tl.load(w_addrs + b).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(g_addrs + b).to(tl.pointer_type(G_ELEM))
    p_ptr += b * s_pb
    x_ptr += b * s_xb
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    if LEFT:  # columns j < BN of B' are X's, the others U's
        j = tl.arange(0, 2 * BN)
        cj = (pid_n * BN + j % BN) % n
        col = tl.where(j < BN, 0, u_delta) + cj.to(tl.int64) * s_x1
        om = rm % m
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for k0 in range(0, r, BK):
            rk = k0 + tl.arange(0, BK)
            a_off = om[:, None] * s_p0 + rk[None, :] * s_p1
            b_off = rk[:, None] * s_x0 + col[None, :]
            if EVEN_K:
                a = tl.load(p_ptr + a_off)
                bx = tl.load(x_ptr + b_off)
            else:
                a = tl.load(p_ptr + a_off, mask=rk[None, :] < r, other=0.0)
                bx = tl.load(x_ptr + b_off, mask=rk[:, None] < r, other=0.0)
            acc = tl.dot(a.to(OP), bx.to(OP), acc, input_precision=PREC)
        acc1, acc2 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
    else:  # rows i < BM of A' are X's, the others U's; the B tile is P^T[rk, on] = P[on, rk]
        i = tl.arange(0, 2 * BM)
        ri = (pid_m * BM + i % BM) % m
        row = tl.where(i < BM, 0, u_delta) + ri.to(tl.int64) * s_x0
        on = rn % n
        acc = tl.zeros((2 * BM, BN), dtype=tl.float32)
        for k0 in range(0, r, BK):
            rk = k0 + tl.arange(0, BK)
            a_off = row[:, None] + rk[None, :] * s_x1
            b_off = on[None, :] * s_p0 + rk[:, None] * s_p1
            if EVEN_K:
                a = tl.load(x_ptr + a_off)
                bt = tl.load(p_ptr + b_off)
            else:
                a = tl.load(x_ptr + a_off, mask=rk[None, :] < r, other=0.0)
                bt = tl.load(p_ptr + b_off, mask=rk[:, None] < r, other=0.0)
            acc = tl.dot(a.to(OP), bt.to(OP), acc, input_precision=PREC)
        acc1, acc2 = tl.split(tl.permute(tl.reshape(acc, (2, BM, BN)), (1, 2, 0)))
    update_tile(w_ptr, g_ptr, rm, rn, m, n, s_gm, s_gn, acc1, acc2, decay, c_u,
                matched_coef(c_f, fs_ptr, b, MATCHED), RULE, cnt_ptr + b, MATCHED)  # fmt: skip


@triton.jit
def _down_kernel(
    g_addrs, p_ptr, o_ptr,
    M,
    s_ga, s_gc, s_pb, s_pc, s_pk, s_ob, s_oa, s_ok,
    K: tl.constexpr, r: tl.constexpr, G_ELEM: tl.constexpr, BF16: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """out_b[a, k] = sum_c A_b[a, c] P_b[c, k], A_b[a, c] = G_b[a s_ga + c s_gc] (M x K; K, the
    contracted side of G, is a compile-time loop bound like r). ``ALIGNED``: every G address is
    a multiple of 16 bytes (host-checked), so G's tiles load as vectors (the table's addresses
    are otherwise assumed 4-byte aligned: scalar loads)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_k = tl.cdiv(r, BN)
    pid_a = pid // tiles_k  # the r tiles of one row block run side by side: G re-read from L2
    pid_k = pid % tiles_k
    g_ptr = tl.load(g_addrs + b).to(tl.pointer_type(G_ELEM))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
    p_ptr += b * s_pb
    o_ptr += b * s_ob
    ra = pid_a * BM + tl.arange(0, BM)
    rk = pid_k * BN + tl.arange(0, BN)
    oa = ra % M
    ok = rk % r
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, K, BK):
        rc = c0 + tl.arange(0, BK)
        a_off = oa[:, None] * s_ga + rc[None, :] * s_gc
        b_off = rc[:, None] * s_pc + ok[None, :] * s_pk
        if EVEN_K:
            a = tl.load(g_ptr + a_off)
            bt = tl.load(p_ptr + b_off)
        else:
            a = tl.load(g_ptr + a_off, mask=rc[None, :] < K, other=0.0)
            bt = tl.load(p_ptr + b_off, mask=rc[:, None] < K, other=0.0)
        if BF16:  # G and P rounded in registers (no bfloat16 copies)
            a = a.to(tl.bfloat16)
            bt = bt.to(tl.bfloat16)
        else:
            a = a.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PREC)
    mask = (ra < M)[:, None] & (rk < r)[None, :]
    tl.store(o_ptr + ra[:, None] * s_oa + rk[None, :] * s_ok, acc, mask=mask)


# ------------------------------------------------------------------------------------ host side
_ADDR_CACHE: OrderedDict[tuple, tuple[Tensor, int]] = OrderedDict()
_ADDR_CACHE_SIZE = 256


_DATA_PTR = Tensor.data_ptr
_IS_CONTIGUOUS = Tensor.is_contiguous
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")


def addresses(mats: Sequence[Tensor]) -> tuple[Tensor, int]:
    """(the address table, the bitwise OR of the addresses): an int64 tensor of the matrices'
    data addresses on their device, and ``ors & 15 == 0`` says every one is 16-byte aligned
    (the launches' ``ALIGNED`` decisions, no second pass over the addresses). Cached by the
    addresses (parameters and gradient buffers keep theirs from step to step): a hit is one
    ``data_ptr`` per matrix and one dict lookup; a miss copies through pinned memory without
    blocking the host on the stream."""
    dev = mats[0].device
    key = (str(dev), *map(_DATA_PTR, mats))  # no Python frame per matrix
    hit = _ADDR_CACHE.get(key)
    if hit is not None:
        _ADDR_CACHE.move_to_end(key)
        return hit
    ptrs = key[1:]
    host = torch.tensor(ptrs, dtype=torch.int64)
    if dev.type == "cuda":
        table = host.pin_memory().to(dev, non_blocking=True)
    else:
        table = host
    ors = 0
    for a in ptrs:
        ors |= a
    _ADDR_CACHE[key] = (table, ors)
    if len(_ADDR_CACHE) > _ADDR_CACHE_SIZE:
        _ADDR_CACHE.popitem(last=False)
    return table, ors


def uniform_strides(mats: Sequence[Tensor], m: int, n: int) -> list[Tensor]:
    """``mats`` as (m, n) views sharing one dtype and one stride pair (others are copied).
    Contiguous (m, n) matrices of one dtype (a step's gradients) are recognised by C-level
    passes (no Python frame per matrix)."""
    mn = (m, n)
    if all(map(mn.__eq__, map(_SHAPE, mats))):  # (m, n) already: no view op
        views = list(mats)
    else:
        views = [t if t.shape == mn else t.reshape(m, n) for t in mats]
    dt, st = views[0].dtype, views[0].stride()
    if dt not in _ELEM:
        raise ValueError(f"gradients must be float32, bfloat16 or float16, got {dt}")
    fast = m > 1 and n > 1 and st == (n, 1)  # then contiguous (m, n) means strides (n, 1)
    # dtypes are singletons (``==`` is identity; ``dt.__eq__`` is NotImplemented, truthy)
    if fast and all(map(_IS_CONTIGUOUS, views)) and all(map(is_, map(_DTYPE, views), repeat(dt))):
        return views
    if all(v.dtype == dt and v.stride() == st for v in views):
        return views
    return [v.to(dt).contiguous() for v in views]


def _tile(kind: str, precision: str, device: torch.device, shape: tuple[int, int],
          side: str = "") -> Tile:  # fmt: skip
    """The table's tile for a (m, n) matrix: by shape, else side (apply), else precision."""
    if device.type != "cuda":
        return _INTERPRET_TILE
    table = TILES[kind]
    for key in (f"{precision}.{shape[0]}x{shape[1]}", f"{precision}.{side}"):
        if key in table:
            return table[key]
    return table[precision]


def down_on_triton(precision: str, device: torch.device) -> bool:
    """Whether ``project_down``'s ``triton`` backend runs ``fused_down`` (else ``bmm``): always
    under the interpreter, on CUDA as ``DOWN_BACKEND`` says."""
    return device.type != "cuda" or DOWN_BACKEND[precision] == "triton"


def fused_apply(
    W: Sequence[Tensor], G: Sequence[Tensor], P: Tensor, X: Tensor, U: Tensor, side: str, *,
    decay: float, c_u: float, c_f: float, rule: str, precision: str,
    tile: Tile | None = None, w_addresses: tuple[Tensor, int] | None = None,
    matched: tuple[Tensor, Tensor] | None = None,
) -> None:  # fmt: skip
    """W_b <- W_b decay + c_u up(U_b) + c_f F(G_b - up(X_b)) in place for B matrices (module doc).
    ``W``: contiguous float32 (m, n) tensors; ``G``: (m, n)-viewable float32 / bfloat16 / float16;
    ``P`` (B, dim, r), ``X``, ``U`` (B, m, r) right / (B, r, n) left: float32, or (any of them)
    bfloat16 for ``bf16``, where float32 tiles are rounded to bfloat16 in registers (no cast
    copies). ``tile``: (BM, BN, BK, warps, stages[, stacked[, variant]]), default the measured
    table (per precision and side); ``stacked`` = 1 runs ``_apply_stacked_kernel`` (X and U then
    share one dtype and layout: cast / laid out here if they do not); a variant other than
    'base' runs ``projection_apply_v2``'s kernel. ``w_addresses``: ``addresses(W)`` where the
    caller holds it (the same W at every step, ``projection.ParamBatch``). ``matched``:
    (factors, counters), each matrix's c_f times factors[b] and F's zeros added to the int32
    counters[b], then ``projection_matched.launch_fix`` (rule ``signsgd``). One launch (two
    with ``matched``). Communication: none."""
    B = len(W)
    m, n = W[0].shape
    r = P.shape[-1]
    Gv = uniform_strides(G, m, n)
    (w_table, w_or), (g_table, g_or) = w_addresses or addresses(W), addresses(Gv)
    bm, bn, bk, warps, stages, *rest = tile or _tile("apply", precision, W[0].device, (m, n),
                                                     side)  # fmt: skip
    variant = tile_variant((bm, bn, bk, warps, stages, *rest))
    if matched is not None and rule != "signsgd":
        raise ValueError(f"matched scales a sign residual (rule 'signsgd'), got rule={rule!r}")
    consts = dict(G_ELEM=_ELEM[Gv[0].dtype], PREC=_INPUT_PRECISION[precision],
                  OP=_OPERAND[precision])  # fmt: skip
    fs, cnt = matched if matched is not None else (w_table, w_table)  # unread without MATCHED
    grid = (cdiv(m, bm) * cdiv(n, bn), B)
    if variant is not None:
        v2.launch(variant, w_table, g_table, Gv[0].stride(), P, X, U, m, n,
                  side, decay=decay, c_u=c_u, c_f=c_f, consts=dict(RULE=RULE_CODES[rule],
                  **consts), bm=bm, bn=bn, bk=bk, warps=warps, stages=stages,
                  aligned=(w_or | g_or) & 15 == 0, matched=matched)  # fmt: skip
    elif rest and rest[0] == 1 and rule != "none":
        if X.dtype != U.dtype or X.stride() != U.stride():
            X = torch.empty_like(U).copy_(X)  # a fallback; the step hands them over alike
        delta, rem = divmod(U.data_ptr() - X.data_ptr(), X.element_size())
        if rem:  # not expected from the caching allocator (512-byte blocks)
            X = torch.empty_like(U).copy_(X)
            delta = (U.data_ptr() - X.data_ptr()) // X.element_size()
        _apply_stacked_kernel[grid](
            w_table, g_table, P, X, m, n, delta,
            Gv[0].stride(0), Gv[0].stride(1), P.stride(0), P.stride(1), P.stride(2),
            X.stride(0), X.stride(1), X.stride(2), float(decay), float(c_u), float(c_f), fs,
            cnt, r=r, LEFT=side == "left", RULE=RULE_CODES[rule], BM=bm, BN=bn, BK=bk,
            EVEN_K=r % bk == 0, MATCHED=matched is not None, num_warps=warps,
            num_stages=stages, **consts,
        )  # fmt: skip
    else:
        _apply_kernel[grid](
            w_table, g_table, P, X, U, m, n,
            Gv[0].stride(0), Gv[0].stride(1), P.stride(0), P.stride(1), P.stride(2),
            X.stride(0), X.stride(1), X.stride(2), U.stride(0), U.stride(1), U.stride(2),
            float(decay), float(c_u), float(c_f), fs, cnt,
            r=r, LEFT=side == "left", RULE=RULE_CODES[rule], BM=bm, BN=bn, BK=bk,
            EVEN_K=r % bk == 0, MATCHED=matched is not None, num_warps=warps,
            num_stages=stages, **consts,
        )  # fmt: skip
    if matched is not None:  # the zeros' part of the scale (kernels.projection_matched)
        from frugal_dist.kernels.projection_matched import launch_fix

        launch_fix(w_table, g_table, Gv[0].stride(), P, X, matched, m, n, side, c_f=c_f,
                   consts=consts, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages)  # fmt: skip


def fused_down(
    G: Sequence[Tensor], P: Tensor, side: str, out: Tensor, *, precision: str,
    tile: Tile | None = None,
) -> Tensor:  # fmt: skip
    """out_b = G_b P_b (right, out (B, m, r)) or P_b^T G_b (left, out (B, r, n)), float32, for
    B (m, n)-viewable gradients; ``P`` (B, dim, r) float32, or bfloat16 for ``bf16`` (G's tiles,
    and P's if float32, are then rounded to bfloat16 in registers). ``out`` may be any strided
    view (a ``left`` (B, r, n) result stored as (B, n, r): the apply's K-contiguous layout).
    ``tile``: (BM, BN, BK, warps, stages[, variant]); variant ``aligned`` tells the kernel the
    gradients' addresses are 16-byte multiples when they all are (vector loads of G).
    One launch. Communication: none."""
    B = len(G)
    r = P.shape[-1]
    m, n = (P.shape[1], G[0].numel() // P.shape[1]) if side == "left" else (
        G[0].numel() // P.shape[1], P.shape[1])  # fmt: skip
    Gv = uniform_strides(G, m, n)
    s_gm, s_gn = Gv[0].stride()
    if side == "right":  # a = row i of G, c = column j; out (m, r)
        M, K, s_ga, s_gc, s_oa, s_ok = m, n, s_gm, s_gn, out.stride(1), out.stride(2)
    else:  # a = column j, c = row i; out (r, n) written transposed
        M, K, s_ga, s_gc, s_oa, s_ok = n, m, s_gn, s_gm, out.stride(2), out.stride(1)
    bm, bn, bk, warps, stages, *rest = tile or _tile("down", precision, out.device, (m, n))
    g_table, g_or = addresses(Gv)
    aligned = rest == ["aligned"] and g_or & 15 == 0
    grid = (cdiv(M, bm) * cdiv(r, bn), B)
    _down_kernel[grid](
        g_table, P, out, M,
        s_ga, s_gc, P.stride(0), P.stride(1), P.stride(2), out.stride(0), s_oa, s_ok,
        K=K, r=r, G_ELEM=_ELEM[Gv[0].dtype], BF16=precision == "bf16",
        PREC=_INPUT_PRECISION[precision], BM=bm, BN=bn, BK=bk, EVEN_K=K % bk == 0,
        ALIGNED=aligned, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def triton_usable(device: torch.device) -> bool:
    """True where the kernels can run: a CUDA device, or the CPU under TRITON_INTERPRET=1."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
