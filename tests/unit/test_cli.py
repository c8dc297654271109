"""The launcher's command line is generated from one schema (issue 20, item 1): ``--help`` shows
every key -- the run's, the optimizer's and the data's -- with a one-line description, its choices
and its default; flags and YAML files go through the same validation."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from frugal_dist.optim.rso import RSO_DEFAULTS
from frugal_dist.optim.rso_layers import LAYER_KEYS
from frugal_dist.optim.validation import CHOICES
from frugal_dist.train.config import TrainConfig, build_config, load_config
from frugal_dist.train.config_cli import (
    DATA_KEYS,
    OPTIMIZER_KEYS,
    build_parser,
    field_info,
    parse_command_line,
)
from frugal_dist.train.config_validation import frugal_keywords
from frugal_dist.train.pipeline import ALL_KEYS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def help_text() -> str:
    return build_parser().format_help()


def _entry(help_text: str, option: str) -> str:
    """The help of ``option``: its line(s) up to the next option."""
    m = re.search(rf"^  {re.escape(option)}[ ,].*?(?=^  --|\Z)", help_text, flags=re.M | re.S)
    assert m, option
    return " ".join(m.group(0).split())


def test_every_key_is_documented_in_the_tables():
    """A new FRUGAL keyword, RSO option or data key must get a help line (this fails otherwise)."""
    opt_keys = frugal_keywords() | set(RSO_DEFAULTS) | set(LAYER_KEYS) | {"name"}
    assert opt_keys <= set(OPTIMIZER_KEYS), sorted(opt_keys - set(OPTIMIZER_KEYS))
    assert set(ALL_KEYS) <= set(DATA_KEYS), sorted(set(ALL_KEYS) - set(DATA_KEYS))
    for f in dataclasses.fields(TrainConfig):
        assert field_info(f.name).description, f.name


def test_help_shows_every_key_with_description_choices_default(help_text):
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("optimizer", "data"):
            continue
        entry = _entry(help_text, f"--{f.name}")
        assert "(default: " in entry and len(entry) > len(f.name) + 20, entry
    for key in OPTIMIZER_KEYS.keys() - {"rso"}:
        assert "(default: " in _entry(help_text, f"--optimizer.{key}"), key
    for key in DATA_KEYS:
        assert "(default: " in _entry(help_text, f"--data.{key}"), key
    assert "{auto, single, ddp, fsdp2, fsdp1, fairscale, deepspeed}" in _entry(
        help_text, "--engine"
    )
    assert "{60m, 130m, 350m, 1b, 7b, tiny" in _entry(help_text, "--model")
    assert "{float32, bfloat16}" in _entry(help_text, "--dtype")
    assert "{none, bfloat16}" in _entry(help_text, "--autocast")
    sub = _entry(help_text, "--optimizer.subspace")
    assert "{" + ", ".join(CHOICES["subspace"]) + "}" in sub and "[frugal]" in sub
    assert "{embedded, files, hf}" in _entry(help_text, "--data.source")
    assert "[files]" in _entry(help_text, "--data.train_files")
    assert "(default: 0.003)" in _entry(help_text, "--optimizer.lr")  # the run's default lr


def test_help_runs_from_the_launcher():
    out = subprocess.run([sys.executable, "launchers/train.py", "--help"], cwd=ROOT, text=True,
                         capture_output=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--optimizer.update_gap" in out.stdout and "--data.val_fraction" in out.stdout


def test_space_separated_hyphenated_and_dotted_flags():
    files, overrides = parse_command_line(
        ["--config", "configs/tiny-cpu.yaml", "--resume", "auto", "--max-steps", "7",
         "--output-dir", "runs/x", "--seed=3", "--optimizer.lr", "1e-2", "--warmup-steps", "2",
         "--optimizer.betas", "[0.9, 0.95]", "--data.max-bytes", "1000"]
    )  # fmt: skip
    cfg = load_config(files, overrides)
    assert (cfg.resume, cfg.max_steps, cfg.output_dir, cfg.seed) == ("auto", 7, "runs/x", 3)
    assert cfg.optimizer["lr"] == 0.01 and cfg.optimizer["betas"] == [0.9, 0.95]  # 1e-2: a number
    assert cfg.data["max_bytes"] == 1000


def test_flags_and_files_share_the_validation():
    files, overrides = parse_command_line(["--max_stepz", "3"])
    with pytest.raises(ValueError, match=r"unknown config key 'max_stepz'.*'max_steps'"):
        load_config(files, overrides)
    files, overrides = parse_command_line(["--max_step", "3"])  # no silent prefix matching
    with pytest.raises(ValueError, match=r"unknown config key 'max_step'.*'max_steps'"):
        load_config(files, overrides)
    files, overrides = parse_command_line(["--engine", "fsdp3"])
    with pytest.raises(
        ValueError, match=r"^engine must be one of \['auto', 'single', .*got 'fsdp3'"
    ):
        load_config(files, overrides)
    with pytest.raises(ValueError, match=r"^max_steps must be an integer >= 1, got 0$"):
        build_config({"max_steps": 0})
    with pytest.raises(ValueError, match=r"^min_lr_ratio must be a finite number >= 0 and <= 1"):
        build_config({"min_lr_ratio": "0.1"})  # strict: a string is not a number
    with pytest.raises(
        ValueError, match=r"^seed must be an integer >= 0 and < 9223372036854775808"
    ):
        build_config({"seed": True})
    with pytest.raises(ValueError, match=r"^output_dir must be a string or null, got 1$"):
        build_config({"output_dir": 1})
    with pytest.raises(ValueError, match="keep_checkpoints must be an integer >= 0"):
        build_config({"keep_checkpoints": -1})


def test_a_data_source_switch_on_the_command_line_drops_the_old_sources_keys(tmp_path):
    files, overrides = parse_command_line(
        ["--config", "configs/tiny-cpu.yaml", "--data.source", "files",
         "--data.train_files", str(tmp_path / "*.jsonl")]
    )  # fmt: skip
    cfg = load_config(files, overrides)
    assert cfg.data["source"] == "files" and "max_bytes" not in cfg.data
