"""Collective timeouts on gloo: when one rank stalls, the others fail within
``collective_timeout_s`` (plus slack) with an error saying what timed out and how to raise the
limit -- they never hang. 2 real processes; rank 1 sleeps 9 s, the timeout is 5 s."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

from tests.distributed.launch import free_port, start_processes
from tests.distributed.preflight_workers import timeout_entry

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~15 s each on 2 busy cores
TIMEOUT_S = 5.0
SLACK_S = 3.0


def _run(scenario: str) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        start_processes(timeout_entry, (2, free_port(), scenario, out), 2, join=True)
        results = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    return results, time.perf_counter() - t0


def test_stalled_rank_makes_a_collective_fail_within_the_timeout():
    (waiting, stalled), wall = _run("all_reduce")
    assert waiting["error"] == "CollectiveTimeoutError", waiting
    assert TIMEOUT_S - 0.5 <= waiting["elapsed"] <= TIMEOUT_S + SLACK_S, waiting
    msg = waiting["message"]
    assert "timed out during the test's all_reduce" in msg
    assert "within 5 s (collective_timeout_s)" in msg and "--collective_timeout_s=" in msg
    # the stalled rank, arriving late, is told its peer left (or timed out) -- no hang either
    assert stalled["error"] in ("PeerRankLostError", "CollectiveTimeoutError"), stalled
    assert stalled["elapsed"] <= TIMEOUT_S + SLACK_S, stalled


def test_training_loop_names_the_step_that_timed_out():
    (waiting, stalled), wall = _run("training_step")
    assert waiting["error"] == "CollectiveTimeoutError", waiting
    assert "training step 2" in waiting["message"], waiting["message"]
    assert "--collective_timeout_s=" in waiting["message"]
    assert waiting["elapsed"] <= TIMEOUT_S + SLACK_S, waiting
    assert stalled["error"] in ("PeerRankLostError", "CollectiveTimeoutError"), stalled
