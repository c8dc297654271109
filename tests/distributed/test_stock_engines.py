"""FRUGAL handed to stock engine entry points (issue 17, item 2), 2 gloo CPU ranks: stock
``deepspeed.initialize(model=m, optimizer=FRUGAL(...))`` under ZeRO-2 and FSDP1 without the adapter
hand FRUGAL flat partitions / 1-D slices. It must refuse at the first step, naming the entry points
that bind the layout, never compute on them; the fix it names for a stock DeepSpeed engine
(``frugal_dist.deepspeed.bind``) gives the single-process result."""

from __future__ import annotations

import pytest

from tests.distributed import cases
from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed

ENTRY_POINTS = (
    "frugal_dist.deepspeed.initialize",
    "frugal_dist.deepspeed.bind(engine, frugal)",
    "frugal_dist.engines.fsdp1.build_frugal",
)


def _refused(result: dict) -> None:
    assert result["error"] == "UnboundLayoutError", result
    for name in ENTRY_POINTS:
        assert name in result["message"], (name, result["message"])


@pytest.mark.parametrize("kind", ["columns", "projection"])
def test_stock_deepspeed_zero2_refuses_then_bind_matches_single_process(kind):
    pytest.importorskip("deepspeed")
    from tests.distributed import ds_workers as dw
    from tests.distributed import stock_workers as sw

    kw = {**dict(lr=1e-2, density=0.4, update_gap=4, weight_decay=0.01), **cases.SUBSPACES[kind]}
    got = run_distributed(sw.stock_deepspeed, 2, 2, 6, kw, deadline_s=300)
    ref = dw.single(6, 2, kw)
    for r in range(2):
        _refused(got[r])
        assert "flat partitions" in got[r]["message"]
        diff = max((got[r]["params"][n] - ref[n]).abs().max().item() for n in ref)
        assert diff < 1e-5, (r, diff)


def test_fsdp1_without_adapter_refuses():
    from tests.distributed import stock_workers as sw

    kw = dict(lr=1e-3, density=0.5, update_gap=2, subspace="coordinate")
    got = run_distributed(sw.fsdp1_without_adapter, 2, kw, deadline_s=300)
    for r in range(2):
        for case in ("built_before", "built_after"):
            _refused(got[r][case])
        assert "had shape" in got[r]["built_before"]["message"]
        assert "views into larger flat buffers" in got[r]["built_after"]["message"]
