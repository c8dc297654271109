"""The sign kernels (``kernels.sign_bits_triton``) compiled for sm_90 without a GPU
(``triton.compile`` to PTX): type errors the CPU interpreter does not see (e.g. a helper returning
different pointer types under a ``constexpr`` branch) fail here, and the full tiles' float32
stores must be 128-bit vectors. Runs where triton with its NVIDIA backend imports and the
interpreter is off (``PYTHONPATH=$PWD:/work/triton_site pytest tests/unit/...``, or on a GPU
machine); skipped otherwise."""

from __future__ import annotations

import pytest

from tests.triton_compile import ALIGNED, ptx_sm90, require_compiler  # noqa: E402

triton = require_compiler()

import triton.language as tl  # noqa: E402

from frugal_dist.kernels import sign_bits_triton as tk  # noqa: E402


def _ptx(fn, signature: dict, constexprs: dict, aligned: list[int], warps: int) -> str:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    return ptx_sm90(fn, sig, constexprs, {(i,): ALIGNED for i in aligned}, num_warps=warps)


def _votes(world: int, bits: int, wide: bool) -> dict:
    return {"WORLD": world, "LEVELS": tk._levels(world), "BITS": bits, "WIDE": wide}


@pytest.mark.parametrize(
    "world,bits,wide",
    [(2, 8, False), (2, 32, False), (5, 8, False), (5, 32, False), (33, 8, False),
     (33, 32, False), (4, 32, True)],  # True: int64 offsets (buffers near 2^31 entries)
)  # fmt: skip
def test_vote_kernels_compile(world, bits, wide):
    sig = {"g_ptr": "*u8", "out_ptr": "*fp32", "nunits": "i32", "nout": "i32", "stride": "i32"}
    consts = {**_votes(world, bits, wide), "BLOCK": tk.VOTE_BLOCK}
    ptx = _ptx(tk._vote_kernel, sig, consts, [0, 1], tk.VOTE_WARPS)
    assert "st.global.v4.b32" in ptx  # the float32 vote tile: 16-byte stores
    sig = {"g_ptr": "*u8", "out_ptr": "*u8", "nunits": "i32", "stride": "i32", "out_stride": "i32"}
    consts = {**_votes(world, bits, wide), "BLOCK": tk.VOTE_BITS_BLOCK}
    _ptx(tk._vote_bits_kernel, sig, consts, [0, 1], tk.VOTE_BITS_WARPS)
    sig = {"tile_tensor": "*i32", "first_tile": "*i32", "table": "*i64", "g_ptr": "*u8",
           "stride": "i32", "nalpha": "fp32", "keep": "fp32"}  # fmt: skip
    consts = {**_votes(world, bits, wide), "DECAY": True, "ALIGNED": True,
              "BLOCK": tk.VOTE_APPLY_BLOCK}  # fmt: skip
    ptx = _ptx(tk._vote_apply_kernel, sig, consts, [3], tk.VOTE_APPLY_WARPS)
    assert "st.global.v4.b32" in ptx  # p written back in 16-byte stores


def test_pack_kernel_compiles():
    sig = {"tile_tensor": "*i32", "first_tile": "*i32", "table": "*i64", "out_ptr": "*u8"}
    consts = {"X_DTYPE": tl.float32, "ALIGNED": True, "WIDE": False, "BLOCK": tk.PACK_BLOCK}
    ptx = _ptx(tk._pack_kernel, sig, consts, [3], tk.PACK_WARPS)
    assert "ld.global.v4" in ptx  # the float32 tile read in 16-byte loads
