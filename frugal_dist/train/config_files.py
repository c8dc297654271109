"""Reading one or more YAML config files into one raw config (``--config A --config B``).

Later files override earlier ones, key by key; the ``optimizer`` and ``data`` sections merge key
by key too, so a model config (shapes, schedule, lr) combines with an optimizer preset:

    launchers/train.py --config configs/llama-60m.yaml --config configs/presets/galore.yaml

One exception keeps presets composable: when a later file switches ``optimizer.name`` (e.g.
``frugal`` -> ``adamw``), the earlier optimizer options that belong to the old optimizer are
dropped; only the options every optimizer shares (``SHARED_OPTIMIZER_KEYS``: lr, weight decay,
betas, eps, seed) carry over. Likewise a switch of ``data.source`` keeps only ``tokenizer`` and
``eos_token``. ``--key=value`` overrides apply after all files, by the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from frugal_dist.train.input_errors import describe

SECTIONS = ("optimizer", "data")
SHARED_OPTIMIZER_KEYS = ("lr", "weight_decay", "betas", "eps", "seed")
SHARED_DATA_KEYS = ("tokenizer", "eos_token")
# a later value of the section's switch key drops the earlier keys that belonged to the old choice
SWITCHES = {"optimizer": ("name", SHARED_OPTIMIZER_KEYS), "data": ("source", SHARED_DATA_KEYS)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One config file as a dict (an empty file is ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: the file does not exist; give the path of a YAML "
                         "config (e.g. configs/tiny-cpu.yaml)")  # fmt: skip
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: {describe(exc)}; fix the file's YAML syntax") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(raw).__name__}")
    for section in SECTIONS:
        if section in raw and raw[section] is not None and not isinstance(raw[section], dict):
            raise ValueError(f"{path}: {section!r} must be a mapping of {section} keys")
    return raw


def merge_configs(base: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``later`` over ``base`` (see module doc for the sections and the optimizer switch)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in later.items():
        if key in SECTIONS and isinstance(value, dict):
            merged = dict(out.get(key) or {})
            switch, shared = SWITCHES[key]
            if switch in value and value[switch] != merged.get(switch, value[switch]):
                merged = {k: v for k, v in merged.items() if k in shared}
            merged.update(value)
            out[key] = merged
        else:
            out[key] = value
    return out


def read_configs(paths: str | Path | Sequence[str | Path] | None) -> dict[str, Any]:
    """The merged raw config of ``paths`` in order (none: ``{}``)."""
    if paths is None:
        return {}
    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        raw = merge_configs(raw, read_yaml(path))
    return raw
