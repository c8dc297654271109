"""FRUGAL under HSDP (FSDP2 on a (replicate, shard) = 2 x 2 gloo mesh) against the single-process
run, DCP checkpoints saved at 2 x 2 resumed at 1 process and at 4 x 1, and a tensor-parallel
2-D mesh refused with an error naming the parameter and its placements. Everything on 4 ranks
(every kind's 2 x 2 run, the DCP save and its resume at 4 x 1, meshes, refusals, svd count,
training loop) runs in one 4-process launch (``hsdp_workers.all_on_four``) and the one-process
resume and training loop in one more: the 16 tests start 2 launches (12 before)."""

from __future__ import annotations

import pytest

from tests.distributed import cases
from tests.distributed import fsdp_workers as fw
from tests.distributed import hsdp_workers as hw
from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed

COMMON = dict(lr=1e-3, density=0.25, update_gap=4, weight_decay=0.01)
KINDS = {
    **cases.pick(
        "block-descending",
        "block-gradnorm",
        "columns",
        "projection-left",
        "svd",
        "columns-matched",
        "projection-left-matched",
        "block-decay",
        "columns-decay",
        "columns-loss",
    ),
    "projection-right": dict(subspace="projection", proj_type="random", proj_side="right"),
    "rho0": dict(subspace="projection", proj_type="random", density=0.0),
}
STEPS = 10  # refreshes at 0, 4, 8
TOL = 1e-6  # float64 model, float32 optimizer math, lr 1e-3
ROW_SHARDED = "(Replicate(), Shard(dim=0))"
REPLICATED = "(Replicate(), Replicate())"


def _close(a: dict, b: dict, tol: float) -> float:
    worst = 0.0
    for k in b:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        if b[k].numel():  # rho = 0: (m, 0) / (0, n) moments
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    assert worst < tol, worst
    return worst


DCP_KINDS = ["block-descending", "columns", "projection-left", "svd"]
FIRST, REST = 5, 5
REFUSED = {c: {**COMMON, "subspace": "coordinate", "coord_choice": c} for c in ("rows", "randk")}


@pytest.fixture(scope="module")
def dcp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hsdp_dcp"))


def _dcp_kws() -> dict[str, dict]:
    return {kind: {**COMMON, **KINDS[kind]} for kind in DCP_KINDS}


@pytest.fixture(scope="module")
def on_four(dcp_root) -> list[dict]:
    """Every rank's ``hsdp_workers.all_on_four``: one 4-process launch for the file."""
    kws = {kind: {**COMMON, **kw} for kind, kw in KINDS.items()}
    return run_distributed(hw.all_on_four, 4, STEPS, kws, _dcp_kws(), dcp_root, FIRST, REST,
                           REFUSED, deadline_s=600)  # fmt: skip


@pytest.fixture(scope="module")
def on_one(on_four, dcp_root) -> dict:
    """``hsdp_workers.all_on_one`` after the 2 x 2 save (one 1-process launch)."""
    return run_distributed(hw.all_on_one, 1, _dcp_kws(), dcp_root, FIRST, REST)[0]


@pytest.fixture(scope="module")
def hsdp_runs(on_four) -> dict[str, tuple[dict, list[dict]]]:
    """Every kind's single-process reference and its 2 x 2 run."""
    kws = {kind: {**COMMON, **kw} for kind, kw in KINDS.items()}
    return {kind: (fw.single(STEPS, kw), [g["hsdp"][kind] for g in on_four])
            for kind, kw in kws.items()}  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_hsdp_2x2_matches_single_process(kind, hsdp_runs):
    ref, got = hsdp_runs[kind]
    for r in range(4):
        assert got[r]["param_placements"] == {ROW_SHARDED}
        # State is sharded over the shard dim like its parameter (or replicated: left
        # projections, svd bases), never over the replicate dim.
        assert got[r]["state_placements"] <= {ROW_SHARDED, REPLICATED}
        assert got[r]["losses"] == pytest.approx(ref["losses"], rel=1e-6)
        # svd_method="warm": one power step P = orth(G^T G P_prev) from the last basis amplifies
        # the engines' last-bit gradient differences (1e-8 after 4 steps) by about
        # ||G||^2 / sigma_r^2 at each refresh: measured 1.6e-5 after 10 steps (the exact method
        # stays below 1e-6). Bound 1e-4 there, as test_fsdp2 bounds svd.
        tol = 1e-4 if kind == "svd" else TOL
        _close(got[r]["params"], ref["params"], tol)
        for name, st in ref["state"].items():
            _close(got[r]["state"][name], st, tol)
    if kind in ("block-descending", "columns", "projection-right"):
        assert ROW_SHARDED in got[0]["state_placements"]
    # Replicas hold identical copies: ranks (0, 2) and (1, 3) hold the same shard.
    assert got[0]["state_bytes"] == got[2]["state_bytes"]
    assert got[1]["state_bytes"] == got[3]["state_bytes"]


@pytest.fixture(scope="module")
def dcp_runs(on_four, on_one) -> dict[str, tuple[dict, dict[int, list[dict]]]]:
    """Saved at 2 x 2, resumed at 1 process and at 4 x 1."""
    return {
        kind: (
            fw.single(FIRST + REST, kw),
            {1: [on_one["resumed"][kind]], 4: [g["resumed"][kind] for g in on_four]},
        )
        for kind, kw in _dcp_kws().items()
    }


@pytest.mark.parametrize("kind", DCP_KINDS)
def test_hsdp_dcp_checkpoint_resumes_at_one_process_and_at_4x1(kind, dcp_runs):
    ref, resumed = dcp_runs[kind]
    for world, got in resumed.items():
        for r in range(world):
            assert got[r]["losses"] == pytest.approx(ref["losses"][FIRST:], rel=1e-6)
            # warm svd refreshes amplify last-bit differences (see the 2x2 test): measured 1.6e-5
            _close(got[r]["params"], ref["params"], 1e-4 if kind == "svd" else TOL)


def test_tensor_parallel_mesh_is_refused_naming_the_parameter_and_placements(on_four):
    errors = [g["tensor_parallel"] for g in on_four]
    for err in errors:
        assert "'0.weight'" in err, err
        assert "Shard(dim=1)" in err and "Tensor parallelism" in err, err


def test_default_mesh_replicas_must_divide_the_world(on_four):
    assert on_four[0]["mesh"][2] == ((2, 2), ("replicate", "shard"))
    err = on_four[0]["mesh"][3]
    assert "fsdp2_replicas=3 must divide the world size 4" in err, err


def test_fsdp2_replicas_config_key_is_validated():
    from frugal_dist.train.config import build_config

    assert build_config({"engine": "fsdp2", "fsdp2_replicas": 2}).fsdp2_replicas == 2
    with pytest.raises(ValueError, match="fsdp2_replicas must be an integer >= 1"):
        build_config({"engine": "fsdp2", "fsdp2_replicas": 0})
    with pytest.raises(ValueError, match="needs engine=fsdp2"):
        build_config({"engine": "ddp", "fsdp2_replicas": 2})


def test_training_loop_with_fsdp2_replicas_matches_single_process(on_four, on_one):
    single = on_one["train_loop"]
    got = on_four[0]["train_loop"]
    # float32 model: gradient averages over 2 x 2 ranks differ from the single-process mean in
    # the last bits (as for the other engines in test_engines_train: bound 1e-5 relative).
    assert len(got) == len(single) == 12
    for a, b in zip(got, single):
        assert abs(a - b) < 1e-5 * abs(b), (got, single)


def test_rows_and_randk_are_refused_under_hsdp_with_the_fix(on_four):
    # Their compact state is not aligned with the row shards (as under 1-D FSDP2): DCP could not
    # reshard it, so the first step refuses them, naming the option and the fix.
    for choice in REFUSED:
        for err in (g["refused"][choice] for g in on_four):
            assert f"coord_choice={choice!r} is not supported" in err, err
            assert "coord_choice='columns'" in err, err


def test_each_svd_runs_once_in_the_whole_hsdp_job(on_four):
    calls = [g["svd_calls"] for g in on_four]
    n_split = 14  # tiny LLaMA: 2 layers x 7 matrices, each refreshed at steps 0 and 2
    # One owner per matrix over all 4 ranks (both replicas): its shard group reduces the
    # fragments onto it and its basis is broadcast to every replica -- never one SVD per replica.
    assert sum(calls) == 2 * n_split and max(calls) < 2 * n_split / 2, calls
