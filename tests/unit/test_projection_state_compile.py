"""The fused projection state kernel (``kernels.projection_state._adamw_state_kernel``) compiled
for sm_90 without a GPU (``triton.compile`` to PTX, the bundled ptxas), as Triton's launcher
specialises it at LLaMA-1B's (2048, 512) compact shape (16-byte tensor pointers, ints that are
multiples of 16, unit strides as constants): with ``ALIGNED`` the moments reached through the
address table move in 16-byte vectors like X and U; without it (today's path for unaligned
moments) they are scalar 4-byte accesses. Runs where triton with its NVIDIA backend imports and
the interpreter is off (``PYTHONPATH=$PWD:/work/triton_site pytest tests/unit/...``, or on a GPU
machine); skipped otherwise."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.triton_compile import ALIGNED, ptx_sm90, require_compiler  # noqa: E402

triton = require_compiler()

import triton.language as tl  # noqa: E402

from frugal_dist.kernels import projection_state as ps  # noqa: E402

ARGS = ("m_addrs", "v_addrs", "coef", "x_ptr", "u_ptr", "xo_ptr", "A", "C", "s_xb", "s_xa",
        "s_xc", "s_ub", "s_ua", "s_uc", "s_ob", "s_oa", "s_oc", "ibc1_all", "ibc2s_all", "w1",
        "one_minus_w1", "b2", "w2", "eps", "clip")  # fmt: skip


def _global_accesses(left: bool, bf16: bool, clip: bool, aligned: bool) -> Counter:
    """Counts of each ``ld.global`` / ``st.global`` form in the kernel's PTX for a (B, 2048, 512)
    batch, X and U stored (B, A, C) or, ``left``, (B, C, A); ``bf16``: U and X's copy bfloat16."""
    A, C = 2048, 512
    strides = (A * C, 1, A) if left else (A * C, C, 1)
    ints = dict(zip(("A", "C", "s_xb", "s_xa", "s_xc"), (A, C, *strides)))
    ints.update({f"s_{t}{d}": ints[f"s_x{d}"] for t in "uo" for d in "bac"})
    u = "*bf16" if bf16 else "*fp32"
    ptrs = dict(m_addrs="*i64", v_addrs="*i64", coef="*fp32", x_ptr="*fp32", u_ptr=u, xo_ptr=u,
                clip="*fp32")  # fmt: skip
    u_elem = tl.bfloat16 if bf16 else tl.float32
    consts = dict(PER_ITEM=False, LERP_HIGH=False, U_ELEM=u_elem, COPY_X=bf16, XO_ELEM=u_elem,
                  BA=ps.TILE_A, BC=ps.TILE_C, CLIP=clip, EXACT=True, ALIGNED=aligned)  # fmt: skip
    sig, attrs = {}, {}
    for i, name in enumerate(ARGS):
        if name in ptrs:
            sig[name], attrs[(i,)] = ptrs[name], ALIGNED
        elif ints.get(name) == 1:
            sig[name], consts[name] = "constexpr", 1
        elif name in ints:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = ALIGNED
        else:
            sig[name] = "fp32"
    sig.update({k: "constexpr" for k in consts if k not in sig})
    ptx = ptx_sm90(ps._adamw_state_kernel, sig, consts, attrs, num_warps=ps.NUM_WARPS)
    return Counter(re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx))


@pytest.mark.parametrize("left,bf16,clip", [(False, False, False), (True, True, True)],
                         ids=["right-fp32", "left-bf16-clip"])  # fmt: skip
def test_aligned_moments_compile_to_16_byte_vectors(left, bf16, clip):
    plain = _global_accesses(left, bf16, clip, aligned=False)
    hinted = _global_accesses(left, bf16, clip, aligned=True)
    # per thread: 8 entries = 2 vectors each of X, m, v read and m, v, U (+ X's bf16 copy with
    # a bf16 U: 16 bytes each) written; the 2 b64 loads are the table's m and v addresses
    vectors = 6
    assert hinted == Counter(
        {
            "ld.global.v4.b32": vectors,
            "st.global.v4.b32": vectors,
            "ld.global.b64": 2,
            **({"ld.global.b32": 1} if clip else {}),
        }
    )
    # today's path: m and v element by element (8 + 8 scalar loads and stores)
    assert plain["ld.global.b32"] == 16 + clip and plain["st.global.b32"] == 16
    assert plain["ld.global.v4.b32"] == plain["st.global.v4.b32"] == 2
