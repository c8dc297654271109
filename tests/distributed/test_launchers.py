"""The training entry point under each launcher, as a user runs it (real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import free_port

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARGS = ["launchers/train.py", "--config", "configs/tiny-cpu.yaml", "--max_steps=30",
        "--log_every=10", "--eval_every=30", "--eval_batches=2"]  # fmt: skip


def _run(cmd: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd + [f"--output_dir={tmp_path}"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    done = [ln for ln in out.stdout.splitlines() if ln.startswith("[frugal_dist] done: ")]
    assert len(done) == 1 and len(done[0]) < 300, out.stdout[-3000:]  # a short summary, once
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] - 0.5, summary
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30 and "val_loss" in records[-1]
    # first_loss is the step-1 loss the progress line shows
    assert records[0]["step"] == 1 and records[0]["loss"] == summary["first_loss"]
    assert f"loss {summary['first_loss']:.4f} (step 1)" in done[0]
    return summary


def test_torchrun_ddp(tmp_path):
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *ARGS]
    assert _run(cmd, tmp_path)["engine"] == "ddp"


@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="needs deepspeed")
def test_deepspeed_launcher_zero2(tmp_path):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *ARGS,
           "--engine=deepspeed", "--deepspeed_config=ds_configs/zero2.json"]  # fmt: skip
    summary = _run(cmd, tmp_path)
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 2


@pytest.mark.skipif(shutil.which("mpirun", path=str(BIN)) is None, reason="needs mpich wheel")
def test_mpirun_deepspeed_zero3(tmp_path):
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        cmd = [str(BIN / "mpirun"), "-n", "2", sys.executable, *ARGS, "--engine=deepspeed",
               "--deepspeed_config=ds_configs/zero3.json"]  # fmt: skip
        summary = _run(cmd, tmp_path)
    finally:
        os.environ.pop("MASTER_PORT", None)
    assert summary["world_size"] == 2
