"""``data.test_files``: a test split evaluated once after the last step (issue 19's protocol).

Fast, offline, no /work/shared: tiny text / JSONL corpora in ``tmp_path``, the byte tokenizer and
the ``tiny`` model on the CPU. The world-size > 1 case is in
``tests/distributed/test_simulated_ranks.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from frugal_dist.train import loop
from frugal_dist.train.config import build_config
from frugal_dist.train.pipeline import build_data, validate_data_config

DOCS = [f"doc {i:03d}: " + "abcdefgh"[i % 8] * (5 + 7 * (i % 5)) + " end." for i in range(90)]


def _corpus(tmp_path: Path) -> dict[str, str]:
    """Train (two JSONL files), val (JSONL) and test (a blank-line separated .txt) splits."""
    for k in range(2):
        with open(tmp_path / f"train-{k}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in DOCS[k * 30 : (k + 1) * 30])
    with open(tmp_path / "val.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in DOCS[60:75])
    (tmp_path / "test.txt").write_text("\n\n".join(d.upper() for d in DOCS[75:]) + "\n")
    return {"source": "files", "train_files": str(tmp_path / "train-*.jsonl"),
            "val_files": str(tmp_path / "val.jsonl"), "test_files": str(tmp_path / "test.txt"),
            "txt_split": "blank_line"}  # fmt: skip


def _cfg(tmp_path: Path, data: dict, **extra):
    return build_config({
        "model": "tiny", "seq_len": 16, "batch_size": 2, "max_steps": 4, "warmup_steps": 1,
        "eval_every": 2, "eval_batches": 3, "log_every": 1, "output_dir": str(tmp_path / "run"),
        "optimizer": {"name": "adamw", "lr": 1e-3}, "data": data, **extra,
    })  # fmt: skip


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_test_loss_in_the_final_record_equals_evaluate_on_the_test_split(tmp_path, monkeypatch):
    data = _corpus(tmp_path)
    cfg = _cfg(tmp_path, data)
    calls = []
    real_evaluate = loop.evaluate

    def spy(model, split, *args):
        calls.append((model, split))
        return real_evaluate(model, split, *args)

    monkeypatch.setattr(loop, "evaluate", spy)
    summary = loop.train(cfg)
    records = _records(tmp_path)
    last = records[-1]
    assert last["step"] == 4 and math.isfinite(last["test_loss"])
    assert last["test_ppl"] == pytest.approx(math.exp(last["test_loss"]))
    assert [r["step"] for r in records if "test_loss" in r] == [4]  # once, after the last step
    assert summary["test_loss"] == last["test_loss"]
    assert len(calls) == 3  # val at steps 2 and 4, then test once
    model, split = calls[-1]
    # the split evaluated is the test files' (seed + 2), not validation's; the same evaluate()
    # on the final model and a freshly built test split gives the logged value exactly
    fresh = build_data(cfg.data, cfg.seq_len, seed=cfg.seed).test
    assert np.array_equal(np.asarray(split.sequences), np.asarray(fresh.sequences))
    assert split.seed == cfg.seed + 2 and calls[-2][1] is not split
    again = real_evaluate(model, fresh, cfg, 0, 1, torch.device("cpu"))
    assert again == last["test_loss"]
    assert again != last["val_loss"]  # a different split (upper-cased documents)


def test_without_test_files_nothing_changes(tmp_path):
    data = _corpus(tmp_path)
    del data["test_files"]
    summary = loop.train(_cfg(tmp_path, data, eval_every=0))
    assert "test_loss" not in summary
    assert not any("test_loss" in r or "test_ppl" in r for r in _records(tmp_path))
    assert build_data(data, 16).test is None


def test_test_split_evaluated_even_without_validation_evals(tmp_path):
    summary = loop.train(_cfg(tmp_path, _corpus(tmp_path), eval_every=0))
    last = _records(tmp_path)[-1]
    assert "val_loss" not in last and last["test_loss"] == summary["test_loss"]


def test_bad_test_files_name_the_field_before_training(tmp_path):
    data = _corpus(tmp_path)
    cfg = _cfg(tmp_path, {**data, "test_files": str(tmp_path / "missing-*.jsonl")})
    with pytest.raises(ValueError, match=r"data\.test_files: no file matches .*missing-\*"):
        loop.train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
    with pytest.raises(ValueError, match=r"data\.test_files: files also in val_files"):
        build_data({**data, "test_files": data["val_files"]}, 16)
    with pytest.raises(ValueError, match=r"data\.test_files: files also in train_files"):
        build_data({**data, "test_files": [data["train_files"]]}, 16)
    with pytest.raises(ValueError, match=r"data\.test_files: is empty"):
        validate_data_config({**data, "test_files": []})
    (tmp_path / "short.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data\.test_files: the test split has 2 tokens"):
        build_data({**data, "test_files": str(tmp_path / "short.txt")}, 16)
    # no natural test split in the embedded corpus or HF datasets: the key is refused there
    with pytest.raises(ValueError, match=r"data\.test_files: is only used with source \['files'\]"):
        validate_data_config({"source": "embedded", "test_files": data["test_files"]})
    with pytest.raises(ValueError, match=r"data\.test_files: is only used with source"):
        validate_data_config({"source": "hf", "name": "json", "test_files": "x.jsonl"})
