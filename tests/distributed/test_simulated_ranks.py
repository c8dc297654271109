"""``FRUGAL.step_ranks`` and ``simulate_ranks`` (W ranks simulated in one process) against real
gloo ranks running the same vote: the quality benchmark's simulated variants
(``benchmarks/quality.py``) compute what a distributed run computes.

* optimizer: 4 gloo ranks with their own dyadic gradients (``workers.rank_grads``) in exact,
  sign and hierarchical (2 nodes x 2) mode, every subspace kind, against ``step_ranks`` with
  the 4 ranks' gradients: bit for bit (every sum of dyadic gradients is exact in any order, and
  sums of two terms commute), except sign mode's compact projections (random and svd), a sum
  of 4 GEMM results whose order the collective picks (bound 1e-6; seen: 1.2e-9); the bytes a
  rank counts for the reduce and the inf/nan flag are equal;
* training loop: 2 gloo ranks with ``engine=ddp``, FRUGAL reducing (sign mode), against
  ``simulate_ranks=2``: the same losses bit for bit (2-term sums commute); the validation loss
  up to float32 round-off (one batch of 8 rows against the mean of two batches of 4); the same
  for the test split (``data.test_files``, evaluated once after the last step on every rank)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import simulated_workers as sw
from tests.distributed.hierarchical_workers import CASES
from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed
WORLD, STEPS, TRAIN_STEPS = 4, 5, 6


@pytest.fixture(scope="module")
def real():
    return run_distributed(sw.run_optimizer, WORLD, STEPS, deadline_s=300)


@pytest.mark.parametrize("mode", list(sw.MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_step_ranks_equals_real_ranks(real, case, mode):
    got = real[0][case, mode]
    for r in range(1, WORLD):  # every real rank holds the same parameters
        for s in range(STEPS):
            assert all(torch.equal(a, b) for a, b in zip(real[r][case, mode]["traj"][s],
                                                         got["traj"][s]))  # fmt: skip
    sim = sw.simulate_optimizer(case, mode, WORLD, STEPS)
    exact = not (mode == "sign" and CASES[case]["subspace"] == "projection")
    for s in range(STEPS):
        for a, b in zip(got["traj"][s], sim["traj"][s]):
            if exact:
                assert torch.equal(a, b), (case, mode, s, float((a - b).abs().max()))
            else:
                assert float((a - b).abs().max()) < 1e-6, (case, mode, s)
    # the reduce's bytes and the inf/nan flag's (fingerprints and svd bases are exchanged
    # outside the reduce: not simulated)
    reduce = {k: v for k, v in got["stats"].items() if k in sw.REDUCE_KEYS}
    assert sim["stats"] == reduce


def test_the_vote_is_not_the_mean(real):
    """The modes differ (the comparison above is not vacuous): exact (sign of the mean), sign
    (vote of 4 ranks) and hierarchical (vote of 2 node means)."""
    last = {m: real[0]["block", m]["traj"][-1][0] for m in sw.MODES}
    assert not torch.equal(last["exact"], last["sign"])
    assert not torch.equal(last["sign"], last["hier"])
    assert not torch.equal(last["exact"], last["hier"])


def test_simulated_training_equals_ddp_ranks():
    got = run_distributed(sw.run_training, 2, TRAIN_STEPS, "sign", deadline_s=300)[0]
    sim = sw.simulate_training(2, TRAIN_STEPS, "sign")
    assert sim["losses"] == got["losses"]
    assert abs(sim["val_loss"] - got["val_loss"]) < 1e-6 * abs(got["val_loss"])


def test_test_split_at_two_ranks_equals_simulated(tmp_path):
    """``data.test_files`` at world size 2: every rank evaluates the test split after the last
    step (one all-reduce, as validation) and gets the simulated run's test loss."""
    for name, lo, hi in (("train", 0, 400), ("val", 400, 450), ("test", 450, 500)):
        with open(tmp_path / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": f"{name} document {i}: " + "xyz"[i % 3] * (i % 17)})
                          + "\n" for i in range(lo, hi))  # fmt: skip
    data = {"source": "files", "train_files": str(tmp_path / "train.jsonl"),
            "val_files": str(tmp_path / "val.jsonl"),
            "test_files": str(tmp_path / "test.jsonl")}  # fmt: skip
    got = run_distributed(sw.run_training, 2, 3, "sign", data, deadline_s=300)
    sim = sw.simulate_training(2, 3, "sign", data)
    assert got[0]["test_loss"] == got[1]["test_loss"]  # the reduced value on every rank
    assert abs(sim["test_loss"] - got[0]["test_loss"]) < 1e-6 * abs(got[0]["test_loss"])
    assert sim["test_loss"] != sim["val_loss"]
