"""Triton kernels behind ``frugal_dist.kernels.sign_bits`` (imported lazily, only when a CUDA
tensor -- or a test under ``TRITON_INTERPRET=1`` -- asks for the Triton path).

pack: one launch per input dtype over a list of tensors. A small int64 table on the device holds
each tensor's [data pointer, numel, output byte offset]; a tile map (tile -> tensor, tensor ->
first tile; cached per sizes) lets every program pack ``PACK_BLOCK`` bytes (8 x ``PACK_BLOCK``
elements) of one tensor: it loads a (PACK_BLOCK, 8) tile -- contiguous, 128-bit vectors for
16-byte aligned tensors -- tests x >= 0, shifts bit i by i and sums each row into a byte.
Masked (out-of-range) entries load as -1, so padding bits are 0 as in ``comm.bits``.

vote: one launch over the (W, B) gathered bytes; every program reads ``VOTE_BLOCK`` bytes of each
of the W ranks (unrolled up to 16 ranks, a loop beyond), counts the set bits per position in
int32 registers and writes sign(2 ones - W) as a (VOTE_BLOCK, 8) float32 tile. Nothing per element
leaves the registers but the result.

vote_apply: one launch over many float32 parameters (``kernels.vote_apply``): a table row per
parameter [data pointer, numel, byte offset of its bits in a gathered row] and a tile map over
its bytes (``VOTE_APPLY_BLOCK`` bytes = 8 x that many elements per program). A program counts
the W ranks' bits of its bytes as the vote kernel does, then updates its (BLOCK, 8) tile of the
parameter in place: p <- p keep + nalpha sign(2 ones - W). Reads W/8 + 4 B, writes 4 B per
element; the vote never leaves the registers.

Offsets are int32 unless a buffer nears 2^31 elements (``WIDE``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from frugal_dist.kernels.elementwise_triton import tile_map, upload

# Bytes per program and warps (benchmarks/kernels_sign.py sweeps them).
PACK_BLOCK = 512
PACK_WARPS = 8
VOTE_BLOCK = 512
VOTE_WARPS = 8
VOTE_APPLY_BLOCK = 512
VOTE_APPLY_WARPS = 8
_GDTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _pack_kernel(
    tile_tensor, first_tile, table, out_ptr,
    X_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Bytes [start, start + BLOCK) of one tensor; table rows [x ptr, numel, out offset]."""
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


@triton.jit
def _bits(row_ptr, rows, cols, nbytes, full):
    """(BLOCK, 8) int32 bits of bytes ``rows`` of one rank's packed row."""
    if full:
        b = tl.load(row_ptr + rows)
    else:
        b = tl.load(row_ptr + rows, mask=rows < nbytes, other=0)
    return (b.to(tl.int32)[:, None] >> cols[None, :]) & 1


@triton.jit
def _vote_kernel(
    g_ptr, out_ptr, nbytes, row_stride,
    WORLD: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[8 j + i] = sign(2 * sum_r bit_i(g[r, j]) - WORLD) for j in this program's bytes."""
    start = tl.program_id(0)
    if WIDE:
        start = start.to(tl.int64)
        nbytes = nbytes.to(tl.int64)
        row_stride = row_stride.to(tl.int64)
    start = start * BLOCK
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, 8)
    full = start + BLOCK <= nbytes
    ones = tl.zeros((BLOCK, 8), dtype=tl.int32)
    if WORLD <= 16:  # unrolled: all W loads in flight at once
        for r in tl.static_range(WORLD):
            ones += _bits(g_ptr + r * row_stride, rows, cols, nbytes, full)
    else:  # many voters: a loop (compile time and registers stay bounded)
        for r in range(WORLD):
            ones += _bits(g_ptr + r * row_stride, rows, cols, nbytes, full)
    d = 2 * ones - WORLD
    s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    idx = rows[:, None] * 8 + cols[None, :]
    if full:
        tl.store(out_ptr + idx, s)
    else:
        tl.store(out_ptr + idx, s, mask=idx < nbytes * 8)


@triton.jit
def _vote_apply_kernel(
    tile_tensor, first_tile, table, g_ptr, row_stride, nalpha, keep,
    WORLD: tl.constexpr, DECAY: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Bytes [start, start + BLOCK) of one parameter's bits; table rows [p ptr, numel, byte
    offset]: p[8 j + i] <- p keep + nalpha sign(2 sum_r bit_i(g[r, off + j]) - WORLD)."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = pid - tl.load(first_tile + t)
    if WIDE:
        start = start.to(tl.int64)
        row_stride = row_stride.to(tl.int64)
    start = start * BLOCK
    p_ptr = tl.load(table + 3 * t).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
    n = tl.load(table + 3 * t + 1)
    if not WIDE:
        n = n.to(tl.int32)
    bytes_ptr = g_ptr + tl.load(table + 3 * t + 2)
    nbytes = (n + 7) // 8
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, 8)
    idx = rows[:, None] * 8 + cols[None, :]
    full = (start + BLOCK) * 8 <= n
    ones = tl.zeros((BLOCK, 8), dtype=tl.int32)
    if WORLD <= 16:
        for r in tl.static_range(WORLD):
            ones += _bits(bytes_ptr + r * row_stride, rows, cols, nbytes, full)
    else:
        for r in range(WORLD):
            ones += _bits(bytes_ptr + r * row_stride, rows, cols, nbytes, full)
    d = 2 * ones - WORLD
    s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
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


def _wide(elements: int, block_elements: int) -> bool:
    return elements + block_elements >= 1 << 31


def _launch_device(device: torch.device):
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    import contextlib

    return contextlib.nullcontext()


def pack(tensors: list[Tensor], offsets: list[int], out: Tensor, dtypes: tuple) -> list[int]:
    """Pack every contiguous tensor of a dtype in ``dtypes`` into ``out`` at its byte offset
    (one launch per dtype); returns the indices of the tensors left to the caller's torch path
    (other dtypes, non-contiguous)."""
    groups: dict[torch.dtype, tuple[list[int], list[int], list[int]]] = {}
    rest: list[int] = []
    for i, t in enumerate(tensors):
        n = t.numel()
        if n == 0:
            continue
        if t.dtype not in dtypes or not t.is_contiguous():
            rest.append(i)
            continue
        rows, nbytes, ptr_or = groups.setdefault(t.dtype, ([], [], [0]))
        ptr = t.data_ptr()
        rows += (ptr, n, offsets[i])
        nbytes.append((n + 7) // 8)
        ptr_or[0] |= ptr
    device = out.device
    for dtype, (rows, nbytes, ptr_or) in groups.items():
        tile_tensor, first_tile, tiles = tile_map(tuple(nbytes), device, PACK_BLOCK)
        with _launch_device(device):
            _pack_kernel[(tiles,)](
                tile_tensor, first_tile, upload(rows, device), out,
                X_DTYPE=_GDTYPES[dtype], ALIGNED=ptr_or[0] & 15 == 0,
                WIDE=_wide(8 * max(nbytes), 8 * PACK_BLOCK), BLOCK=PACK_BLOCK,
                num_warps=PACK_WARPS,
            )  # fmt: skip
    return rest


def vote(gathered: Tensor, out: Tensor) -> None:
    """``out`` (8 B float32) <- the majority of the (W, B) uint8 ``gathered`` (rows of unit
    stride: a column slice of a wider gathered buffer is read in place)."""
    world, nbytes = gathered.shape
    stride = gathered.stride(0)
    grid = (triton.cdiv(nbytes, VOTE_BLOCK),)
    with _launch_device(gathered.device):
        _vote_kernel[grid](
            gathered, out, nbytes, stride, WORLD=world,
            WIDE=_wide(max(8 * nbytes, world * stride), 8 * VOTE_BLOCK), BLOCK=VOTE_BLOCK,
            num_warps=VOTE_WARPS,
        )  # fmt: skip


def vote_apply(
    params: list[Tensor], offsets: list[int], gathered: Tensor, alpha: float, keep: float
) -> None:
    """One launch: p <- p keep - alpha vote for every (float32 contiguous, non-empty) ``params[i]``
    whose bits start at byte ``offsets[i]`` of each row of ``gathered`` ((W, B) uint8, rows of
    unit stride)."""
    world = gathered.shape[0]
    stride = gathered.stride(0)
    rows: list[int] = []
    nbytes: list[int] = []
    ptr_or = 0
    for p, o in zip(params, offsets):
        ptr = p.data_ptr()
        rows += (ptr, p.numel(), o)
        nbytes.append((p.numel() + 7) // 8)
        ptr_or |= ptr
    device = gathered.device
    tile_tensor, first_tile, tiles = tile_map(tuple(nbytes), device, VOTE_APPLY_BLOCK)
    span = 8 * max(nbytes) + 8 * VOTE_APPLY_BLOCK
    with _launch_device(device):
        _vote_apply_kernel[(tiles,)](
            tile_tensor, first_tile, upload(rows, device), gathered, stride, -alpha, keep,
            WORLD=world, DECAY=keep != 1.0, ALIGNED=ptr_or & 15 == 0,
            WIDE=span >= 1 << 31 or world * stride >= 1 << 31, BLOCK=VOTE_APPLY_BLOCK,
            num_warps=VOTE_APPLY_WARPS,
        )  # fmt: skip
