"""Every file in configs/ loads and validates, alone and every optimizer preset on top of every
model config; the paper model shapes have the paper's parameter counts; merging rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frugal_dist.train.config import build_config, load_config
from frugal_dist.train.config_files import merge_configs, read_configs
from frugal_dist.train.model import build_model
from frugal_dist.train.optimizers import build_optimizer

ROOT = Path(__file__).resolve().parents[2] / "configs"
MODEL_CONFIGS = sorted(ROOT.glob("*.yaml"))
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
PAPER = {"60m": 10_000, "130m": 20_000, "350m": 60_000, "1b": 100_000, "7b": 150_000}


def test_the_expected_files_exist():
    assert {p.stem for p in MODEL_CONFIGS} >= {f"llama-{s}" for s in PAPER}
    assert {p.stem for p in PRESETS} == {"adamw", "galore", "badam", "frugal-block",
                                         "frugal-columns", "frugal-projection", "frugal-rho0",
                                         "frugal-plus", "rso"}  # fmt: skip


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_config_loads(path):
    cfg = load_config(str(path))
    if path.stem.startswith("llama-"):
        size = path.stem.split("-", 1)[1]
        assert cfg.model == size and cfg.seq_len == 256
        assert cfg.max_steps == PAPER[size]
        assert cfg.warmup_steps == cfg.max_steps // 10 and cfg.min_lr_ratio == 0.1
        assert cfg.optimizer["lr"] == 1e-3
        # 512 sequences per step on 8 ranks (the configs document how to keep it elsewhere)
        assert cfg.batch_size * cfg.grad_accum * 8 == 512


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("model", [p for p in MODEL_CONFIGS if p.stem.startswith("llama-")],
                         ids=lambda p: p.stem)  # fmt: skip
def test_preset_on_model_config_loads(model, preset):
    cfg = load_config([str(model), str(preset)])
    preset_opts = read_configs(preset)["optimizer"]
    for key, value in preset_opts.items():
        assert cfg.optimizer[key] == value  # the later file wins
    assert cfg.optimizer["lr"] == 1e-3  # the model config's lr carries over
    assert cfg.max_steps == load_config(str(model)).max_steps


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_its_optimizer(preset):
    """The preset's options are accepted by the optimizer itself (on the tiny model)."""
    opts = dict(load_config([str(ROOT / "tiny-cpu.yaml"), str(preset)]).optimizer)
    name = opts.pop("name")
    torch.manual_seed(0)
    model = build_model("tiny")
    opt = build_optimizer(model, name, **opts)
    assert opt.param_groups


def test_switching_optimizer_drops_the_old_optimizers_options():
    base = {"optimizer": {"name": "frugal", "lr": 0.002, "density": 0.0, "update_gap": 500}}
    out = merge_configs(base, {"optimizer": {"name": "adamw"}})
    assert out["optimizer"] == {"name": "adamw", "lr": 0.002}
    same = merge_configs(base, {"optimizer": {"name": "frugal", "density": 0.5}})
    assert same["optimizer"] == {"name": "frugal", "lr": 0.002, "density": 0.5, "update_gap": 500}


def test_overrides_apply_after_all_files():
    cfg = load_config([str(ROOT / "llama-60m.yaml"), str(ROOT / "presets" / "galore.yaml")],
                      ["--optimizer.density=0.5", "--max_steps=7", "--warmup_steps=0"])  # fmt: skip
    assert cfg.optimizer["density"] == 0.5 and cfg.max_steps == 7


def test_config_errors_name_the_key_and_the_allowed_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  name: frugal\n  subspace: blocks\n")
    with pytest.raises(ValueError, match=r"subspace.*\['block', 'coordinate', 'projection'\]"):
        load_config([str(ROOT / "llama-60m.yaml"), str(bad)])
    with pytest.raises(ValueError, match=r"engine must be one of .*'fsdp1', 'fairscale'"):
        build_config({"engine": "fsdp3"})
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_config(str(listy))


def _count(name: str) -> int:
    with torch.device("meta"):
        model = build_model(name)
    return sum(p.numel() for p in model.parameters())


def test_paper_model_shapes_have_the_paper_parameter_counts():
    # GaLore / FRUGAL Table: LLaMA 60M (58M with untied 32k embeddings) and 1B (1.34B).
    assert 55e6 < _count("60m") < 65e6
    assert 1.2e9 < _count("1b") < 1.4e9
