"""Triton kernels behind ``frugal_dist.kernels.sign_bits`` and ``kernels.vote_apply`` (imported
lazily, only when a CUDA tensor -- or a test under ``TRITON_INTERPRET=1`` -- asks for them).

pack: one launch per input dtype over a list of tensors. A small int64 table on the device holds
one row [data pointer, numel, output byte offset] per run of tensors -- tensors adjacent in
memory whose bytes are adjacent in the output (every one but the last a multiple of 8 entries:
views of one flat gradient buffer) share one row, so they pack as one flat buffer -- and a tile
map (tile -> row, row -> first tile; cached per sizes) lets every program pack ``PACK_BLOCK``
bytes (8 x ``PACK_BLOCK`` elements) of one row: it loads a (PACK_BLOCK, 8) tile -- contiguous,
128-bit vectors for 16-byte aligned tensors -- tests x >= 0, shifts bit i by i and sums each
row into a byte. Masked (out-of-range) entries load as -1, so padding bits are 0 as in
``comm.bits``.

The vote kernels read the gathered (W, B) bytes in *units*: 32-bit words where every rank's row
can be read so (row start 4-byte aligned, row stride a multiple of 4, the last word inside the
buffer's storage: ``word_units``), else bytes. Bit k of a little-endian word is bit k % 8 of its
byte k // 8, so unit u holds entries ``BITS u + k`` in both cases. Per unit, the W ranks' units
are added as bit-sliced counters (c_j = bit j of the per-entry count of ones, a ripple carry
over <= 5 levels: 31 ranks, unrolled) and compared with the constant W // 2 from the top bit
down, all bitwise on whole units:

    pos = [ones > W / 2]  (F = +1),   tie = [ones = W / 2]  (F = 0; only for even W)

so a unit of 32 entries costs ~ 4 W + 10 integer operations, and F = 2 pos + tie - 1. With more
than 31 ranks, groups of 31 are counted so and summed per entry in int32 (rarely: the read
W / 8 B per entry dominates there).

* ``_vote_bits_kernel``: reads W units, writes pos (and tie for even W) units -- the packed vote:
  (W + 1 or 2) / 8 B per entry, no unpacked output.
* ``_vote_kernel``: reads W units, writes F as a (BLOCK, BITS) float32 tile: W / 8 + 4 B.
* ``_vote_apply_kernel``: one launch over many float32 parameters (a table row per parameter
  [data pointer, numel, unit offset of its bits in a gathered row] and a tile map over its units);
  F as above, then its (BLOCK, BITS) tile of the parameter in place:
  p <- p keep + nalpha F. Reads W / 8 + 4 B, writes 4 B per entry.

Offsets are int32 unless a buffer nears 2^31 elements (``WIDE``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from frugal_dist.kernels.elementwise_triton import tile_map, upload

# Bytes (pack) or units (votes) per program and warps (benchmarks/kernels_sign.py sweeps them).
PACK_BLOCK = 512
PACK_WARPS = 8
VOTE_BLOCK = 256
VOTE_WARPS = 8
VOTE_BITS_BLOCK = 1024
VOTE_BITS_WARPS = 4
VOTE_APPLY_BLOCK = 128
VOTE_APPLY_WARPS = 8
GROUP = 31  # ranks counted bit-sliced at once (5 levels); more are summed per entry
_GDTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_ESIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@triton.jit
def _pack_kernel(
    tile_tensor, first_tile, table, out_ptr,
    X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Bytes [start, start + BLOCK) of one row; table rows [x ptr, numel, out offset]."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = pid - tl.load(first_tile + t)
    if WIDE:
        start = start.to(tl.int64)
    start = start * BLOCK
    x_ptr = tl.load(table + 3 * t).to(tl.pointer_type(X_DTYPE))
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
    n = tl.load(table + 3 * t + 1)
    if not WIDE:
        n = n.to(tl.int32)
    o_ptr = out_ptr + tl.load(table + 3 * t + 2)
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, 8)
    idx = rows[:, None] * 8 + cols[None, :]
    if (start + BLOCK) * 8 <= n:
        x = tl.load(x_ptr + idx)
        bits = (x >= 0).to(tl.int32) << cols[None, :]
        tl.store(o_ptr + rows, tl.sum(bits, axis=1).to(tl.uint8))
    else:
        x = tl.load(x_ptr + idx, mask=idx < n, other=-1.0)
        bits = (x >= 0).to(tl.int32) << cols[None, :]
        tl.store(o_ptr + rows, tl.sum(bits, axis=1).to(tl.uint8), mask=rows < (n + 7) // 8)


# ------------------------------------------------------------------------------ the majority
@triton.jit
def _rank_units(g_ptr, stride, rank, units, nunits, full, live, GUARD: tl.constexpr):
    """Units ``units`` of row ``rank``: 0 past ``nunits`` and (``GUARD``) for ranks past
    ``live``; unmasked where ``full``."""
    ptrs = g_ptr + rank * stride + units
    if GUARD:
        x = tl.load(ptrs, mask=(units < nunits) & (rank < live), other=0)
    else:
        if full:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=units < nunits, other=0)
    return x


@triton.jit
def _ripple(c, carry):
    """One level of the bit-sliced counter: (new bit, carry to the next level)."""
    return c ^ carry, c & carry


@triton.jit
def _count(g_ptr, stride, r0, units, nunits, full, live,
           COUNT: tl.constexpr, LEVELS: tl.constexpr, GUARD: tl.constexpr):  # fmt: skip
    """Bit-sliced counts c0..c4 (bit j of the number of set bits, per entry) of rows
    r0 .. r0 + COUNT - 1 (with ``GUARD``, rows from ``live`` on count 0)."""
    c0 = _rank_units(g_ptr, stride, r0, units, nunits, full, live, GUARD)
    c1 = tl.zeros_like(c0)
    c2 = c1
    c3 = c1
    c4 = c1
    for i in tl.static_range(1, COUNT):
        x = _rank_units(g_ptr, stride, r0 + i, units, nunits, full, live, GUARD)
        c0, carry = _ripple(c0, x)
        if LEVELS > 1:
            c1, carry = _ripple(c1, carry)
        if LEVELS > 2:
            c2, carry = _ripple(c2, carry)
        if LEVELS > 3:
            c3, carry = _ripple(c3, carry)
        if LEVELS > 4:
            c4, carry = _ripple(c4, carry)
    return c0, c1, c2, c3, c4


@triton.jit
def _compare(c, gt, eq, ALL: tl.constexpr, KBIT: tl.constexpr):
    """One bit of count-vs-constant from the top: (count > K so far, count == K so far);
    ``ALL``: the unit with every bit set."""
    if KBIT:
        eq = eq & c
    else:
        gt = gt | (eq & c)
        eq = eq & (c ^ ALL)
    return gt, eq


@triton.jit
def _expand(u, cols):
    """(BLOCK, BITS) int32 bits of the units ``u``."""
    return (u.to(tl.int32)[:, None] >> cols[None, :]) & 1


@triton.jit
def _vote_units(g_ptr, stride, units, nunits, full,
                WORLD: tl.constexpr, LEVELS: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """(pos, tie) units of the majority of the WORLD rows: bit set iff F = +1 / F = 0."""
    if WORLD <= 31:
        c0, c1, c2, c3, c4 = _count(
            g_ptr, stride, 0, units, nunits, full, WORLD, WORLD, LEVELS, False
        )
        gt = tl.zeros_like(c0)
        ALL: tl.constexpr = -1 if BITS == 32 else 255
        eq = gt | ALL
        if LEVELS > 4:
            gt, eq = _compare(c4, gt, eq, ALL, ((WORLD // 2) >> 4) & 1)
        if LEVELS > 3:
            gt, eq = _compare(c3, gt, eq, ALL, ((WORLD // 2) >> 3) & 1)
        if LEVELS > 2:
            gt, eq = _compare(c2, gt, eq, ALL, ((WORLD // 2) >> 2) & 1)
        if LEVELS > 1:
            gt, eq = _compare(c1, gt, eq, ALL, ((WORLD // 2) >> 1) & 1)
        pos, tie = _compare(c0, gt, eq, ALL, (WORLD // 2) & 1)
    else:  # many voters: groups of 31 counted bit-sliced, summed per entry
        cols = tl.arange(0, BITS)
        ones = tl.zeros((units.shape[0], BITS), dtype=tl.int32)
        for r0 in range(0, WORLD, 31):
            c0, c1, c2, c3, c4 = _count(g_ptr, stride, r0, units, nunits, full, WORLD, 31, 5, True)
            ones += _expand(c0, cols) + 2 * _expand(c1, cols) + 4 * _expand(c2, cols)
            ones += 8 * _expand(c3, cols) + 16 * _expand(c4, cols)
        d = 2 * ones - WORLD
        pos = tl.sum((d > 0).to(tl.int32) << cols[None, :], axis=1)
        tie = tl.sum((d == 0).to(tl.int32) << cols[None, :], axis=1)
    return pos, tie


@triton.jit
def _signs(pos, tie, cols, EVEN: tl.constexpr):
    """(BLOCK, BITS) float32 F of the (pos, tie) units, built as bits: bit k of the unit moved
    to the sign bit, 1.0's exponent or-ed in (+1.0 / -1.0), cleared on a tie (+0.0) -- three
    integer operations per entry (six with ties), no int-to-float conversion."""
    up = 31 - cols[None, :]
    neg = ((pos.to(tl.int32) ^ -1)[:, None] << up) & -2147483648  # the sign bit: F = -1
    f = neg | 0x3F800000
    if EVEN:
        f = f & (((tie.to(tl.int32)[:, None] << up) >> 31) ^ -1)  # all ones unless a tie
    return f.to(tl.float32, bitcast=True)


@triton.jit
def _unit_ptr(ptr, BITS: tl.constexpr):
    if BITS == 32:
        ptr = ptr.to(tl.pointer_type(tl.int32))
    return ptr


@triton.jit
def _vote_bits_kernel(
    g_ptr, out_ptr, nunits, stride, out_stride,
    WORLD: tl.constexpr, LEVELS: tl.constexpr, BITS: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[0, u] = pos, out[1, u] = tie (even WORLD) of units [start, start + BLOCK)."""
    start = tl.program_id(0)
    if WIDE:
        start = start.to(tl.int64)
        stride = stride.to(tl.int64)
    start = start * BLOCK
    g = _unit_ptr(g_ptr, BITS)
    o = _unit_ptr(out_ptr, BITS)
    units = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= nunits
    pos, tie = _vote_units(g, stride, units, nunits, full, WORLD, LEVELS, BITS)
    if full:
        tl.store(o + units, pos)
        if WORLD % 2 == 0:
            tl.store(o + out_stride + units, tie)
    else:
        tl.store(o + units, pos, mask=units < nunits)
        if WORLD % 2 == 0:
            tl.store(o + out_stride + units, tie, mask=units < nunits)


@triton.jit
def _vote_kernel(
    g_ptr, out_ptr, nunits, nout, stride,
    WORLD: tl.constexpr, LEVELS: tl.constexpr, BITS: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[BITS u + k] = F of entry k of unit u, for this program's units (``nout`` entries)."""
    start = tl.program_id(0)
    if WIDE:
        start = start.to(tl.int64)
        stride = stride.to(tl.int64)
    start = start * BLOCK
    g = _unit_ptr(g_ptr, BITS)
    units = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BITS)
    full = (start + BLOCK) * BITS <= nout
    pos, tie = _vote_units(g, stride, units, nunits, full, WORLD, LEVELS, BITS)
    s = _signs(pos, tie, cols, WORLD % 2 == 0)
    idx = units[:, None] * BITS + cols[None, :]
    if full:
        tl.store(out_ptr + idx, s)
    else:
        tl.store(out_ptr + idx, s, mask=idx < nout)


@triton.jit
def _vote_apply_kernel(
    tile_tensor, first_tile, table, g_ptr, stride, nalpha, keep,
    WORLD: tl.constexpr, LEVELS: tl.constexpr, BITS: tl.constexpr, DECAY: tl.constexpr,
    ALIGNED: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Units [start, start + BLOCK) of one parameter's bits; table rows [p ptr, numel, unit
    offset]: p[BITS u + k] <- p keep + nalpha F."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = pid - tl.load(first_tile + t)
    if WIDE:
        start = start.to(tl.int64)
        stride = stride.to(tl.int64)
    start = start * BLOCK
    p_ptr = tl.load(table + 3 * t).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
    n = tl.load(table + 3 * t + 1)
    if not WIDE:
        n = n.to(tl.int32)
    g = _unit_ptr(g_ptr, BITS) + tl.load(table + 3 * t + 2)
    nunits = (n + BITS - 1) // BITS
    units = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BITS)
    idx = units[:, None] * BITS + cols[None, :]
    full = (start + BLOCK) * BITS <= n
    pos, tie = _vote_units(g, stride, units, nunits, full, WORLD, LEVELS, BITS)
    s = _signs(pos, tie, cols, WORLD % 2 == 0)
    if full:
        p = tl.load(p_ptr + idx)
    else:
        p = tl.load(p_ptr + idx, mask=idx < n, other=0.0)
    if DECAY:
        p = p * keep
    p = p + nalpha * s
    if full:
        tl.store(p_ptr + idx, p)
    else:
        tl.store(p_ptr + idx, p, mask=idx < n)


# ------------------------------------------------------------------------------------- host
def _wide(elements: int, block_elements: int) -> bool:
    return elements + block_elements >= 1 << 31


def _levels(world: int) -> int:
    return min(world, GROUP).bit_length()


def _launch_device(device: torch.device):
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    import contextlib

    return contextlib.nullcontext()


def word_units(gathered: Tensor) -> bool:
    """Whether the (W, B) uint8 ``gathered`` (rows of unit stride) can be read as 32-bit words:
    4-byte aligned rows whose last word (B rounded up to 4) lies inside the storage."""
    world, nbytes = gathered.shape
    stride = gathered.stride(0) if world > 1 else 4
    ptr = gathered.data_ptr()
    storage = gathered.untyped_storage()
    end = storage.data_ptr() + storage.nbytes()
    span = (world - 1) * stride + 4 * ((nbytes + 3) // 4)
    return ptr % 4 == 0 and stride % 4 == 0 and ptr + span <= end


def pack(
    tensors: list[Tensor], numels: list[int], offsets: list[int], out: Tensor, dtypes: tuple
) -> list[int]:
    """Pack every contiguous tensor of a dtype in ``dtypes`` into ``out`` at its byte offset
    (one launch per dtype; runs of memory-adjacent tensors as one row); returns the indices of
    the tensors left to the caller's torch path (other dtypes, non-contiguous). Host work: four
    attribute reads per tensor, then plain integers."""
    kinds = [t.dtype for t in tensors]
    contiguous = [t.is_contiguous() for t in tensors]
    ptrs = [t.data_ptr() for t in tensors]
    groups: dict[torch.dtype, list[list[int]]] = {}
    rest: list[int] = []
    last: list[int] | None = None  # the row the previous tensor went to
    last_kind = None
    for i, n in enumerate(numels):
        if n == 0:
            continue
        kind = kinds[i]
        if kind not in dtypes or not contiguous[i]:
            rest.append(i)
            last = None
            continue
        ptr, off = ptrs[i], offsets[i]
        if (
            last is not None and kind == last_kind and last[1] % 8 == 0
            and last[0] + last[1] * _ESIZE[kind] == ptr and last[2] + last[1] // 8 == off
        ):  # fmt: skip
            last[1] += n
        else:
            last, last_kind = [ptr, n, off], kind
            groups.setdefault(kind, []).append(last)
    device = out.device
    for dtype, rows in groups.items():
        nbytes = tuple((n + 7) // 8 for _, n, _ in rows)
        aligned = all(ptr % 16 == 0 for ptr, _, _ in rows)
        tile_tensor, first_tile, tiles = tile_map(nbytes, device, PACK_BLOCK)
        with _launch_device(device):
            _pack_kernel[(tiles,)](
                tile_tensor, first_tile, upload([v for r in rows for v in r], device), out,
                X_DTYPE=_GDTYPES[dtype], ALIGNED=aligned,
                WIDE=_wide(8 * max(nbytes), 8 * PACK_BLOCK), BLOCK=PACK_BLOCK,
                num_warps=PACK_WARPS,
            )  # fmt: skip
    return rest


def _units(gathered: Tensor) -> tuple[int, int]:
    """(BITS, row stride in units) of the vote kernels' reads of ``gathered``."""
    if word_units(gathered):
        return 32, gathered.stride(0) // 4 if gathered.shape[0] > 1 else 0
    return 8, gathered.stride(0) if gathered.shape[0] > 1 else 0


def vote_bits(gathered: Tensor, out: Tensor) -> None:
    """``out`` ((1 or 2, B) uint8, contiguous) <- the packed majority of the (W, B) uint8
    ``gathered``: row 0 = [F = +1], row 1 (even W) = [F = 0]."""
    world, nbytes = gathered.shape
    bits, stride = _units(gathered)
    if nbytes % 4:  # whole output words only
        bits, stride = 8, gathered.stride(0) if world > 1 else 0
    nunits = nbytes * 8 // bits
    # beyond GROUP ranks the count is an int32 (block, bits) tile: keep it in registers
    block = VOTE_BITS_BLOCK if world <= GROUP else min(VOTE_BITS_BLOCK, 128)
    with _launch_device(gathered.device):
        _vote_bits_kernel[(triton.cdiv(nunits, block),)](
            gathered, out, nunits, stride, nunits, WORLD=world, LEVELS=_levels(world), BITS=bits,
            WIDE=_wide(max(nunits, world * stride), block), BLOCK=block,
            num_warps=VOTE_BITS_WARPS,
        )  # fmt: skip


def vote(gathered: Tensor, out: Tensor) -> None:
    """``out`` (8 B float32) <- the majority of the (W, B) uint8 ``gathered`` (rows of unit
    stride: a column slice of a wider gathered buffer is read in place)."""
    world, nbytes = gathered.shape
    bits, stride = _units(gathered)
    nunits = -(-8 * nbytes // bits)
    block = VOTE_BLOCK
    with _launch_device(gathered.device):
        _vote_kernel[(triton.cdiv(nunits, block),)](
            gathered, out, nunits, 8 * nbytes, stride, WORLD=world, LEVELS=_levels(world),
            BITS=bits, WIDE=_wide(max(8 * nbytes, world * stride), bits * block), BLOCK=block,
            num_warps=VOTE_WARPS,
        )  # fmt: skip


def vote_apply(
    params: list[Tensor], offsets: list[int], gathered: Tensor, alpha: float, keep: float
) -> None:
    """p <- p keep - alpha vote for every (float32 contiguous, non-empty) ``params[i]`` whose
    bits start at byte ``offsets[i]`` of each row of ``gathered`` ((W, B) uint8, rows of unit
    stride): one launch for the params whose bits start on a word (``word_units`` buffers), one
    for the rest."""
    words = word_units(gathered)
    by_bits: dict[int, list[tuple[Tensor, int]]] = {}
    for p, o in zip(params, offsets):
        bits = 32 if words and o % 4 == 0 else 8
        by_bits.setdefault(bits, []).append((p, o * 8 // bits))
    world = gathered.shape[0]
    device = gathered.device
    block = VOTE_APPLY_BLOCK
    for bits, pairs in by_bits.items():
        stride = gathered.stride(0) * 8 // bits if world > 1 else 0
        rows = [v for p, u in pairs for v in (p.data_ptr(), p.numel(), u)]
        nunits = tuple(-(-p.numel() // bits) for p, _ in pairs)
        tile_tensor, first_tile, tiles = tile_map(nunits, device, block)
        with _launch_device(device):
            _vote_apply_kernel[(tiles,)](
                tile_tensor, first_tile, upload(rows, device), gathered, stride, -alpha, keep,
                WORLD=world, LEVELS=_levels(world), BITS=bits, DECAY=keep != 1.0,
                ALIGNED=all(p.data_ptr() % 16 == 0 for p, _ in pairs),
                WIDE=_wide(max(bits * max(nunits), world * stride), bits * block), BLOCK=block,
                num_warps=VOTE_APPLY_WARPS,
            )  # fmt: skip
