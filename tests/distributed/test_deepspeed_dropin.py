"""``import frugal_dist.deepspeed as deepspeed`` in a conventional DeepSpeed script
(``add_config_arguments``, ``init_distributed``, ``initialize(args=...)`` with
``args.deepspeed_config``), run by the ``deepspeed`` launcher on 2 CPU ranks (issue 20, item 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from tests.distributed.launch import free_port  # noqa: E402

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DS = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
      "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
      "zero_allow_untested_optimizer": True, "steps_per_print": 10**6,
      "optimizer": {"type": "FRUGAL",
                    "params": {"lr": 0.01, "density": 0.5, "update_gap": 4}}}  # fmt: skip


@pytest.mark.skipif(shutil.which("deepspeed", path=str(BIN)) is None, reason="needs deepspeed")
def test_conventional_deepspeed_script(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(DS))
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/distributed/ds_conventional_script.py", "--deepspeed",
           "--deepspeed_config", str(config), "--result", str(result)]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["optimizer"] == "FRUGAL" and got["layout"] == "flat"  # bound to ZeRO-2's flats
    assert (got["density"], got["lr"]) == (0.5, 0.01)  # from args.deepspeed_config's section
    assert got["deepspeed_config"] == str(config) and got["world"] == 2  # args left as given
    losses = got["losses"]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses
