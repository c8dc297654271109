"""Triton kernel behind ``frugal_dist.kernels.finite``: one launch tests many gradients of one
dtype for inf/nan (imported lazily, only on CUDA or under ``TRITON_INTERPRET=1``).

Every program reads one tile of ``FINITE_BLOCK`` elements of one tensor as raw integers (int32 for
float32, int16 for bfloat16 / float16; full tiles unmasked, 128-bit vector loads when every
pointer is 16-byte aligned) and tests the exponent bits: an element is inf or nan exactly when
they are all ones (float32 ``0x7f800000``, bfloat16 ``0x7f80``, float16 ``0x7c00``), with no
floating-point arithmetic a compiler could reorder. A tile that holds such an element stores 1
into the shared int32 flag (a plain store: every writer writes the same value; clean tiles write
nothing): after one block-wide max, or per element (``FINITE_REDUCE``). Bytes: each gradient
byte is read once (4 B per float32 element, 2 B per 16-bit one), plus 4 B per tile (its tensor)
and 20 B per tensor (data pointer, size, first tile); no other memory traffic.

The tile map (tile -> tensor, tensor -> first tile) depends only on the tensors' sizes and is
built once (``FiniteLaunch``); each call uploads only the data pointers, with the zeroed flag in
the same pinned, non-blocking host-to-device copy (``elementwise_triton.upload``): one copy and
one launch per dtype, no device sync.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from frugal_dist.kernels.elementwise_triton import launch_device, tile_map, upload

# Elements per program and warps per program (benchmarks/kernels_nonfinite.py sweeps them).
FINITE_BLOCK = 8192
FINITE_WARPS = 8
# How a tile reports: True -- one block-wide max, then one scalar store when it is bad; False --
# a store predicated on each element (no cross-warp reduction; clean tiles issue no store).
FINITE_REDUCE = True
# (integer dtype read, exponent mask) per gradient dtype
_BITS = {
    torch.float32: (tl.int32, 0x7F800000),
    torch.bfloat16: (tl.int16, 0x7F80),
    torch.float16: (tl.int16, 0x7C00),
}
DTYPES = tuple(_BITS)


@triton.jit
def _nonfinite_kernel(
    tile_tensor, first_tile, table, sizes, flag,
    INT: tl.constexpr, EXP: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
    REDUCE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``flag`` <- 1 if tensor ``table[t]`` (``sizes[t]`` elements) holds inf/nan in this tile."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = pid - tl.load(first_tile + t)
    n = tl.load(sizes + t)
    if WIDE:
        start = start.to(tl.int64)
    else:
        n = n.to(tl.int32)
    start = start * BLOCK
    ptr = tl.load(table + t).to(tl.pointer_type(INT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < n, other=0)
    bad = (x & EXP) == EXP
    if REDUCE:
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            tl.store(flag, 1)
    else:
        tl.store(flag + tl.zeros([BLOCK], dtype=tl.int32), tl.full([BLOCK], 1, tl.int32), mask=bad)


def finite_launch(numels: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """The ``FiniteLaunch`` of these sizes, memoised (steps that always take the full path --
    layouts, per-rank gradients -- rebuild their check every step: its tables are reused)."""
    return _finite_launch(numels, dtype, device, FINITE_BLOCK)


@functools.lru_cache(maxsize=32)
def _finite_launch(numels, dtype, device, block) -> FiniteLaunch:
    return FiniteLaunch(numels, dtype, device, block)


class FiniteLaunch:
    """The fixed part of one dtype's launch for tensors of sizes ``numels`` (all > 0) on
    ``device``: the tile map (``block`` elements per tile) and the sizes, uploaded once (no
    sync)."""

    def __init__(
        self, numels: tuple[int, ...], dtype: torch.dtype, device: torch.device, block: int
    ) -> None:
        self.tile_tensor, self.first_tile, self.tiles = tile_map(numels, device, block)
        self.sizes = upload(list(numels), device)
        self.block = block
        self.int_dtype, self.exp = _BITS[dtype]
        self.wide = max(numels) + block >= 1 << 31
        self.device = device

    def __call__(self, table: Tensor, flag: Tensor, aligned: bool) -> None:
        """Test the tensors whose data pointers are ``table`` (int64, one per tensor, in the
        order of ``numels``); a non-finite element sets int32 ``flag`` to 1."""
        with launch_device(self.device):
            _nonfinite_kernel[(self.tiles,)](
                self.tile_tensor, self.first_tile, table, self.sizes, flag,
                INT=self.int_dtype, EXP=self.exp, ALIGNED=aligned, WIDE=self.wide,
                REDUCE=FINITE_REDUCE, BLOCK=self.block, num_warps=FINITE_WARPS,
            )  # fmt: skip
