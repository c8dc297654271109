"""Field-by-field validation of a ``TrainConfig``: a bad value raises ``ValueError`` naming the
key, the allowed values and what was given, before any process group or model exists.

The ``optimizer`` section of FRUGAL and its presets (and of ``adamw``) is checked with the
optimizer's own rules (``frugal_dist.optim.validation``): unknown keys (with a suggestion), choices
and ranges. Other optimizers (``rso``) check their options when they are built.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from frugal_dist.optim.fast_apply import KERNELS
from frugal_dist.optim.frugal import FRUGAL, FRUGAL_DEFAULTS, PROJ_QR_DEVICES, RESIDUAL_COMM
from frugal_dist.optim.param_groups import NON_SPLIT
from frugal_dist.optim.validation import check_known_keys, validate_options

if TYPE_CHECKING:
    from frugal_dist.train.config import TrainConfig

POSITIVE_INTS = (
    "seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_batches",
    "fsdp2_replicas",
)  # fmt: skip
NON_NEGATIVE_INTS = ("warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints")
DTYPES = ("float32", "bfloat16")
OPTIONAL_PATHS = ("deepspeed_config", "output_dir")
FRUGAL_PROCESS_OPTIONS = ("shard_state", "reduce_gradients", "check_agreement")
FRUGAL_FAMILY = ("frugal", "signsgd", "galore", "badam")  # FRUGAL(...) keyword options
ADAMW_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "seed"})


def frugal_keywords() -> frozenset[str]:
    """Every keyword a FRUGAL config section accepts: the hyper-parameters of
    ``FRUGAL_DEFAULTS``, its keyword-only options (``shard_state``, ``residual_comm``, ...) and the
    param-group builder's ``non_split``."""
    params = inspect.signature(FRUGAL.__init__).parameters.values()
    options = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return frozenset(FRUGAL_DEFAULTS) | (options - {"process_group"}) | {"non_split"}


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_finite_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def validate_config(cfg: TrainConfig, engines: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for the first invalid field of ``cfg``."""
    from frugal_dist.train.model import LLAMA_CONFIGS

    if not isinstance(cfg.model, str) or cfg.model not in LLAMA_CONFIGS:
        raise ValueError(f"model must be one of {sorted(LLAMA_CONFIGS)}, got {cfg.model!r}")
    for key in POSITIVE_INTS:
        if not _is_int(getattr(cfg, key)) or getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {getattr(cfg, key)!r}")
    for key in NON_NEGATIVE_INTS:  # 0: no evaluation / checkpoints only at the end / keep all
        if hasattr(cfg, key) and (not _is_int(getattr(cfg, key)) or getattr(cfg, key) < 0):
            raise ValueError(f"{key} must be an integer >= 0, got {getattr(cfg, key)!r}")
    if not _is_finite_real(cfg.min_lr_ratio) or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {cfg.min_lr_ratio!r}")
    if not _is_finite_real(cfg.grad_clip) or cfg.grad_clip < 0:
        raise ValueError(
            f"grad_clip must be a finite number >= 0 (0 disables clipping), got {cfg.grad_clip!r}"
        )
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {cfg.seed!r}")
    if not isinstance(cfg.engine, str) or cfg.engine not in engines:
        raise ValueError(f"engine must be one of {list(engines)}, got {cfg.engine!r}")
    replicas = getattr(cfg, "fsdp2_replicas", 1)
    if replicas != 1 and cfg.engine != "fsdp2":
        raise ValueError(
            f"fsdp2_replicas={replicas} (HSDP) needs engine=fsdp2, got engine={cfg.engine!r}; "
            "set engine=fsdp2 or drop fsdp2_replicas"
        )
    if not isinstance(cfg.dtype, str) or cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if getattr(cfg, "autocast", "none") not in ("none", "bfloat16"):
        raise ValueError(
            f"autocast must be 'none' or 'bfloat16' (bf16 compute, float32 master weights), "
            f"got {cfg.autocast!r}"
        )
    for key in OPTIONAL_PATHS:
        if getattr(cfg, key) is not None and not isinstance(getattr(cfg, key), str):
            raise ValueError(f"{key} must be a path (a string) or null, got {getattr(cfg, key)!r}")
    timeout = getattr(cfg, "collective_timeout_s", 1.0)
    if not _is_finite_real(timeout) or timeout <= 0:
        raise ValueError(
            f"collective_timeout_s must be a finite number of seconds > 0 (e.g. 600), got "
            f"{timeout!r}"
        )
    if not isinstance(cfg.data, Mapping):  # its keys: frugal_dist.train.pipeline
        raise ValueError(f"data must be a mapping (a YAML section), got {cfg.data!r}")
    validate_optimizer_section(cfg.optimizer)


def validate_optimizer_section(section: Any) -> None:
    """The ``optimizer`` section: ``name`` plus the keyword options of that optimizer."""
    from frugal_dist.train.optimizers import OPTIMIZERS

    if not isinstance(section, Mapping):
        raise ValueError(f"optimizer must be a mapping (a YAML section), got {section!r}")
    opts = dict(section)
    name = opts.pop("name", "frugal")
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {list(OPTIMIZERS)}, got {name!r}")
    if name not in FRUGAL_FAMILY and name != "adamw":
        return  # another optimizer (e.g. rso) checks its own options when it is built
    where = f"the optimizer section (optimizer.name={name!r})"
    allowed = ADAMW_KEYS if name == "adamw" else frugal_keywords()
    check_known_keys(opts, allowed, where)
    if opts.get("seed", 0) is None:  # FRUGAL(seed=None): rank 0 draws the seed
        opts.pop("seed")
    validate_options(opts, where)
    for key in FRUGAL_PROCESS_OPTIONS:
        if key in opts and not isinstance(opts[key], bool):
            raise ValueError(f"optimizer.{key} must be true or false, got {opts[key]!r}")
    if "non_split" in opts and opts["non_split"] not in NON_SPLIT:
        raise ValueError(
            f"optimizer.non_split must be one of {list(NON_SPLIT)} (the rule of embeddings, heads, "
            f"norms and biases: the state_full rule, or AdamW), got {opts['non_split']!r}"
        )
    for key, choices in (("kernels", KERNELS), ("proj_qr_device", PROJ_QR_DEVICES)):
        if key in opts and opts[key] not in choices:
            raise ValueError(f"optimizer.{key} must be one of {list(choices)}, got {opts[key]!r}")
    if "residual_comm" in opts and opts["residual_comm"] not in RESIDUAL_COMM:
        raise ValueError(
            f"optimizer.residual_comm must be one of {list(RESIDUAL_COMM)}, got "
            f"{opts['residual_comm']!r}"
        )
