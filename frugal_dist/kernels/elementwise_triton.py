"""Triton kernels behind ``frugal_dist.kernels.elementwise`` (imported lazily, only when a
CUDA tensor -- or a test under ``TRITON_INTERPRET=1`` -- asks for the Triton path).

Every kernel is one launch over a whole list of tensors: a small int64 *table* on the device holds
each tensor's data pointers (and, for AdamW, its bias corrections as float64 bits), so the number
of tensors costs host time to build the table, never extra launches. Tables are uploaded with one
pinned, non-blocking host-to-device copy (no device sync); tile maps, which depend only on the
tensors' sizes, are cached. ``launch_free`` / ``launch_adamw`` / ``launch_coordinate`` launch on
a table already on the device: a step plan keeps its tables in one ``kernels.step_table``
buffer (fixed entries written once, one copy per step for all its launches).

Bandwidth: each kernel reads and writes every byte once. Full tiles are unmasked, and 16-byte
aligned tensors get an alignment hint, so loads and stores are 128-bit vectors; the last tile of
each tensor is masked. Element ``i`` of a tensor is touched by exactly one program.

Arithmetic follows the torch paths' rounding order (see ``elementwise``): weight decay as
``p * keep`` first, then ``p + (-alpha) * D``; AdamW as ``core.rules`` -- ``m + w1 (g - m)``
(torch's lerp), ``v b2 + (w2 g) g`` -- except that D = (m / (sqrt(v) / bc2s + eps)) / bc1
divides by the per-tensor bias corrections as multiplications by their float32 reciprocals
(one IEEE division and one IEEE square root per element remain). Offsets are int32 unless a
tensor nears 2^31 elements (``WIDE``).
"""

from __future__ import annotations

import array
import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

# Elements per program (16 per thread at 8 warps: four 128-bit vectors per array) and warps per
# program, read at each launch (benchmarks/kernels_elementwise.py sweeps them).
BLOCK = 4096
NUM_WARPS = 8
# The coordinate kernel's tile and warps: 1024 x 8 measured fastest on an H200 at LLaMA-1B
# (columns 6.2 ms vs 11.5 ms at 4096 x 8; benchmarks/results/kernels_elementwise_cuda.json sweep).
COORD_BLOCK = 1024
COORD_WARPS = 8
COORD_VECTOR = False  # 128-bit W / G access in the coordinate kernel (see its docstring)
FREE_RULE_CODES = {"signsgd": 0, "sgd": 1, "none": 2}
_GDTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TILE_MAPS: dict[tuple, tuple[Tensor, Tensor, int]] = {}
_MAX_TILE_MAPS = 64


# ------------------------------------------------------------------------------- device helpers
@triton.jit
def _sign(g):
    """torch.sign: -1, 0, +1 (NaN -> 0, as torch's CPU and CUDA kernels)."""
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))


@triton.jit
def _free_direction(g, free_scale, FREE: tl.constexpr, FREE_SCALED: tl.constexpr):
    """free_scale * F(g) for F = sign (0), identity (1) or zero (2)."""
    if FREE == 0:
        f = _sign(g)
    elif FREE == 1:
        f = g
    else:
        f = tl.zeros_like(g)
    if FREE_SCALED:
        f = f * free_scale
    return f


@triton.jit
def _clipped(g, clip, ROUND: tl.constexpr, G_DTYPE: tl.constexpr, EXACT: tl.constexpr):
    """c g for the pending clip's coefficient c = *clip (``optim.clipping``), with the bits of
    torch's in-place multiply of a ``G_DTYPE`` gradient: the float32 product rounded once
    (``EXACT``: ``mul.rn``, which no FMA contraction may absorb; CUDA only, the interpreter has
    no libdevice), then to the gradient's dtype when ``ROUND`` (16-bit gradients)."""
    c = tl.load(clip).to(tl.float32)
    if EXACT:
        g = libdevice.mul_rn(g, c)
    else:
        g = g * c
    if ROUND:
        g = g.to(G_DTYPE).to(tl.float32)
    return g


@triton.jit
def _adamw_direction(g, m, v, w1, one_minus_w1, b2, w2, eps, ibc1, ibc2s, LERP_HIGH: tl.constexpr):
    """New (m, v) and D = (m / (sqrt(v) ibc2s + eps)) ibc1, ``ibc*`` the float32 reciprocals of
    the float64 bias corrections: core.rules' order with its two divisions by per-tensor
    scalars as multiplications (one IEEE division and square root per element are left; each
    division costs ~10 instructions, and the coordinate kernel is near its instruction bound)."""
    if LERP_HIGH:  # torch.lerp for weight >= 0.5: end - (end - self) * (1 - weight)
        m = g - (g - m) * one_minus_w1
    else:
        m = m + w1 * (g - m)
    v = v * b2 + (w2 * g) * g
    d = tl.div_rn(m, tl.sqrt_rn(v) * ibc2s + eps) * ibc1
    return m, v, d


@triton.jit
def _tile(tile_tensor, first_tile, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """(tensor index, first element) of this program's tile; int32 offsets unless ``WIDE``."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = pid - tl.load(first_tile + t)
    if WIDE:
        start = start.to(tl.int64)
    return t, start * BLOCK


@triton.jit
def _size(table, slot, WIDE: tl.constexpr):
    n = tl.load(table + slot)
    if not WIDE:
        n = n.to(tl.int32)
    return n


@triton.jit
def _ptr(table, slot, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(table + slot).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _free_kernel(
    tile_tensor, first_tile, table, nalpha, keep, free_scale, clip,
    FREE: tl.constexpr, DECAY: tl.constexpr, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    WIDE: tl.constexpr, BLOCK: tl.constexpr, CLIP: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """p <- p keep + nalpha F(g); table rows [p, g, numel]. ``CLIP``: g <- c g first (c =
    *clip, ``_clipped``)."""
    t, start = _tile(tile_tensor, first_tile, BLOCK, WIDE)
    p_ptr = _ptr(table, 3 * t, tl.float32, ALIGNED)
    g_ptr = _ptr(table, 3 * t + 1, G_DTYPE, ALIGNED)
    n = _size(table, 3 * t + 2, WIDE)
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= n
    mask = offs < n
    if full:
        p = tl.load(p_ptr + offs)
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        g = _clipped(g, clip, tl.float32 != G_DTYPE, G_DTYPE, EXACT)
    if DECAY:
        p = p * keep
    p = p + nalpha * _free_direction(g, free_scale, FREE, False)
    if full:
        tl.store(p_ptr + offs, p)
    else:
        tl.store(p_ptr + offs, p, mask=mask)


@triton.jit
def _adamw_kernel(
    tile_tensor, first_tile, table, coef, nlr, keep, w1, one_minus_w1, b2, w2, eps, clip,
    DECAY: tl.constexpr, LERP_HIGH: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr, CLIP: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """AdamW on whole tensors; table rows [p, g, m, v, numel, 1/bc1, 1/bc2s (float64 bits), 0].
    ``CLIP``: g <- c g first (c = *clip, ``_clipped``)."""
    t, start = _tile(tile_tensor, first_tile, BLOCK, WIDE)
    row = 8 * t
    p_ptr = _ptr(table, row, tl.float32, ALIGNED)
    g_ptr = _ptr(table, row + 1, tl.float32, ALIGNED)
    m_ptr = _ptr(table, row + 2, tl.float32, ALIGNED)
    v_ptr = _ptr(table, row + 3, tl.float32, ALIGNED)
    n = _size(table, row + 4, WIDE)
    ibc1 = tl.load(coef + row + 5).to(tl.float32)
    ibc2s = tl.load(coef + row + 6).to(tl.float32)
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= n
    mask = offs < n
    if full:
        p = tl.load(p_ptr + offs)
        g = tl.load(g_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if CLIP:
        g = _clipped(g, clip, False, tl.float32, EXACT)
    m, v, d = _adamw_direction(g, m, v, w1, one_minus_w1, b2, w2, eps, ibc1, ibc2s, LERP_HIGH)
    if DECAY:
        p = p * keep
    p = p + nlr * d
    if full:
        tl.store(p_ptr + offs, p)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
    else:
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _coordinate_kernel(
    table, coef, numel, N, K, nlr, keep, free_scale, w1, one_minus_w1, b2, w2, eps, clip,
    ROWS: tl.constexpr, WRAPS: tl.constexpr, FREE: tl.constexpr, FREE_SCALED: tl.constexpr,
    DECAY: tl.constexpr, LERP_HIGH: tl.constexpr, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    WIDE: tl.constexpr, BLOCK: tl.constexpr, CLIP: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """Columns (rows) AdamW + state-free rest on same-shape (M, N) matrices, grid (tiles, T).

    Table rows [w, g, m, v, pos, 1/bc1, 1/bc2s (float64 bits), 0]; ``pos`` (int32, length N for
    columns, M for rows) maps a column (row) to its compact index, -1 when not selected; m / v
    are the compact (M, K) (columns) or (K, N) (rows) moments. ``ALIGNED`` (128-bit W / G
    access) makes the compiler shuffle the gathered m / v / pos values between two register
    layouts through shared memory; scalar (still coalesced) access avoids that. ``CLIP``: the
    AdamW part (and an ``sgd`` rest) reads c g (c = *clip, ``_clipped``); sign(g) does not.
    """
    t = tl.program_id(1)
    start = tl.program_id(0)
    if WIDE:
        start = start.to(tl.int64)
    start = start * BLOCK
    row = 8 * t
    w_ptr = _ptr(table, row, tl.float32, ALIGNED)
    g_ptr = _ptr(table, row + 1, G_DTYPE, ALIGNED)
    m_ptr = _ptr(table, row + 2, tl.float32, False)
    v_ptr = _ptr(table, row + 3, tl.float32, False)
    pos_ptr = _ptr(table, row + 4, tl.int32, False)
    ibc1 = tl.load(coef + row + 5).to(tl.float32)
    ibc2s = tl.load(coef + row + 6).to(tl.float32)
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= numel
    mask = offs < numel
    # (row, column) of each element: the tile's first row by one scalar division, then at most
    # WRAPS row crossings by comparisons (a vector division when a tile spans many rows).
    r0 = start // N
    local = (start - r0 * N) + tl.arange(0, BLOCK)
    if WRAPS > 0:
        dr = tl.zeros_like(local)
        for j in tl.static_range(1, WRAPS + 1):
            dr += (local >= j * N).to(local.dtype)
    else:
        dr = local // N
    col = local - dr * N
    r = r0 + dr
    if ROWS:
        pos = tl.load(pos_ptr + r, mask=mask, other=-1)
        c_off = pos.to(r.dtype) * N + col
    else:
        pos = tl.load(pos_ptr + col, mask=mask, other=-1)
        c_off = r * K + pos
    sel = mask & (pos >= 0)
    if full:
        w = tl.load(w_ptr + offs)
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + c_off, mask=sel, other=0.0)
    v = tl.load(v_ptr + c_off, mask=sel, other=0.0)
    gs = g
    if CLIP:
        gs = _clipped(g, clip, tl.float32 != G_DTYPE, G_DTYPE, EXACT)
    if FREE == 0:  # sign(c g) = sign(g): the rest reads the unscaled gradient
        gf = g
    else:
        gf = gs
    m, v, u = _adamw_direction(gs, m, v, w1, one_minus_w1, b2, w2, eps, ibc1, ibc2s, LERP_HIGH)
    d = tl.where(sel, u, _free_direction(gf, free_scale, FREE, FREE_SCALED))
    if DECAY:
        w = w * keep
    w = w + nlr * d
    if full:
        tl.store(w_ptr + offs, w)
    else:
        tl.store(w_ptr + offs, w, mask=mask)
    tl.store(m_ptr + c_off, m, mask=sel)
    tl.store(v_ptr + c_off, v, mask=sel)


# --------------------------------------------------------------------------------- host helpers
def upload(values: list[int], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """A device tensor of ``values``: one pinned, non-blocking copy on CUDA (the caching host
    allocator keeps the pinned block until the copy is done: no sync), a CPU tensor otherwise."""
    code = {torch.int64: "q", torch.int32: "i"}[dtype]
    host = torch.frombuffer(array.array(code, values), dtype=dtype)  # ~4x torch.tensor(list)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def f64_bits(x: float) -> int:
    """The int64 bit pattern of float64 ``x`` (coefficients travel in the int64 table)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def f32(x: float) -> float:
    """``x`` rounded to float32 (a kernel scalar's value), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def tile_map(
    sizes: tuple[int, ...], device: torch.device, block: int = 0
) -> tuple[Tensor, Tensor, int]:
    """(tile -> tensor index int32, tensor -> first tile int32, number of tiles) for tiles of
    ``block`` units (default ``BLOCK`` elements; the sign kernels pass bytes), cached per
    (device, sizes, block); built on the host and uploaded without a sync. Shared by every
    one-launch-over-many-tensors kernel (elementwise, sign bits, the inf/nan test)."""
    block = block or BLOCK
    key = (device, sizes, block)
    hit = _TILE_MAPS.get(key)
    if hit is not None:
        return hit
    tiles = [-(-n // block) for n in sizes]
    first, total = [], 0
    for c in tiles:
        first.append(total)
        total += c
    counts = torch.tensor(tiles, dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), counts)
    if device.type == "cuda":
        owner = owner.pin_memory().to(device, non_blocking=True)
    out = (owner, upload(first, device, torch.int32), total)
    if len(_TILE_MAPS) >= _MAX_TILE_MAPS:
        _TILE_MAPS.pop(next(iter(_TILE_MAPS)))
    _TILE_MAPS[key] = out
    return out


@functools.lru_cache(maxsize=64)
def _adam_scalars(betas: tuple[float, float], eps: float) -> dict:
    b1, b2 = betas
    w1 = f32(1.0 - b1)
    return dict(w1=w1, one_minus_w1=f32(1.0 - w1), b2=b2, w2=1.0 - b2, eps=eps,
                LERP_HIGH=w1 >= 0.5)  # fmt: skip


@functools.lru_cache(maxsize=4096)
def adam_corrections(t: int, b1: float, b2: float) -> tuple[int, int]:
    """float64 bits of 1 / (1 - b1^t) and 1 / sqrt(1 - b2^t), the reciprocals of core.rules'
    bias corrections (memoised: a step's tensors share a few counts)."""
    return f64_bits(1.0 / (1.0 - b1**t)), f64_bits(1.0 / (1.0 - b2**t) ** 0.5)


def _wide(numel: int) -> bool:
    """int64 offsets when a tensor's last tile could pass int32."""
    return numel + BLOCK >= 1 << 31


def wide_offsets(numel: int) -> bool:
    """Whether a launch over tensors of up to ``numel`` elements needs int64 offsets (its
    ``WIDE``; a step plan decides it once)."""
    return _wide(numel)


def _exact(device: torch.device) -> bool:
    """``_clipped``'s ``mul.rn`` (CUDA); the interpreter's numpy product is already unfused."""
    return device.type == "cuda"


def _on(device: torch.device):
    """The launch's device context (Triton launches on the current CUDA device)."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ launches
# The callers (``elementwise``) walk their tensors once, checking them and collecting each one's
# table row (data pointers, size, step) as plain ints; ``ptr_or`` is the bitwise OR of every data
# pointer in the call (its low 4 bits are 0 when all are 16-byte aligned).


def free_apply(device, rows: list[int], numels: tuple[int, ...], ptr_or: int, gdtype,
               alpha: float, rule: str, keep: float) -> None:  # fmt: skip
    """One launch: p <- p keep - alpha F(g); ``rows`` = [p ptr, g ptr, numel] per tensor
    (float32 contiguous params, contiguous grads of dtype ``gdtype``)."""
    launch_free(device, tile_map(numels, device), upload(rows, device), ptr_or & 15 == 0,
                _wide(max(numels)), gdtype, alpha, rule, keep)  # fmt: skip


def launch_free(device, tiles: tuple[Tensor, Tensor, int], table: Tensor, aligned: bool,
                wide: bool, gdtype, alpha: float, rule: str, keep: float,
                clip: Tensor | None = None) -> None:  # fmt: skip
    """``free_apply``'s launch on a table already on the device (``tiles``: its ``tile_map``;
    a step plan's tables live in a ``kernels.step_table.StepTable``). ``clip``: a pending
    clip's 0-d coefficient on ``device`` (``optim.clipping``), applied to g for ``sgd`` (the
    signs are scale-invariant: ignored for ``signsgd`` / ``none``)."""
    tile_tensor, first_tile, count = tiles
    scaled = clip is not None and rule == "sgd"
    with _on(device):
        _free_kernel[(count,)](
            tile_tensor, first_tile, table, -alpha, keep, 1.0, clip if scaled else table,
            FREE=FREE_RULE_CODES[rule], DECAY=keep != 1.0, G_DTYPE=_GDTYPES[gdtype],
            ALIGNED=aligned, WIDE=wide, BLOCK=BLOCK, CLIP=scaled, EXACT=_exact(device),
            num_warps=NUM_WARPS,
        )  # fmt: skip


def adamw_apply(device, rows: list[int], numels: tuple[int, ...], ptr_or: int, lr: float,
                betas: tuple[float, float], eps: float, keep: float) -> None:  # fmt: skip
    """One launch of AdamW; ``rows`` = [p, g, m, v ptrs, numel, *adam_corrections(t), 0] per
    tensor (all float32 contiguous)."""
    table = upload(rows, device)
    launch_adamw(device, tile_map(numels, device), table, table.view(torch.float64),
                 ptr_or & 15 == 0, _wide(max(numels)), lr, betas, eps, keep)  # fmt: skip


def launch_adamw(device, tiles: tuple[Tensor, Tensor, int], table: Tensor, coef: Tensor,
                 aligned: bool, wide: bool, lr: float, betas: tuple[float, float], eps: float,
                 keep: float, clip: Tensor | None = None) -> None:  # fmt: skip
    """``adamw_apply``'s launch on a table already on the device (``coef``: the same table
    viewed as float64; ``clip``: a pending clip's 0-d coefficient on ``device``, g <- c g)."""
    tile_tensor, first_tile, count = tiles
    with _on(device):
        _adamw_kernel[(count,)](
            tile_tensor, first_tile, table, coef, -lr, keep,
            **_adam_scalars(tuple(betas), eps), clip=table if clip is None else clip,
            DECAY=keep != 1.0, ALIGNED=aligned, WIDE=wide, BLOCK=BLOCK, CLIP=clip is not None,
            EXACT=_exact(device), num_warps=NUM_WARPS,
        )  # fmt: skip


def coordinate_apply(device, rows: list[int], count: int, ptr_or: int, gdtype,
                     shape: tuple[int, int], k: int, lr: float, scale: float, free_scale: float,
                     betas: tuple[float, float], eps: float, keep: float, free_rule: str,
                     axis_rows: bool) -> None:  # fmt: skip
    """One launch over ``count`` same-shape (M, N) matrices; ``rows`` = [w, g, m, v, positions
    ptrs, *adam_corrections(t), 0] per matrix (``ptr_or`` over w and g only)."""
    table = upload(rows, device)
    launch_coordinate(device, table, table.view(torch.float64), count, ptr_or & 15 == 0, gdtype,
                      shape, k, lr, scale, free_scale, betas, eps, keep, free_rule,
                      axis_rows)  # fmt: skip


def launch_coordinate(device, table: Tensor, coef: Tensor, count: int, aligned: bool, gdtype,
                      shape: tuple[int, int], k: int, lr: float, scale: float,
                      free_scale: float, betas: tuple[float, float], eps: float, keep: float,
                      free_rule: str, axis_rows: bool,
                      clip: Tensor | None = None) -> None:  # fmt: skip
    """``coordinate_apply``'s launch on a table already on the device (``coef``: the same
    table viewed as float64; ``aligned``: every w and g pointer 16-byte aligned; ``clip``: a
    pending clip's 0-d coefficient on ``device``, read by the AdamW part and an ``sgd`` rest)."""
    M, N = shape
    numel = M * N
    block = COORD_BLOCK
    wraps = (N + block - 2) // N
    grid = (triton.cdiv(numel, block), count)
    with _on(device):
        _coordinate_kernel[grid](
            table, coef, numel, N, k, -lr * scale, keep, free_scale,
            **_adam_scalars(tuple(betas), eps), clip=table if clip is None else clip,
            ROWS=axis_rows, WRAPS=wraps if wraps <= 8 else 0,
            FREE=FREE_RULE_CODES[free_rule], FREE_SCALED=free_scale != 1.0, DECAY=keep != 1.0,
            G_DTYPE=_GDTYPES[gdtype], ALIGNED=COORD_VECTOR and aligned,
            WIDE=_wide(numel), BLOCK=block, CLIP=clip is not None, EXACT=_exact(device),
            num_warps=COORD_WARPS,
        )  # fmt: skip


# Shared with ``kernels.projection_state`` (the projection step's fused AdamW state phase): the
# same AdamW arithmetic, scalars and launch device as the kernels above.
adamw_direction = _adamw_direction
adam_scalars = _adam_scalars
launch_device = _on
clipped = _clipped
exact_products = _exact
