"""RSO under DDP, FSDP2 and DeepSpeed ZeRO 0-3 (gloo, 2 CPU ranks, one job) against one process,
over three outer iterations (merges after steps 2 and 4: eager in ``step()`` for DDP / FSDP2 /
ZeRO-0, lazy at the next forward for ZeRO-1/2/3), and a ZeRO-3 rigid checkpoint taken in the
middle of an outer iteration and resumed in a fresh engine."""

from __future__ import annotations

import pytest

from tests.distributed import rso_workers as rw
from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 5
OPT = {"lr": 1e-2, "inner_steps": 2, "prox": 0.1, "weight_decay": 0.01}
# DDP, FSDP2, ZeRO-0/1/2 measured bit for bit (elementwise updates, exact 2-rank mean). ZeRO-3
# differs by ~1e-8 after one step (its own linear/gradient path) which Adam amplifies on
# near-zero gradients to ~1e-4 after 5 steps; a wrong merge would be off by ~|B P^T| ~ 1e-2.
TOL = {"zero3": 5e-4, "zero3_resumed": 5e-4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    resume = {"stage": 3, "cut": 3, "path": str(tmp_path_factory.mktemp("rso_ckpt"))}
    return rw.single(2, STEPS, OPT), run_distributed(rw.all_engines, 2, STEPS, OPT, resume)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3",
                                    "zero3_resumed"])  # fmt: skip
def test_engine_matches_single_process(runs, engine):
    ref, got = runs
    for r in range(2):
        g = got[r][engine]
        assert set(g) == set(ref)
        for n in ref:
            if n.endswith(".outer_plus_pending"):  # every layer reached outer iteration 2
                assert g[n].item() == ref[n].item() == STEPS // OPT["inner_steps"], (engine, n)
        diff = max((g[n] - ref[n]).abs().max().item() for n in ref)
        assert diff <= TOL.get(engine, 0.0), (engine, r, diff)


@pytest.mark.slow
def test_fsdp2_shards_b(runs):
    _, got = runs  # each rank holds about half of the trainable elements (B rows, norms, ...)
    assert got[0]["fsdp2_grad_numel"] < 0.6 * got[0]["ddp_grad_numel"]
