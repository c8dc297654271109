"""Start-up agreement: ranks started with different settings fail at once, on every rank, with
a message naming the field and each rank's value (2 gloo ranks, one process group for all cases).
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_distributed
from tests.distributed.preflight_workers import desync_scenarios

pytestmark = pytest.mark.distributed  # one 2-rank group for all cases: ~8 s


@pytest.fixture(scope="module")
def outcomes() -> list[dict]:
    return run_distributed(desync_scenarios, 2)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("lr", ["optimizer.lr: rank 0 has 0.003, rank 1 has 0.002"]),
        ("seed", ["seed: rank 0 has 0, rank 1 has 1"]),
        ("timeout_knob", ["collective_timeout_s: rank 0 has 600.0, rank 1 has 60.0"]),
        ("version", ['frugal_dist.__version__: rank 0 has "0.1.0", rank 1 has "0.2.0.dev0"']),
        ("model_shape", ["ranks disagree on the model",
                         "model.param.layers.0.mlp.down_proj.weight: rank 0 has [64, 172], "
                         "rank 1 has [64, 176]"]),
        ("frugal_density", ["optimizer.group0.density: rank 0 has 0.25, rank 1 has 0.5"]),
        ("frugal_shape", ["optimizer.group0.param.layer.w: rank 0 has [8, 6], rank 1 has [8, 7]",
                          "(1 field(s) differ"]),
    ],
)  # fmt: skip
def test_mismatch_fails_on_every_rank_naming_the_field(outcomes, case, expected):
    for rank, out in enumerate(outcomes):
        res = out[case]
        assert res["error"] == "RankMismatchError", (rank, res)
        assert f"this is rank {rank}" in res["message"]
        for text in expected:
            assert text in res["message"], (rank, res["message"])
    # every rank reports the same differing fields
    strip = [o[case]["message"].split("\n", 1)[1] for o in outcomes]
    assert strip[0] == strip[1]


def test_only_the_differing_field_is_reported(outcomes):
    lines = outcomes[0]["lr"]["message"].splitlines()
    assert "(1 field(s) differ" in lines[0]
    assert [ln.strip().split(":")[0] for ln in lines[1:-1]] == ["optimizer.lr"]


def test_identical_ranks_pass_and_train(outcomes):
    for out in outcomes:
        assert out["identical"]["error"] is None, out["identical"]
        assert out["identical"]["result"]["steps"] == 1
        assert out["frugal_same"] == {"error": None, "result": {"groups": 2}}
