"""Training configuration: a YAML file plus ``--key=value`` overrides (dotted for sub-sections).

Unknown keys are errors that name the key and list the allowed ones.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from frugal_dist.train.config_validation import validate_config
from frugal_dist.train.pipeline import validate_data_config


@dataclass
class TrainConfig:
    """Every key of a training config (``launchers/train.py --help`` prints them)."""

    model: str = "tiny"  # a key of LLAMA_CONFIGS
    seq_len: int = 128
    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 200
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "frugal", "lr": 3e-3})
    # see frugal_dist.train.pipeline for every data key; the source's defaults are filled in
    data: dict[str, Any] = field(default_factory=lambda: {"source": "embedded"})
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    seed: int = 0
    engine: str = "auto"  # auto | single | ddp | fsdp2 | fsdp1 | fairscale | deepspeed
    deepspeed_config: str | None = None  # DeepSpeed JSON (engine=deepspeed)
    fsdp2_replicas: int = 1  # engine=fsdp2: > 1 is HSDP, (replicas, world / replicas) mesh
    output_dir: str | None = None
    checkpoint_every: int = 100  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept in output_dir/checkpoints (0: all)
    resume: str | None = None  # None | "auto" (newest valid checkpoint) | a checkpoint path
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16
    autocast: str = "none"  # compute: none | bfloat16 (torch.autocast, float32 masters)
    collective_timeout_s: float = 600.0  # a collective waiting longer for a peer rank fails

    @property
    def tokens_per_step_per_rank(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
ENGINES = ("auto", "single", "ddp", "fsdp2", "fsdp1", "fairscale", "deepspeed")


def _coerce(text: str) -> Any:
    return yaml.safe_load(text)


def _unknown(key: str, allowed: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r} in {where}.{hint} Allowed keys: {allowed}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` (``optimizer.density=0.5``) strings to a raw config dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=100)")
        key, value = item.split("=", 1)
        key = key.replace("-", "_")
        if "." in key:
            section, sub = key.split(".", 1)
            out.setdefault(section, {})
            if not isinstance(out[section], dict):
                raise ValueError(f"{section!r} is not a section; cannot set {key!r}")
            out[section][sub] = _coerce(value)
        else:
            out[key] = _coerce(value)
    return out


def build_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate keys and types; returns a ``TrainConfig``."""
    for key in raw:
        if key not in FIELDS:
            raise _unknown(key, sorted(FIELDS), "the training config")
    cfg = TrainConfig()
    for key, value in raw.items():
        if key in ("optimizer", "data"):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{key} must be a mapping (a YAML section), got {value!r}")
            merged = {**getattr(cfg, key), **(value or {})}
            setattr(cfg, key, merged)
        else:
            setattr(cfg, key, value)
    cfg.data = validate_data_config(cfg.data)  # known keys for the source, defaults filled in
    validate_config(cfg, ENGINES)  # every field: type, range, choices; the optimizer section
    for key in ("checkpoint_every", "keep_checkpoints"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {getattr(cfg, key)!r}")
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        raise ValueError(
            f"resume must be 'auto' or a checkpoint path (or null), got {cfg.resume!r}"
        )
    return cfg


def load_config(
    path: str | Path | list[str | Path] | None, overrides: list[str] = ()
) -> TrainConfig:
    """One config file or several (later files override earlier ones: see
    ``frugal_dist.train.config_files``), then the ``--key=value`` overrides."""
    from frugal_dist.train.config_files import read_configs

    return build_config(apply_overrides(read_configs(path), list(overrides)))
