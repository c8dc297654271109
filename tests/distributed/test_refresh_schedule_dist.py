"""``refresh_policy="loss"`` on 2 real processes (gloo, CPU): every rank takes the same refresh
decisions from the all-reduced loss, at the same steps as one process fed the same mean loss,
with the same parameters bit for bit (dyadic gradients and losses: the means are exact in any
order); ranks fed different losses are stopped at the refresh where they disagree. One launch
for the file."""

from __future__ import annotations

import pytest

from tests.distributed import cases, refresh_workers
from tests.distributed.launch import per_world

pytestmark = pytest.mark.distributed

KINDS = cases.pick("block-descending", "block-gradnorm", "columns", "projection", "svd")
STEPS = 30  # refreshes at 0, 2, ..., 14, 16, 20, 28: T 2, then 4, then the cap 8


def _world(rank: int, world: int) -> dict:
    out = {(mode, name): refresh_workers.loss_run(rank, world, STEPS,
                                                  {**refresh_workers.COMMON, **kw}, mode)
           for mode in ("optimizer", "ddp") for name, kw in KINDS.items()}  # fmt: skip
    out["unreduced"] = refresh_workers.unreduced_losses(rank, world)
    return out


@pytest.fixture(scope="module")
def launched():
    return per_world(_world)


@pytest.fixture(scope="module")
def single_runs() -> dict[str, dict]:
    return {name: refresh_workers.loss_run(0, 2, STEPS, {**refresh_workers.COMMON, **kw},
                                           "single")
            for name, kw in KINDS.items()}  # fmt: skip


@pytest.mark.parametrize("mode", ["optimizer", "ddp"])
def test_same_refresh_steps_on_every_rank_and_as_one_process(mode, launched, single_runs):
    results = launched(2)
    for name in KINDS:
        ref = single_runs[name]
        want = [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 28]
        assert all(r == want for r in ref["refreshes"]), (name, ref["refreshes"])
        assert ref["gaps"] == [8] * len(ref["gaps"])
        for rank in range(2):
            got = results[rank][mode, name]
            assert got["refreshes"] == ref["refreshes"], (name, rank)
            assert got["gaps"] == ref["gaps"], (name, rank)
            diff = max((a - b).abs().max().item() for a, b in zip(got["params"], ref["params"]))
            assert diff == 0.0, (name, mode, rank, diff)


def test_ranks_fed_different_losses_fail_at_the_refresh(launched):
    messages = [r["unreduced"] for r in launched(2)]
    for msg in messages:
        # the first decision (step 4): rank 0 doubles T, rank 1 keeps it
        assert msg.startswith("step 4: ") and "disagree" in msg, msg
