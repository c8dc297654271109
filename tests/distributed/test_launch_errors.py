"""Input errors under a real 2-process torchrun launch: one clean line on rank 0 naming the file
and the field, exit code 2 on every rank, no traceback from frugal_dist (issue 20, item 2).

torchrun adds its own failure report (the ``ChildFailedError`` box with each rank's exit code);
these tests read the exit codes from it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import free_port

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BASE = ["launchers/train.py", "--config", "configs/tiny-cpu.yaml", "--max_steps=2",
        "--warmup_steps=0"]  # fmt: skip


def _launch(tmp_path: Path, *extra: str) -> tuple[list[str], list[str], str]:
    """(our ``error:`` lines, every rank's exit code from torchrun's report, whole output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FRUGAL_DIST_TRACEBACK", None)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *BASE,
           f"--output_dir={tmp_path / 'run'}", *extra]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    ours = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", text, flags=re.M)  # the report box
    # no frame of frugal_dist or the launcher: the only traceback is torchrun's own report
    assert not re.search(r'File ".*(frugal_dist|launchers)/', text), text
    return ours, codes, text


def _check(tmp_path: Path, extra: list[str], *must: str) -> str:
    ours, codes, text = _launch(tmp_path, *extra)
    assert len(ours) == 1, text  # once, not once per rank
    assert codes == ["2", "2"], text  # every rank
    for part in must:
        assert part in ours[0], ours[0]
    return ours[0]


def test_unknown_key(tmp_path):
    _check(tmp_path, ["--max_stepz=3"], "'max_stepz'", "Did you mean 'max_steps'")


def test_corrupt_deepspeed_json_names_the_file(tmp_path):
    bad = tmp_path / "zero2.json"
    bad.write_text('{"train_batch_size": 8,\n "zero_optimization": {"stage": 2,}\n}\n')
    line = _check(tmp_path, ["--engine=deepspeed", f"--deepspeed_config={bad}"], str(bad),
                  "not valid JSON at line 2", "deepspeed_config")  # fmt: skip
    assert "Traceback" not in line


def test_missing_deepspeed_json(tmp_path):
    _check(tmp_path, ["--engine=deepspeed", f"--deepspeed_config={tmp_path}/none.json"],
           "deepspeed_config=", "does not exist")  # fmt: skip


def test_corrupt_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\noptimizer:\n  lr: 0.1\n name: x\n")
    _check(tmp_path, ["--config", str(bad)], str(bad), "not valid YAML at line 4")


def test_missing_data_file(tmp_path):
    _check(tmp_path, ["--data.source=files", f"--data.train_files={tmp_path}/none.jsonl"],
           "data.train_files", "no file matches", "none.jsonl")  # fmt: skip


def test_empty_training_file_says_what_can_fix_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _check(tmp_path, ["--data.source=files", f"--data.train_files={empty}"],
                  "data.train_files", "empty.jsonl", "data.text_field")  # fmt: skip
    assert "val_fraction" not in line  # raising it cannot give the training split any text


def test_engine_single_under_a_multi_rank_launch(tmp_path):
    """engine=single would train each rank alone (no gradient reduction): refused."""
    line = _check(tmp_path, ["--engine=single"], "engine='single'", "2 ranks", "--engine=ddp",
                  "run one process")  # fmt: skip
    assert "WORLD_SIZE=2" in line


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_other_launchers_print_once_and_exit_2(tmp_path, launcher):
    """The DeepSpeed launcher and MPICH's mpirun report the job's exit code, not each rank's."""
    if shutil.which(launcher, path=str(BIN)) is None:
        pytest.skip(f"needs {launcher}")
    bad = tmp_path / "zero2.json"
    bad.write_text('{"zero_optimization": {"stage": 2}\n "bf16": {}}\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MASTER_PORT": str(free_port())}  # fmt: skip
    env.pop("FRUGAL_DIST_TRACEBACK", None)
    head = {"deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port",
                          str(free_port())],
            "mpirun": [str(BIN / "mpirun"), "-n", "2", sys.executable]}[launcher]  # fmt: skip
    cmd = [*head, *BASE, "--engine=deepspeed", f"--deepspeed_config={bad}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    text = out.stdout + out.stderr
    ours = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert out.returncode == 2, text
    assert len(ours) == 1 and str(bad) in ours[0] and "not valid JSON at line 2" in ours[0], text
    assert not re.search(r'File ".*(frugal_dist|launchers)/', text), text
