"""RSO app checkpoints under DeepSpeed (DeepSpeed's own format in ``deepspeed_native/``).

* exact resume: an uninterrupted 2-rank ZeRO-2 RSO run through ``launchers/train.py``
  (``inner_steps=2``, checkpoints every 4 steps) is the reference; its step-4 checkpoint is copied
  into a fresh run directory and ``--resume auto`` continues from it. Step 4 ends an outer
  iteration under ZeRO-2, so the merge ``W += B P^T`` is still pending (lazy, at the next
  forward): the resumed run needs the module's W, B and ``rso_outer`` and the optimizer's outer
  counter. Deterministic CPU at the same world size: the losses of steps 5..8 and the final module
  state (W, B, ``rso_outer``) must be equal bit for bit. Wall time: two launches, ~30 s idle.
* a different world size is refused with a ``ValueError`` naming the ranks to use (checked
  before DeepSpeed is touched, in-process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frugal_dist.engines import deepspeed_checkpoint as dsc
from frugal_dist.optim.rso import build_rso
from frugal_dist.train import checkpoint_engines as ce
from frugal_dist.train.model import build_model

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS, CKPT = 8, 4
HAS_DS = importlib.util.find_spec("deepspeed") is not None


def _launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "launchers/train.py",
           "--model=tiny", "--config", "configs/presets/rso.yaml", "--seq_len=32",
           "--batch_size=3", f"--max-steps={STEPS}", "--warmup_steps=2", "--log_every=1",
           "--eval_every=0", f"--checkpoint_every={CKPT}", "--keep_checkpoints=0",
           "--output-dir", str(out), "--optimizer.lr=0.01", "--optimizer.inner_steps=2",
           "--engine=deepspeed", "--deepspeed_config=ds_configs/zero2.json", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _module_state(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    native = out / "checkpoints" / f"step_{step:08d}" / dsc.DS_NATIVE / dsc.DS_TAG
    blob = torch.load(native / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)  # fmt: skip
    return blob["module"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not HAS_DS, reason="needs deepspeed")
def test_zero2_rso_resume_auto_is_exact(tmp_path):
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    _launch(ref)
    meta = json.loads((ref / "checkpoints" / f"step_{CKPT:08d}" / dsc.DS_NATIVE /
                       "meta.json").read_text())  # fmt: skip
    assert meta == {"world_size": 2, "zero_stage": 2}
    src = ref / "checkpoints" / f"step_{CKPT:08d}"
    shutil.copytree(src, resumed / "checkpoints" / src.name)
    res = _launch(resumed, "--resume", "auto")
    assert "resuming from" in res.stdout and "step 4" in res.stdout, res.stdout[-2000:]
    got, want = _losses(resumed), _losses(ref)
    assert [got[s] for s in range(CKPT + 1, STEPS + 1)] == [
        want[s] for s in range(CKPT + 1, STEPS + 1)
    ]
    assert want[STEPS] < want[1]  # it trains
    at_ckpt, w_got, w_ref = _module_state(ref, CKPT), _module_state(resumed), _module_state(ref)
    assert w_got.keys() == w_ref.keys()
    outer = [n for n in w_ref if n.endswith("rso_outer")]
    frozen = [n for n in w_ref if n.endswith("q_proj.weight")]
    assert outer and frozen
    # saved at step 4 with the second merge pending; 8 steps / inner_steps 2 = 4 merges requested,
    # the one after step 8 is pending at the end
    assert all(at_ckpt[n].item() == 1 and w_ref[n].item() == 3 for n in outer)
    assert all(not torch.equal(at_ckpt[n], w_ref[n]) for n in frozen)  # W moved by the merges
    for name in w_ref:
        assert torch.equal(w_got[name], w_ref[name]), name


def test_rso_deepspeed_checkpoint_needs_the_same_world_size(tmp_path):
    model = build_model("tiny", max_seq_len=16, n_layers=1)
    rso = build_rso(model, density=0.25, inner_steps=2)
    (tmp_path / dsc.DS_NATIVE).mkdir()
    (tmp_path / dsc.DS_NATIVE / "meta.json").write_text('{"world_size": 2, "zero_stage": 2}')
    with pytest.raises(ValueError, match="resume it with 2 ranks"):
        ce.load_engine_state(tmp_path, "deepspeed", model, rso, None, saved_world=2, rank=0,
                             world=3)  # fmt: skip
