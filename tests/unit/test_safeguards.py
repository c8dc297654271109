"""Single-process parts of the rank-agreement check and of the collective-timeout errors (the
multi-process behaviour is in tests/distributed/test_preflight.py and test_collective_timeout.py).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.comm.preflight import (
    canonical,
    check_optimizer_agreement,
    check_ranks_agree,
    descriptor_digest,
    environment_descriptor,
    flatten,
    mismatch_report,
    optimizer_descriptor,
)
from frugal_dist.comm.timeouts import (
    CollectiveTimeoutError,
    PeerRankLostError,
    classify,
    explain_timeouts,
    process_group_timeout,
    set_phase,
)
from frugal_dist.train.config import build_config
from frugal_dist.train.safeguards import config_descriptor

GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv"
GLOO_PEER = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:26032"


def test_report_names_field_ranks_and_values():
    per_rank = [{"optimizer.lr": "0.003", "seed": "0"}, {"optimizer.lr": "0.002", "seed": "0"},
                {"optimizer.lr": "0.002", "seed": "0", "extra": "1"}]  # fmt: skip
    lines = mismatch_report(per_rank, [0, 1, 2])
    assert lines == ["extra: ranks 0,1 have <absent>, rank 2 has 1",
                     "optimizer.lr: rank 0 has 0.003, ranks 1,2 have 0.002"]  # fmt: skip


def test_digest_is_canonical():
    a = {"betas": (0.9, 0.999), "lr": 1e-3, "nested": {"b": 1, "a": 2}}
    b = {"nested": {"a": 2, "b": 1}, "lr": 0.001, "betas": [0.9, 0.999]}
    assert descriptor_digest(a) == descriptor_digest(b)
    assert descriptor_digest(a) != descriptor_digest({**a, "lr": 2e-3})
    assert 0 <= descriptor_digest(a) < 2**63
    assert canonical((1, 2)) == canonical([1, 2])


def test_flatten_nests_with_dots():
    assert flatten({"optimizer": {"lr": 1, "x": {"y": 2}}, "seed": 0}) == {
        "optimizer.lr": 1, "optimizer.x.y": 2, "seed": 0}  # fmt: skip


def test_config_descriptor_skips_rank_local_keys_and_compares_ds_config_by_content(tmp_path):
    ds = tmp_path / "a.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    ds2 = tmp_path / "b.json"
    ds2.write_text('{ "zero_optimization" : {"stage" : 2} }')
    d1 = config_descriptor(build_config({"output_dir": "/a", "deepspeed_config": str(ds)}), 2)
    d2 = config_descriptor(build_config({"output_dir": "/b", "deepspeed_config": str(ds2)}), 2)
    assert d1 == d2
    assert d1["deepspeed_config.zero_optimization.stage"] == 2
    assert "output_dir" not in d1 and d1["world_size"] == 2 and d1["optimizer.lr"] == 3e-3
    for key in ("frugal_dist.__version__", "torch.__version__", "frugal_dist.source_sha256"):
        assert key in d1 and key in environment_descriptor()


def test_optimizer_descriptor_and_no_collective_at_world_size_one():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    opt = FRUGAL([{"params": [w], "names": ["w"]}], density=0.5)
    desc = optimizer_descriptor(opt)
    assert desc["optimizer.group0.density"] == 0.5 and desc["optimizer.group0.param.w"] == [4, 3]
    assert desc["optimizer.class"] == "FRUGAL" and desc["optimizer.shard_state"] is False
    check_optimizer_agreement(opt)  # no process group: returns without communicating
    opt.bind_layout(object())  # an engine's layout: params may be per-rank flat partitions
    desc = optimizer_descriptor(opt)
    assert desc["optimizer.group0.param.w"] == "shaped by the engine"
    assert desc["optimizer.group0.num_parameters"] == 1
    check_ranks_agree({"a": 1})


def test_timeout_classification():
    assert classify(RuntimeError(GLOO_TIMEOUT)) is CollectiveTimeoutError
    assert classify(RuntimeError(GLOO_PEER)) is PeerRankLostError
    assert classify(RuntimeError("Watchdog caught collective operation timeout")) is (
        CollectiveTimeoutError
    )
    assert classify(RuntimeError("CUDA out of memory")) is None
    assert classify(ValueError("collective_timeout_s: rank 0 has 600, rank 1 has 60")) is None


def test_explain_timeouts_names_phase_and_knob():
    set_phase("training step 7 (forward/backward, gradient sync, optimizer step)")
    with pytest.raises(CollectiveTimeoutError) as info, explain_timeouts(30.0):
        raise RuntimeError(GLOO_TIMEOUT)
    msg = str(info.value)
    assert "during training step 7" in msg and "within 30 s" in msg
    assert "--collective_timeout_s=" in msg and GLOO_TIMEOUT in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    lost = pytest.raises(PeerRankLostError, match="peer rank left a collective during setup")
    with lost, explain_timeouts(30.0, "setup"):
        raise RuntimeError(GLOO_PEER)
    with pytest.raises(RuntimeError, match="^boom$"), explain_timeouts(30.0):
        raise RuntimeError("boom")


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "600", True])
def test_timeout_value_is_checked(bad):
    with pytest.raises(ValueError, match="collective_timeout_s must be a finite number"):
        process_group_timeout(bad)
    with pytest.raises(ValueError, match="collective_timeout_s must be a finite number"):
        build_config({"collective_timeout_s": bad})


def test_timeout_value_converts():
    assert process_group_timeout(5) == timedelta(seconds=5)
    assert process_group_timeout(None) is None
    assert build_config({}).collective_timeout_s == 600.0
