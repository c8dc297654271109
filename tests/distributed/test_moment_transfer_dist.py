"""``moment_transfer="rotate"`` on the distributed engines against the single-process run:
DDP with ``shard_state`` (only the owner holds and rotates the moments), FRUGAL reducing the
gradients itself, ZeRO-style flat fragments cut mid-row (right projections rotate their rows'
moments, left ones their replicated (r, n) moments) and FSDP2 row shards. The rotation needs only
the global bases, so no engine adds communication. One 2-process launch for the file."""

from __future__ import annotations

import pytest

from tests.distributed import fsdp_workers as fw
from tests.distributed import workers
from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed

KINDS = {
    "random-right": dict(proj_type="random", proj_side="right"),
    "random-left-device": dict(proj_type="random", proj_side="left", proj_qr_device="param"),
    "randperm-left": dict(proj_type="randperm", proj_side="left"),
    "svd-right": dict(proj_type="svd", proj_side="right"),
    "svd-left": dict(proj_type="svd", proj_side="left"),
}
# density 0.25: no svd basis has full rank min(m, n) (its residual would be round-off)
COMMON = dict(lr=1e-2, density=0.25, update_gap=4, weight_decay=0.01, subspace="projection",
              moment_transfer="rotate")  # fmt: skip
STEPS = 14  # refreshes at 0, 4, 8, 12: three carry-overs


def _engines(rank, world):
    out = {}
    for name, kw in KINDS.items():
        opt_kw = {**COMMON, **kw}
        out[name] = {
            "ddp": workers.synthetic_run(rank, world, STEPS, opt_kw, "ddp")["params"],
            "optimizer": workers.synthetic_run(rank, world, STEPS, opt_kw, "optimizer")["params"],
            "zero": workers.zero_sim_run(rank, world, STEPS, opt_kw),
        }
    return out


FSDP2_NAMES = ("random-right", "randperm-left", "svd-left")
FSDP2_STEPS = 8  # refreshes at 0, 3, 6
FSDP2_KWS = {name: {**COMMON, **KINDS[name], "lr": 3e-3, "update_gap": 3} for name in FSDP2_NAMES}


def _all(rank, world):
    fsdp2 = {name: fw.fsdp2(rank, world, FSDP2_STEPS, kw) for name, kw in FSDP2_KWS.items()}
    return {"engines": _engines(rank, world), "fsdp2": fsdp2}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    """Every rank's runs of both tests: one 2-process launch for the file."""
    return run_distributed(_all, 2)


def test_rotate_on_ddp_shard_state_and_flat_fragments(runs):
    got = [r["engines"] for r in runs]
    for name, kw in KINDS.items():
        ref = workers.synthetic_run(0, 2, STEPS, {**COMMON, **kw}, "single")["params"]
        reset = {**COMMON, **kw, "moment_transfer": "none"}
        plain = workers.synthetic_run(0, 2, STEPS, reset, "single")["params"]
        # the comparison can tell rotation from reset
        assert max((a - b).abs().max().item() for a, b in zip(plain, ref)) > 1e-3, name
        for r in range(2):
            for engine, params in got[r][name].items():
                diff = max((a - b).abs().max().item() for a, b in zip(params, ref))
                # fragments: partial products summed over ranks (float32 order, ~1e-7 per step);
                # an svd basis amplifies that by 1 / (singular value gap)
                tol = 1e-4 if name.startswith("svd") and engine == "zero" else 1e-5
                assert diff < tol, (name, engine, r, diff)


def test_rotate_on_fsdp2_row_shards(runs):
    for name, kw in FSDP2_KWS.items():
        ref = fw.single(FSDP2_STEPS, kw)
        plain = fw.single(FSDP2_STEPS, {**kw, "moment_transfer": "none"})["params"]
        assert max((plain[k] - v).abs().max().item() for k, v in ref["params"].items()) > 1e-4
        got = [r["fsdp2"][name] for r in runs]
        tol = 1e-4 if name.startswith("svd") else 5e-6
        for r in range(2):
            worst = max((got[r]["params"][k] - v).abs().max().item()
                        for k, v in ref["params"].items())  # fmt: skip
            assert worst < tol, (name, r, worst)
            for pname, st in ref["state"].items():
                for key, v in st.items():
                    d = (got[r]["state"][pname][key].double() - v.double()).abs().max().item()
                    assert d < tol, (name, r, pname, key, d)
