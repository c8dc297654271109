"""``frugal_dist.deepspeed`` mirrors the ``deepspeed`` module (what it does not override is
DeepSpeed's own), takes its config from ``args`` as DeepSpeed does, and the launcher's one
precedence rule between the DeepSpeed JSON and the experiment config names what it replaced."""

from __future__ import annotations

import argparse
import json

import pytest

deepspeed = pytest.importorskip("deepspeed")

import frugal_dist.deepspeed as fds  # noqa: E402
from frugal_dist.engines.deepspeed import initialize  # noqa: E402
from frugal_dist.train.config import build_config  # noqa: E402
from frugal_dist.train.engine_setup import experiment_over_json  # noqa: E402


def test_forwards_what_it_does_not_override():
    assert fds.add_config_arguments is deepspeed.add_config_arguments
    assert fds.init_distributed is deepspeed.init_distributed
    assert fds.zero is deepspeed.zero and fds.comm is deepspeed.comm
    assert fds.initialize is initialize  # ours
    assert {"add_config_arguments", "initialize", "bind"} <= set(dir(fds))
    parser = fds.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json"])
    assert args.deepspeed and args.deepspeed_config == "ds.json"
    with pytest.raises(AttributeError):
        _ = fds.no_such_thing


def test_config_from_args_and_config_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1}))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    with pytest.raises(ValueError, match="given twice: args.deepspeed_config=.*pass one"):
        fds.initialize(args=args, model=__import__("torch").nn.Linear(2, 2), config={})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON.*args\.deepspeed_config"):
        fds.initialize(args=argparse.Namespace(deepspeed_config=str(bad)),
                       model=__import__("torch").nn.Linear(2, 2))  # fmt: skip


def test_experiment_config_wins_and_the_replaced_json_values_are_named():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "bf16": {"enabled": True},
          "optimizer": {"type": "FRUGAL",
                        "params": {"lr": 1e-3, "update_gap": 200, "density": 0.25,
                                   "betas": [0.9, 0.999]}}}  # fmt: skip
    cfg = build_config({"batch_size": 4, "grad_clip": 0.5, "dtype": "float32"})
    opts = {"lr": 3e-3, "update_gap": 50, "density": 0.25, "betas": (0.9, 0.999)}
    replaced = experiment_over_json(ds, cfg, "frugal", opts)
    assert replaced == [
        "gradient_clipping 1.0 -> 0.5 (grad_clip)",
        "bf16.enabled True -> False (dtype=float32)",
        "optimizer.params.lr 0.001 -> 0.003 (optimizer.lr)",
        "optimizer.params.update_gap 200 -> 50 (optimizer.update_gap)",
    ]  # equal values (batch 4, density, betas as list vs tuple) are not reported
    assert ds["optimizer"]["params"]["lr"] == 3e-3 and ds["gradient_clipping"] == 0.5
