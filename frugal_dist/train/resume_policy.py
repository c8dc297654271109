"""Which settings a resumed run may change, and how it says so.

A checkpoint's ``manifest.json`` records the whole config of the run that wrote it. On resume the
current config is compared with it, field by field, in three classes:

* **structural** (``fingerprint``): the model, ``seq_len``, ``dtype``, ``seed``, the ``data``
  section (except ``cache_dir``) and every ``optimizer`` option except ``lr`` (subspace,
  density, update gap, betas, ``shard_state``, ...). The checkpoint's weights, optimizer state
  and data position only mean something under these values: a difference is refused, naming
  the field, the checkpoint's value and the fix (set it back, or start a new run).
* **overridable** (``OVERRIDABLE``): ``optimizer.lr``, the schedule (``max_steps``,
  ``warmup_steps``, ``min_lr_ratio``), ``grad_clip`` and the logging / evaluation / checkpoint
  interval and W&B keys. They may change on resume, but only when named in ``resume_override``
  (``--resume_override=optimizer.lr,max_steps``); rank 0 then logs one notice with each field's
  old -> new value. A differing field not named there is refused with the exact flag to add.
  The new values take effect from the first resumed step: the loop sets every param group's lr
  to ``base lr * lr_factor(step, warmup_steps, max_steps, min_lr_ratio)`` of *this* run before
  each step, after the checkpoint's optimizer state is loaded.
* everything else (``batch_size``, ``grad_accum``, ``engine`` layout, ``output_dir``,
  ``autocast``, ``collective_timeout_s``, ...) is this run's (the engine has its own check in
  ``checkpoint.check_compatible``; a resharded resume changes ``batch_size`` with the world size).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

# fields that may differ from the checkpoint's run when named in ``resume_override``
OVERRIDABLE = (
    "optimizer.lr",
    "max_steps",
    "warmup_steps",
    "min_lr_ratio",
    "grad_clip",
    "eval_every",
    "eval_batches",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "wandb_project",
    "wandb_mode",
)
STRUCTURAL_TOP = ("model", "seq_len", "dtype", "seed")
DATA_NOT_STRUCTURAL = ("cache_dir",)  # where tokens are cached, not which tokens


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    import dataclasses

    return dataclasses.asdict(cfg)


def fingerprint(cfg: Any) -> dict[str, Any]:
    """The structural settings of a config (a ``TrainConfig`` or its ``asdict``): a checkpoint
    only resumes a run with equal values (see the module docstring)."""
    raw = _as_dict(cfg)
    out: dict[str, Any] = {key: raw.get(key) for key in STRUCTURAL_TOP}
    data = dict(raw.get("data") or {})
    out["data.source"] = data.pop("source", "embedded")
    for key in sorted(data):
        if key not in DATA_NOT_STRUCTURAL:
            out[f"data.{key}"] = _json_value(data[key])
    for key, value in sorted((raw.get("optimizer") or {}).items()):
        if key != "lr":
            out[f"optimizer.{key}"] = _json_value(value)
    return out


def overridable_values(cfg: Any) -> dict[str, Any]:
    """The ``OVERRIDABLE`` fields of a config (a ``TrainConfig`` or its ``asdict``)."""
    raw = _as_dict(cfg)
    out = {}
    for key in OVERRIDABLE:
        section, _, sub = key.partition(".")
        out[key] = _json_value((raw.get(section) or {}).get(sub) if sub else raw.get(key))
    return out


def flag(key: str, value: Any) -> str:
    """``--key=value`` as the launcher reads it back (YAML flow: ``[0.9,0.95]``, ``null``)."""
    from frugal_dist.train.config import _coerce

    if isinstance(value, str) and _coerce(value) == value:
        return f"--{key}={value}"
    return f"--{key}={json.dumps(value, separators=(',', ':'))}"


def compare(
    saved_config: Mapping[str, Any], cfg: Any, override: list[str] | tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """``(refusals, notices)`` for resuming a run of ``saved_config`` (the manifest's
    ``config``) with ``cfg``: at most one refusal line per class, one notice per overridden
    field (``"optimizer.lr 0.003 -> 0.001"``)."""
    refusals: list[str] = []
    saved_fp, now_fp = fingerprint(saved_config), fingerprint(cfg)
    diff = sorted(k for k in set(saved_fp) | set(now_fp) if saved_fp.get(k) != now_fp.get(k))
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved_fp.get(k)!r}, now {now_fp.get(k)!r}"
                           for k in diff)  # fmt: skip
        fixes = [flag(k, saved_fp[k]) for k in diff if k in saved_fp]
        fixes += [f"drop {k}" for k in diff if k not in saved_fp]  # the checkpoint's: default
        refusals.append(
            f"belongs to another run: config fields differ: {detail}. These cannot change on "
            "resume (the checkpoint's weights and optimizer state belong to them): set them back "
            f"({', '.join(fixes)}), or start a new run without --resume in another output_dir"
        )
    saved_ov, now_ov = overridable_values(saved_config), overridable_values(cfg)
    changed = [k for k in OVERRIDABLE if saved_ov[k] != now_ov[k]]
    unlisted = [k for k in changed if k not in override]
    if unlisted:
        detail = "; ".join(f"{k}: checkpoint {saved_ov[k]!r}, now {now_ov[k]!r}" for k in unlisted)
        listed = ",".join(k for k in OVERRIDABLE if k in unlisted or k in override)
        back = " ".join(flag(k, saved_ov[k]) for k in unlisted)
        refusals.append(
            f"settings differ from the checkpoint's run: {detail}. To continue with the new "
            f"values add --resume_override={listed}; to keep the checkpoint's, set them back "
            f"({back})"
        )
    notices = [f"{k} {saved_ov[k]!r} -> {now_ov[k]!r}" for k in changed if k in override]
    return refusals, notices


def validate_override(override: list[str], resume: str | None) -> None:
    """``resume_override``: known overridable field names, and only with ``resume``."""
    for key in override:
        if key in OVERRIDABLE:
            continue
        close = difflib.get_close_matches(key, OVERRIDABLE, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"resume_override: {key!r} cannot be overridden on resume.{hint} Overridable: "
            f"{list(OVERRIDABLE)} (model, seq_len, dtype, seed, data and the other optimizer "
            "options are part of the checkpoint; change them only in a new run)"
        )
    if override and resume is None:
        raise ValueError(
            f"resume_override={','.join(override)} only applies to a resumed run; add "
            "--resume=auto (or --resume=PATH), or drop resume_override"
        )
