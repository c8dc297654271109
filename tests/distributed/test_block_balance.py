"""Block subspace under ZeRO-2 (gloo, 2 CPU ranks): ZeRO-1/2 give each rank a contiguous range of
the flattened parameters, so ``descending`` (the paper's order: the last layers first) puts every
active block's AdamW state on the rank that owns the end of the model, while ``strided`` spreads
the active blocks over the model and so over the ranks. Both still match the single process."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from tests.distributed import ds_workers as dw  # noqa: E402
from tests.distributed.launch import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed

COMMON = dict(lr=1e-2, density=0.4, update_gap=4, weight_decay=0.01, subspace="block")
KINDS = {"descending": dict(block_order="descending"), "strided": dict(block_order="strided")}
STEPS = 4  # the first window only (its state is what each rank holds at the end)


def test_strided_block_order_spreads_state_over_zero2_ranks():
    got = run_distributed(dw.run, 2, 2, False, STEPS, KINDS, COMMON)
    for name, kw in KINDS.items():
        ref = dw.single(STEPS, 2, {**COMMON, **kw})
        for r in range(2):
            diff = max((got[r][name]["params"][n] - ref[n]).abs().max().item() for n in ref)
            assert diff < 1e-6, (name, r, diff)
    desc = [g["descending"]["state_bytes"] for g in got]
    strided = [g["strided"]["state_bytes"] for g in got]
    # The probe's 5 matrices (96-100 entries each), 2 active: descending's {4, 3} both lie in
    # rank 1's half of the flat buffer; strided's {0, 3} put one block on each rank.
    assert min(desc) < 0.25 * max(desc), desc
    assert min(strided) > 0.5 * max(strided), strided
    assert max(strided) < max(desc), (strided, desc)
