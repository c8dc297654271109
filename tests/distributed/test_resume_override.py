"""Resume with a new lr and a longer schedule through the real entry point (2-process torchrun,
gloo, DDP; issue 20, item 4).

The step-4 checkpoint of an 8-step run (lr 3e-3) is resumed with ``--optimizer.lr=1e-3
--max-steps=10``:

* without ``--resume_override`` the launch is refused: one ``error:`` line on rank 0 that names
  the fields and the flag to add, exit code 2 on both ranks;
* with the flag the error suggested, applied literally, it runs: rank 0 logs one notice naming
  each field old -> new, the logged param-group lr is 1e-3 times the new schedule (warm-up 2,
  cosine to step 10) from step 5 on, and steps 1-5 keep the checkpoint's run's losses;
* the trajectory equals that of a run whose checkpoint recorded lr 1e-3 and max_steps 10 (its
  manifest rewritten, resumed without any override): the override is the lr from the resume
  step on, nothing else (the single-process test in ``tests/unit/test_resume_override.py``
  checks the same against a hand-written continuation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frugal_dist.train.schedule import lr_factor
from tests.distributed.test_resume import CKPT, ROOT, STEPS, _launch, _losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
BIN = Path(sys.executable).parent
LR2, STEPS2 = 1e-3, 10
NEW = ["--resume=auto", f"--optimizer.lr={LR2}", f"--max-steps={STEPS2}"]


def _launch_any_code(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``test_resume._launch``'s 2-rank ddp command, without asserting success."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
           "launchers/train.py", "--model=tiny", "--seq_len=32", "--batch_size=3",
           f"--max-steps={STEPS}", "--warmup_steps=2", "--log_every=1", "--eval_every=0",
           f"--checkpoint_every={CKPT}", "--keep_checkpoints=0", "--output-dir", str(out),
           "--optimizer.density=0.5", "--optimizer.update_gap=3", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FRUGAL_DIST_TRACEBACK", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=180)


def _copy_checkpoint(ref: Path, out: Path) -> Path:
    name = f"step_{CKPT:08d}"
    shutil.copytree(ref / "checkpoints" / name, out / "checkpoints" / name)
    shutil.copy(ref / "metrics.jsonl", out / "metrics.jsonl")
    return out / "checkpoints" / name


def _records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_new_lr_on_resume_refused_then_overridden(tmp_path):
    ref = tmp_path / "ref"
    _launch(2, ref, "ddp")  # uninterrupted, lr 3e-3: checkpoints at steps 4 and 8

    out = tmp_path / "override"
    _copy_checkpoint(ref, out)
    refused = _launch_any_code(out, *NEW)
    text = refused.stdout + refused.stderr
    ours = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(ours) == 1, text  # rank 0 only
    assert re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", text, flags=re.M) == ["2", "2"], text
    assert "optimizer.lr: checkpoint 0.003, now 0.001" in ours[0], ours[0]
    fix = re.search(r"--resume_override=[\w.,]+", ours[0]).group(0)
    assert fix == "--resume_override=optimizer.lr,max_steps", ours[0]

    res = _launch(2, out, "ddp", *NEW, fix)  # the suggested flag, literally
    notices = [ln for ln in res.stdout.splitlines() if "resume_override:" in ln]
    assert len(notices) == 1, res.stdout[-3000:]  # once, on rank 0
    assert "optimizer.lr 0.003 -> 0.001" in notices[0] and "max_steps 8 -> 10" in notices[0]
    got, want = _records(out), _losses(ref)
    assert sorted(got) == list(range(1, STEPS2 + 1))
    for step in range(CKPT + 1, STEPS2 + 1):  # param groups follow lr2's new schedule
        lr = LR2 * lr_factor(step - 1, 2, STEPS2, 0.1)
        assert got[step]["lr"] == pytest.approx(lr, rel=1e-12), (step, got[step]["lr"], lr)
    # step 5's loss is computed before the first update with the new lr
    assert [got[s]["loss"] for s in range(1, CKPT + 2)] == [want[s] for s in range(1, CKPT + 2)]
    assert all(got[s]["loss"] != want[s] for s in range(CKPT + 2, STEPS + 1))

    # the same run from a checkpoint that recorded lr2 / max_steps 10 itself (no override)
    other = tmp_path / "recorded"
    ckpt = _copy_checkpoint(ref, other)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["config"]["optimizer"]["lr"] = LR2
    manifest["config"]["max_steps"] = STEPS2
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    plain = _launch(2, other, "ddp", *NEW)
    assert "resume_override:" not in plain.stdout
    assert _losses(other) == _losses(out)
    final = f"step_{STEPS2:08d}"
    w_a = torch.load(out / "checkpoints" / final / "model.pt")
    w_b = torch.load(other / "checkpoints" / final / "model.pt")
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
