"""benchmarks/comm_bench.py on 4 CPU processes (gloo) as 2 simulated nodes x 2: the exact, sign
and hierarchical rows, the two-level rows of ``--inter-backend gloo`` and tokens/s all come out
measured in one run, with the bytes split by link."""

from __future__ import annotations

import json

import pytest

from tests.distributed.launch import run_distributed
from tests.integration.comm_bench_workers import bench


@pytest.mark.timeout(120)
def test_comm_bench_cpu_gloo_four_ranks_two_nodes(tmp_path):
    out = tmp_path / "comm.json"
    argv = ["--model", "tiny", "--device", "cpu", "--modes", "exact,sign,hierarchical",
            "--node-size", "2", "--inter-backend", "gloo", "--subspaces", "block_d0.25",
            "--warmup", "0", "--steps", "1", "--batch-size", "1", "--seq-len", "16",
            "--out", str(out)]  # fmt: skip
    run_distributed(bench, 4, argv, deadline_s=100)
    result = json.loads(out.read_text())
    assert result["links"]["inter"] == "gloo" and result["node_size"] == 2
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"ddp_allreduce", "ddp_allreduce+adamw", "two_level_allreduce",
                         "two_level_allreduce+adamw", "frugal_block_d0.25_exact",
                         "frugal_block_d0.25_sign", "frugal_block_d0.25_hierarchical"}  # fmt: skip
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("note") for r in rows.values()]
    grad = result["grad_bytes"]
    exact, sign, hier = (rows[f"frugal_block_d0.25_{m}"] for m in ("exact", "sign", "hierarchical"))
    # exact / sign: every byte on the world group; exact is the 2 (W-1)/W ring of the gradient
    assert exact["link_wire"] == {"world": pytest.approx(1.5 * grad, rel=1e-3), "intra": 0.0,
                                  "inter": 0.0}  # fmt: skip
    assert 0 < sign["link_wire"]["world"] < exact["link_wire"]["world"]
    # hierarchical: the whole node mean inside the node; across nodes half of sign's bytes
    # (each of a node's 2 ranks sends its slice), as ring wire over 2 nodes
    assert hier["link_wire"]["world"] == 0.0 and hier["link_wire"]["intra"] > grad
    assert 0 < hier["link_wire"]["inter"] < sign["link_wire"]["world"]
    assert result["fwd_bwd_ms"] > 0
    for r in (exact, sign, hier, rows["ddp_allreduce+adamw"]):
        assert r["step_ms_median"] > 0 and r["tokens_per_s"] > 0
    assert "tokens_per_s" not in rows["ddp_allreduce"]  # no update: no tokens/s
    assert exact["local_step_ms_median"] > 0 and "comm_ms_est" in exact
