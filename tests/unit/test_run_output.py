"""What a run prints and writes (issue 20, items 5 and 6): a short summary whose first_loss is the
step-1 loss shown, console lines through the ``logging`` module, TensorBoard and W&B scalars with
validation under ``val/``, W&B optional (lazy import, clear error when missing), and the config
mistakes that used to run silently."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from frugal_dist.train.config import build_config
from frugal_dist.train.logs import logger
from frugal_dist.train.loop import train

BASE = {"model": "tiny", "seq_len": 32, "batch_size": 2, "max_steps": 4, "warmup_steps": 1,
        "log_every": 3, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 0,
        "engine": "single", "data": {"max_bytes": 20_000}}  # fmt: skip


class FakeRun:
    def __init__(self, **kwargs) -> None:
        self.init = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs: list[FakeRun] = []
    module = types.ModuleType("wandb")
    module.__spec__ = types.SimpleNamespace(name="wandb")  # find_spec sees an installed package

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_short_summary_and_consistent_first_loss(tmp_path, capsys):
    summary = train(build_config({**BASE, "output_dir": str(tmp_path)}))
    out = capsys.readouterr().out
    done = [ln for ln in out.splitlines() if ln.startswith("[frugal_dist] done: ")]
    assert len(done) == 1 and len(done[0]) < 300 and "[" not in done[0][14:], done
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # first, eval, log_every, eval + last
    assert summary["first_loss"] == records[0]["loss"]
    assert summary["last_loss"] == records[-1]["loss"]
    assert f"loss {records[0]['loss']:.4f} (step 1)" in done[0]
    assert f"step     1/4 | loss {records[0]['loss']:.4f}" in out  # the line the user saw
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["first_loss"] == summary["first_loss"] and "losses" not in written


def test_console_lines_go_through_logging(tmp_path, capsys):
    level = logger.level
    logger.setLevel(logging.INFO)  # the application's choices (handler, level) are kept
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    own = Keep()
    saved = logger.handlers[:]
    logger.handlers[:] = [own]  # the application configured the logger: no handler is added
    try:
        train(build_config({**BASE, "output_dir": str(tmp_path)}))
    finally:
        logger.handlers[:] = saved
        logger.setLevel(level)
    assert any(r.getMessage().startswith("done: ") for r in seen)
    assert any(r.getMessage().startswith("step     1/4") for r in seen)
    assert "done: " not in capsys.readouterr().out  # nothing bypasses logging with print


def test_validation_is_under_val_tags_in_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    train(build_config({**BASE, "output_dir": str(tmp_path)}))
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/loss", "val/ppl", "train/loss", "train/lr"} <= tags
    assert not {"train/val_loss", "train/val_ppl"} & tags
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]


def test_wandb_logger_offline(tmp_path, fake_wandb):
    cfg = build_config({**BASE, "output_dir": str(tmp_path / "run7"), "wandb_project": "frugal"})
    train(cfg)
    (run,) = fake_wandb
    assert run.init["project"] == "frugal" and run.init["mode"] == "offline"
    assert run.init["name"] == "run7" and run.init["dir"] == str(tmp_path / "run7")
    assert run.init["config"]["max_steps"] == 4 and run.finished
    by_step = dict((step, data) for data, step in run.logged)
    assert sorted(by_step) == [1, 2, 3, 4]
    assert "val/loss" in by_step[2] and "train/loss" in by_step[2] and "val/loss" not in by_step[3]


def test_wandb_missing_is_a_clear_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with pytest.raises(ValueError, match=r"wandb_project='p' needs the wandb package: pip install"):
        build_config({"wandb_project": "p"})
    with pytest.raises(ValueError, match=r"wandb_mode must be one of \['offline', 'online'\]"):
        build_config({"wandb_mode": "cloud"})


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("wandb") is None, reason="needs wandb installed"
)
def test_real_wandb_offline_writes_a_run_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    train(build_config({**BASE, "output_dir": str(tmp_path), "wandb_project": "frugal-test"}))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match=r"warmup_steps=30 is more than max_steps=10.*<= max"):
        build_config({"max_steps": 10, "warmup_steps": 30})
    assert build_config({"max_steps": 10, "warmup_steps": 10}).warmup_steps == 10


def test_missing_yaml_path_is_named(tmp_path):
    from frugal_dist.train.config import load_config

    with pytest.raises(ValueError, match=r"--config .*nope\.yaml: the file does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    assert Path(tmp_path).is_dir()
