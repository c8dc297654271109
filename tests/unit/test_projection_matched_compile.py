"""The ``free_scale="matched"`` projection kernels compiled for sm_90 without a GPU
(``triton.compile`` to PTX, the bundled ptxas): the apply kernels with ``MATCHED`` (per-matrix
factor load, zero count, one integer atomic per tile) and the correction kernel
(``kernels.projection_matched._fix_kernel``: run-time loops over matrices and tiles). The CPU
interpreter (tests/unit/test_projection_matched.py) does not check that the compiled language
accepts them. Runs where triton with its NVIDIA backend imports and the interpreter is off
(``PYTHONPATH=$PWD:/work/triton_site pytest tests/unit/...``); skipped otherwise."""

from __future__ import annotations

import re

import pytest

from tests.triton_compile import ptx_sm90, require_compiler  # noqa: E402

triton = require_compiler()

import triton.language as tl  # noqa: E402

from frugal_dist.kernels import projection_apply_v2 as v2  # noqa: E402
from frugal_dist.kernels import projection_matched as pm  # noqa: E402
from frugal_dist.kernels import projection_triton as pt  # noqa: E402

FLOATS = {"decay", "c_u", "c_f", "tol"}
POINTERS = {"w_addrs": "*i64", "g_addrs": "*i64", "cnt_ptr": "*i32", "fs_ptr": "*fp32"}


def _ptx(fn, consts: dict, operand: str = "*bf16", warps: int = 4) -> str:
    """PTX of ``fn`` with ``consts``; other arguments: pointers (operands ``operand``), floats
    by name, the rest 32-bit ints."""
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name.endswith("_ptr") or name in ("a1", "a2", "b1", "b2"):
            sig[name] = operand
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return ptx_sm90(fn, sig, consts, num_warps=warps)


BF16 = dict(G_ELEM=tl.float32, PREC="tf32", OP=tl.bfloat16)
TILE = dict(BM=64, BN=64, BK=64, EVEN_K=True)


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_matched_apply_kernels_compile_with_one_atomic_add(left):
    consts = dict(r=512, RULE=0, MATCHED=True, **BF16, **TILE)
    plain = _ptx(pt._apply_kernel, dict(consts, LEFT=left))
    stacked = _ptx(pt._apply_stacked_kernel, dict(consts, LEFT=left))
    varied = _ptx(v2._apply_v2_kernel, dict(consts, SHARE_A=left, TMA=False, GROUP=8,
                                            EARLY=False, ALIGNED=True, SEQ=False))  # fmt: skip
    seq = _ptx(v2._apply_v2_kernel, dict(consts, SHARE_A=left, TMA=False, GROUP=1,
                                         EARLY=True, ALIGNED=True, SEQ=True))  # fmt: skip
    for ptx in (plain, stacked, varied, seq):
        assert len(re.findall(r"\batom\.global(?:\.[a-z0-9_]+)*\.add", ptx)) == 1
    off = _ptx(pt._apply_kernel, dict(consts, LEFT=left, MATCHED=False))
    assert "atom.global" not in off  # the fixed scale compiles without the count


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("operands", ["bf16", "tf32"])
def test_fix_kernel_compiles(left, operands):
    if operands == "bf16":
        consts, operand = dict(BF16, LEFT=left, r=512, **TILE), "*bf16"
    else:
        consts = dict(G_ELEM=tl.float32, PREC="tf32", OP=tl.float32, LEFT=left, r=20, BM=64,
                      BN=64, BK=32, EVEN_K=False)  # fmt: skip
        operand = "*fp32"
    ptx = _ptx(pm._fix_kernel, consts, operand)
    assert "st.global" in ptx
