"""Resume with changed settings (issue 20, item 4; ``frugal_dist.train.resume_policy``).

* A new lr / schedule on resume is refused unless ``resume_override`` names it; the refusal's
  suggested flags work when applied literally; with the override rank 0 logs old -> new.
* The new lr takes effect: the resumed run equals an independent hand-written continuation from
  the checkpoint (model + optimizer state loaded, lr2 * the new schedule set on every param
  group before each step) bit for bit, and its logged param-group lr follows the new schedule.
* Structural changes (model, seed, density, data, ...) stay refused, and their suggested fix
  (the checkpoint's values as flags) resumes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from frugal_dist.train import checkpoint, resume_policy
from frugal_dist.train.config import apply_overrides, build_config, load_config
from frugal_dist.train.config_cli import build_parser
from frugal_dist.train.loop import train
from frugal_dist.train.model import build_model
from frugal_dist.train.optimizers import build_optimizer
from frugal_dist.train.pipeline import build_data
from frugal_dist.train.schedule import lr_factor

LR1, LR2 = 3e-3, 1e-3
BASE = {"model": "tiny", "seq_len": 32, "batch_size": 2, "max_steps": 6, "warmup_steps": 1,
        "log_every": 1, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 2,
        "keep_checkpoints": 0, "engine": "single",
        "optimizer": {"lr": LR1, "density": 0.5, "update_gap": 2}}  # fmt: skip


def _raw(out: Path, **kw) -> dict:
    return {**BASE, "output_dir": str(out), **kw}


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def _records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _resumable_copy(src: Path, dst: Path, step: int = 2) -> Path:
    shutil.copytree(_step_dir(src, step), _step_dir(dst, step))
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


def _suggested_flags(message: str, after: str) -> list[str]:
    """The ``--key=value`` flags a refusal suggests after the text ``after``."""
    tail = message.split(after, 1)[1]
    return re.findall(r"--[\w.]+=\S+?(?=[ ),;]|$)", tail.split(")")[0] + " ")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(build_config(_raw(out)))
    return out


def test_new_lr_refused_without_override_and_the_suggested_flag_works(full_run, tmp_path, capsys):
    out = _resumable_copy(full_run, tmp_path / "run")
    raw = apply_overrides(_raw(out, resume="auto"), ["--optimizer.lr=1e-3", "--max_steps=8"])
    with pytest.raises(ValueError) as err:
        train(build_config(raw))
    msg = str(err.value)
    assert "\n" not in msg
    assert "optimizer.lr: checkpoint 0.003, now 0.001" in msg and "max_steps: checkpoint 6" in msg
    assert "--resume_override=optimizer.lr,max_steps" in msg
    # the fix, applied literally as a command-line flag
    fix = re.search(r"--resume_override=\S+", msg).group(0).rstrip(";")
    capsys.readouterr()
    summary = train(build_config(apply_overrides(raw, [fix])))
    log = capsys.readouterr().out
    assert summary["first_step"] == 3 and summary["last_step"] == 8
    notice = [ln for ln in log.splitlines() if "resume_override" in ln]
    assert len(notice) == 1, log
    assert "optimizer.lr 0.003 -> 0.001" in notice[0] and "max_steps 6 -> 8" in notice[0]
    assert notice[0].startswith("[frugal_dist] ")  # the frugal_dist logger, not print


def test_keeping_the_checkpoints_values_is_the_other_suggested_fix(full_run, tmp_path):
    out = _resumable_copy(full_run, tmp_path / "run")
    raw = apply_overrides(_raw(out, resume="auto"), ["--log_every=2", "--warmup_steps=0"])
    with pytest.raises(ValueError) as err:
        train(build_config(raw))
    back = _suggested_flags(str(err.value), "set them back")
    assert sorted(back) == ["--log_every=1", "--warmup_steps=1"]
    summary = train(build_config(apply_overrides(raw, back)))
    assert summary["first_step"] == 3


def test_new_lr_takes_effect_in_param_groups_and_trajectory(full_run, tmp_path):
    """Resume at step 2 with lr2, max_steps 8, warmup 3 against a hand-written continuation."""
    out = _resumable_copy(full_run, tmp_path / "run")
    over = ["--optimizer.lr=1e-3", "--max_steps=8", "--warmup_steps=3",
            "--resume_override=optimizer.lr,max_steps,warmup_steps"]  # fmt: skip
    cfg = build_config(apply_overrides(_raw(out, resume="auto"), over))
    train(cfg)
    got = _records(out)
    for step in range(3, 9):  # the param groups' lr follows the new schedule from the resume on
        want = LR2 * lr_factor(step - 1, 3, 8, cfg.min_lr_ratio)
        assert got[step]["lr"] == pytest.approx(want, rel=1e-12), step
    for step in (1, 2):  # the checkpoint's part of the run is kept as it was
        assert got[step]["lr"] == pytest.approx(LR1 * lr_factor(step - 1, 1, 6, 0.1), rel=1e-12)

    # Oracle: the checkpoint's model + optimizer state, then lr2 from step 3 on, by hand.
    ckpt = _step_dir(full_run, 2)
    data = build_data(cfg.data, cfg.seq_len, seed=cfg.seed)
    model = build_model(cfg.model, max_seq_len=max(cfg.seq_len, 16), vocab_size=data.vocab_size)
    model.load_state_dict(torch.load(ckpt / "model.pt"))
    opt = build_optimizer(model, "frugal", lr=LR2, density=0.5, update_gap=2, seed=cfg.seed)
    opt.load_state_dict(torch.load(ckpt / "optim.pt", weights_only=False))
    losses = {}
    for step in range(2, 8):
        for g in opt.param_groups:
            g["lr"] = LR2 * lr_factor(step, 3, 8, cfg.min_lr_ratio)
        batch = data.train.batch(step, cfg.batch_size, 0, 1)
        _, loss = model(batch, labels=batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step + 1] = loss.item()
    assert [got[s]["loss"] for s in range(3, 9)] == [losses[s] for s in range(3, 9)]
    final = torch.load(_step_dir(out, 8) / "model.pt")
    for name, t in model.state_dict().items():
        assert torch.equal(final[name], t), name
    # and it is not the lr1 continuation: the full run's losses differ after the first update
    ref = _records(full_run)
    assert all(got[s]["loss"] != ref[s]["loss"] for s in range(4, 7))


def test_structural_changes_stay_refused_and_the_fix_resumes(full_run, tmp_path):
    out = _resumable_copy(full_run, tmp_path / "run")
    over = ["--seed=1", "--optimizer.density=0.25", "--optimizer.subspace=coordinate",
            "--resume_override=optimizer.lr"]  # fmt: skip
    raw = apply_overrides(_raw(out, resume="auto"), over)
    with pytest.raises(ValueError, match="belongs to another run") as err:
        train(build_config(raw))
    msg = str(err.value)
    assert "optimizer.density: checkpoint 0.5, now 0.25" in msg and "seed: checkpoint 0" in msg
    assert "optimizer.subspace: checkpoint None, now 'coordinate'" in msg
    assert "another output_dir" in msg
    # the fix: the checkpoint's values back, and a key it did not have dropped
    assert "drop optimizer.subspace" in msg
    back = _suggested_flags(msg, "set them back")
    assert sorted(back) == ["--optimizer.density=0.5", "--seed=0"]
    raw["optimizer"].pop("subspace")
    assert train(build_config(apply_overrides(raw, back)))["first_step"] == 3


def test_data_changes_are_structural(full_run, tmp_path):
    out = _resumable_copy(full_run, tmp_path / "run")
    raw = apply_overrides(_raw(out, resume="auto"), ["--data.max_bytes=100000"])
    with pytest.raises(ValueError, match=r"data.max_bytes: checkpoint \d+, now 100000"):
        train(build_config(raw))


def test_max_steps_below_the_checkpoint_is_refused(full_run):
    manifest = json.loads((_step_dir(full_run, 4) / "manifest.json").read_text())
    over = ["max_steps", "warmup_steps"]
    cfg = build_config(_raw(full_run, max_steps=3, warmup_steps=0, resume_override=over,
                            resume="auto"))  # fmt: skip
    with pytest.raises(ValueError, match="max_steps=3 is below .* --max_steps=4 or more"):
        checkpoint.check_compatible(manifest, cfg, "single", _step_dir(full_run, 4))


def test_resume_override_config_errors():
    base = ["--resume=auto", "--output_dir=x"]
    cfg = load_config(None, [*base, "--resume_override=optimizer.lr,max_steps"])
    assert cfg.resume_override == ["optimizer.lr", "max_steps"]
    assert build_config({"resume": "auto", "resume_override": ["log_every"]}).resume_override
    with pytest.raises(ValueError, match="'optimizer.density' cannot be overridden"):
        load_config(None, [*base, "--resume_override=optimizer.density"])
    with pytest.raises(ValueError, match="Did you mean 'max_steps'"):
        load_config(None, [*base, "--resume_override=max_step"])
    with pytest.raises(ValueError, match="only applies to a resumed run; add --resume=auto"):
        load_config(None, ["--resume_override=optimizer.lr"])
    with pytest.raises(ValueError, match="resume_override must be a list of names"):
        build_config({"resume": "auto", "resume_override": 3})
    assert "--resume_override KEYS" in build_parser().format_help()


@pytest.mark.parametrize(
    "key,value",
    [("seed", 0), ("optimizer.betas", [0.9, 0.95]), ("optimizer.subspace", "columns"),
     ("optimizer.fused", None), ("optimizer.reset_statistics", True), ("min_lr_ratio", 0.1),
     ("wandb_project", None), ("data.train_files", ["a.jsonl", "b.jsonl"])],
)  # fmt: skip
def test_suggested_flags_read_back_as_the_value(key, value):
    text = resume_policy.flag(key, value)
    section, _, sub = key.partition(".")
    raw = apply_overrides({}, [text])
    assert (raw[section][sub] if sub else raw[key]) == value, text
