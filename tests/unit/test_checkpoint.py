"""Checkpoints of the single-process loop: manifest, atomicity, --resume auto / PATH, wrong-run
errors, pruning, the run's outputs (metrics.jsonl, TensorBoard, plot) and the CLI forms."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from frugal_dist.train import checkpoint
from frugal_dist.train.config import apply_overrides, build_config
from frugal_dist.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
BASE = {"model": "tiny", "seq_len": 32, "batch_size": 2, "max_steps": 6, "warmup_steps": 1,
        "log_every": 1, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 2,
        "keep_checkpoints": 0, "engine": "single",
        "optimizer": {"density": 0.5, "update_gap": 2}}  # fmt: skip


def _cfg(out: Path, **kw):
    return build_config({**BASE, "output_dir": str(out), **kw})


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run: its outputs and final weights."""
    out = tmp_path_factory.mktemp("full")
    summary = train(_cfg(out))
    return out, summary, torch.load(_step_dir(out, 6) / "model.pt")


def test_manifest_lists_every_file_with_its_checksum(full_run):
    out, _, _ = full_run
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    manifest, reason = checkpoint.verify(_step_dir(out, 6))
    assert reason is None
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    assert manifest["engine"] == "single" and manifest["tokens"] == 6 * 2 * 32
    assert set(manifest["files"]) == {"model.pt", "optim.pt", "trainer.pt"}
    for rel, info in manifest["files"].items():
        assert checkpoint.sha256_file(_step_dir(out, 6) / rel) == info["sha256"]
    assert manifest["fingerprint"]["optimizer.density"] == 0.5


def test_outputs_metrics_tensorboard_and_plot(full_run):
    out, summary, _ = full_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"step", "tokens", "loss", "lr", "tokens_per_s", "mem_gib"} <= set(r)
        assert r["mem_gib"] > 0
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["val_ppl"] == pytest.approx(torch.tensor(evals[-1]["val_loss"]).exp().item())
    assert [r["loss"] for r in records] == summary["losses"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    if importlib.util.find_spec("matplotlib") is not None:
        png = (out / "curves.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_auto_skips_corrupted_truncated_and_temp(full_run, tmp_path, capsys):
    src, _, final = full_run
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(src / "metrics.jsonl", tmp_path / "metrics.jsonl")
    blob = bytearray((_step_dir(tmp_path, 6) / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one flipped byte
    (_step_dir(tmp_path, 6) / "model.pt").write_bytes(bytes(blob))
    optim = _step_dir(tmp_path, 4) / "optim.pt"
    optim.write_bytes(optim.read_bytes()[:100])  # truncated
    half = tmp_path / "checkpoints" / ".tmp_step_00000008"  # a save that died half-way
    half.mkdir()
    (half / "model.pt").write_bytes(b"partial")
    assert checkpoint.find_latest(tmp_path / "checkpoints", report=lambda s: None) == _step_dir(
        tmp_path, 2
    )
    capsys.readouterr()
    summary = train(_cfg(tmp_path, resume="auto"))
    log = capsys.readouterr().out
    assert "step_00000006: file model.pt fails its sha256 check (corrupted)" in log
    assert "step_00000004: file optim.pt has 100 bytes" in log and "truncated" in log
    assert "resuming from" in log and "step_00000002 (step 2" in log
    assert summary["steps"] == 4  # steps 3..6
    got = torch.load(_step_dir(tmp_path, 6) / "model.pt")
    for name, t in final.items():
        assert torch.equal(got[name], t), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # records after step 2 were replaced, not duplicated


def test_resume_path_must_verify(full_run, tmp_path):
    src, _, _ = full_run
    ckpt = tmp_path / "step_00000004"
    shutil.copytree(_step_dir(src, 4), ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        train(_cfg(tmp_path / "run", resume=str(ckpt)))


def test_checkpoint_of_another_run_names_the_fields(full_run, tmp_path):
    src, _, _ = full_run
    cfg = _cfg(tmp_path, resume=str(_step_dir(src, 4)), seed=1,
               optimizer={"density": 0.25, "update_gap": 2})  # fmt: skip
    with pytest.raises(ValueError, match="another run") as err:
        train(cfg)
    msg = str(err.value)
    assert "optimizer.density: checkpoint 0.5, now 0.25" in msg and "seed: checkpoint 0" in msg
    assert "update_gap" not in msg


def test_replicated_engines_resume_each_other_and_others_name_a_working_fix(full_run):
    src, _, _ = full_run
    path = _step_dir(src, 4)
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = _cfg(src)
    checkpoint.check_compatible(manifest, cfg, "ddp", path)  # single -> ddp: accepted
    checkpoint.check_compatible({**manifest, "engine": "ddp"}, cfg, "single", path)
    with pytest.raises(ValueError, match="--engine=ddp .* or --engine=single"):
        checkpoint.check_compatible(manifest, cfg, "fsdp2", path)
    with pytest.raises(ValueError, match="resume with --engine=fsdp2$"):
        checkpoint.check_compatible({**manifest, "engine": "fsdp2"}, cfg, "ddp", path)


def test_keep_checkpoints_prunes_oldest(tmp_path):
    train(_cfg(tmp_path, max_steps=4, checkpoint_every=1, keep_checkpoints=2, eval_every=0))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]


def test_cli_accepts_space_separated_and_hyphenated_keys():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "launchers" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tokens = cli.join_values(["--resume", "auto", "--max-steps", "7", "--output-dir", "runs/x",
                              "--seed=3", "--optimizer.lr", "0.01"])  # fmt: skip
    cfg = build_config(apply_overrides({}, tokens))
    assert (cfg.resume, cfg.max_steps, cfg.output_dir, cfg.seed) == ("auto", 7, "runs/x", 3)
    assert cfg.optimizer["lr"] == 0.01
    with pytest.raises(ValueError, match="keep_checkpoints must be an integer >= 0"):
        build_config({"keep_checkpoints": -1})
