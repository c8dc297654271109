"""The checks of a ``TrainConfig`` that its schema (``frugal_dist.train.config``) cannot express:
rules across fields, files that must exist, and the ``optimizer`` section. A bad value raises
``ValueError`` naming the key, what it must be and what was given, before any process group or
model exists.

The ``optimizer`` section of FRUGAL and its presets (and of ``adamw``) is checked with the
optimizer's own rules (``frugal_dist.optim.validation``): unknown keys (with a suggestion), choices
and ranges. Other optimizers (``rso``) check their options when they are built.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from frugal_dist.optim.fast_apply import KERNELS
from frugal_dist.optim.frugal import FRUGAL, FRUGAL_DEFAULTS
from frugal_dist.optim.param_groups import NON_SPLIT
from frugal_dist.optim.validation import (
    PROJ_QR_DEVICES,
    RESIDUAL_COMM,
    check_known_keys,
    validate_options,
)
from frugal_dist.train.metric_sinks import check_wandb_available
from frugal_dist.train.resume_policy import validate_override

if TYPE_CHECKING:
    from frugal_dist.train.config import TrainConfig

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


def validate_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` for the first cross-field or optimizer-section problem of ``cfg``."""
    if cfg.warmup_steps > cfg.max_steps:
        raise ValueError(
            f"warmup_steps={cfg.warmup_steps} is more than max_steps={cfg.max_steps}: the lr would "
            f"never reach optimizer.lr; set warmup_steps <= max_steps (e.g. {cfg.max_steps // 10})"
        )
    check_wandb_available(cfg.wandb_project, cfg.wandb_mode)
    validate_override(cfg.resume_override, cfg.resume)
    if cfg.fsdp2_replicas != 1 and cfg.engine != "fsdp2":
        raise ValueError(
            f"fsdp2_replicas={cfg.fsdp2_replicas} (HSDP) needs engine=fsdp2, got engine="
            f"{cfg.engine!r}; set engine=fsdp2 or drop fsdp2_replicas"
        )
    if cfg.engine == "deepspeed" and cfg.deepspeed_config is None:
        raise ValueError(
            "engine=deepspeed needs deepspeed_config: add --deepspeed_config=ds_configs/zero2.json"
        )
    if cfg.deepspeed_config is not None:  # a missing or corrupt JSON fails before any launch
        from frugal_dist.engines.deepspeed import read_config

        read_config(cfg.deepspeed_config, "deepspeed_config")
    validate_optimizer_section(cfg.optimizer)
    validate_simulation(cfg)


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


def validate_simulation(cfg: TrainConfig) -> None:
    """``simulate_ranks`` / ``simulate_node_size`` (``frugal_dist.train.simulated``) against the
    rest of the config."""
    opts = cfg.optimizer
    comm = opts.get("residual_comm", "exact")
    if cfg.simulate_ranks == 1:
        if cfg.simulate_node_size is not None:
            raise ValueError(
                f"simulate_node_size={cfg.simulate_node_size} needs simulate_ranks > 1 "
                "(the simulated ranks it groups into nodes); set simulate_ranks or drop it"
            )
        return
    where = f"simulate_ranks={cfg.simulate_ranks}"
    if opts.get("name", "frugal") not in FRUGAL_FAMILY:
        raise ValueError(
            f"{where} simulates FRUGAL's own gradient reduction; optimizer.name must be one of "
            f"{list(FRUGAL_FAMILY)}, got {opts.get('name')!r}"
        )
    if opts.get("reduce_gradients") is not True:
        raise ValueError(
            f"{where} needs optimizer.reduce_gradients=true (the simulated ranks' gradients "
            "are reduced by FRUGAL, as with engine=ddp and reduce_gradients=true)"
        )
    if cfg.grad_accum != 1:
        raise ValueError(f"{where} needs grad_accum=1, got {cfg.grad_accum}")
    if cfg.engine not in ("single", "auto"):
        raise ValueError(f"{where} runs in one process: engine must be single, got {cfg.engine!r}")
    if comm == "hierarchical":
        size = cfg.simulate_node_size
        if size is None or cfg.simulate_ranks % size:
            raise ValueError(
                f"{where} with optimizer.residual_comm=hierarchical needs simulate_node_size "
                f"(ranks per simulated node) dividing {cfg.simulate_ranks}, got {size!r}"
            )
    elif cfg.simulate_node_size is not None:
        raise ValueError(
            f"simulate_node_size is for optimizer.residual_comm=hierarchical (got {comm!r}); "
            "drop it"
        )
