"""Training configuration: one typed schema, ``TrainConfig``, for YAML files, the command line,
validation and ``launchers/train.py --help``.

Each field is ``Annotated[type, Field(description=..., <range>)]``; choices are ``Literal`` types.
``pydantic`` (v2) validates a raw dict against it in strict mode (no ``"1"`` for 1, no ``true``
for an integer, no NaN); a failure becomes one ``ValueError`` line naming the key, what it must
be and what was given. Unknown keys get a "did you mean". The ``optimizer`` and ``data`` sections
are checked by their owners' rules (``config_validation``, ``pipeline.validate_data_config``) and
documented in ``config_cli``. ``TrainConfig`` stays a plain dataclass (``dataclasses.asdict``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

from frugal_dist.train.config_files import merge_configs
from frugal_dist.train.config_validation import validate_config
from frugal_dist.train.model import LLAMA_CONFIGS
from frugal_dist.train.pipeline import validate_data_config

ENGINES = ("auto", "single", "ddp", "fsdp2", "fsdp1", "fairscale", "deepspeed")
Model = Literal[tuple(LLAMA_CONFIGS)]  # type: ignore[valid-type]
Engine = Literal[ENGINES]  # type: ignore[valid-type]
DTYPES = ("float32", "bfloat16")


def _f(description: str, **kw: Any) -> Any:
    """Field metadata: the one-line help text, ranges, strict types (no "1" for 1)."""
    return Field(description=description, strict=True, **kw)


def _c(description: str) -> Any:
    """Field metadata of a ``Literal`` (choices are exact already)."""
    return Field(description=description)


@with_config(ConfigDict(allow_inf_nan=False))
@dataclass
class TrainConfig:
    """Every key of a training config (``launchers/train.py --help`` prints them)."""

    model: Annotated[Model, _c("model shape (frugal_dist.train.model.LLAMA_CONFIGS)")] = "tiny"
    seq_len: Annotated[int, _f("tokens per sequence", ge=1)] = 128
    batch_size: Annotated[int, _f("sequences per rank per micro-step", ge=1)] = 8
    grad_accum: Annotated[int, _f("micro-steps per optimizer step", ge=1)] = 1
    max_steps: Annotated[int, _f("optimizer steps of the run", ge=1)] = 200
    warmup_steps: Annotated[int, _f("linear lr warm-up steps (<= max_steps)", ge=0)] = 20
    min_lr_ratio: Annotated[float, _f("cosine decay ends at min_lr_ratio * lr", ge=0, le=1)] = 0.1
    grad_clip: Annotated[float, _f("clip the global gradient norm (0: off)", ge=0)] = 1.0
    optimizer: Annotated[dict[str, Any], _f("optimizer section: name + its options (below)")] = (
        field(default_factory=lambda: {"name": "frugal", "lr": 3e-3})
    )
    data: Annotated[dict[str, Any], _f("data section: source + its options (below)")] = field(
        default_factory=lambda: {"source": "embedded"}
    )
    eval_every: Annotated[int, _f("steps between validation passes (0: never)", ge=0)] = 50
    eval_batches: Annotated[int, _f("batches per rank per validation pass", ge=1)] = 4
    log_every: Annotated[int, _f("steps between progress lines / metrics records", ge=1)] = 10
    seed: Annotated[int, _f("seed of the model, data order and subspaces", ge=0, lt=2**63)] = 0
    engine: Annotated[Engine, _c("distributed engine (auto: ddp if world > 1)")] = "auto"
    deepspeed_config: Annotated[str | None, _f("DeepSpeed JSON (engine=deepspeed)")] = None
    fsdp2_replicas: Annotated[int, _f("engine=fsdp2: > 1 is HSDP, (replicas, world / replicas)",
                                      ge=1)] = 1  # fmt: skip
    simulate_ranks: Annotated[
        int,
        _f(
            "one process takes the steps of this many data-parallel "
            "ranks (batch_size each; FRUGAL reduce_gradients, "
            "frugal_dist.train.simulated)",
            ge=1,
        ),
    ] = 1
    simulate_node_size: Annotated[
        int | None,
        _f("simulate_ranks with optimizer.residual_comm=hierarchical: ranks per node", ge=1),
    ] = None
    output_dir: Annotated[str | None, _f("metrics, TensorBoard, checkpoints, plot")] = None
    checkpoint_every: Annotated[int, _f("steps between checkpoints (0: at the end)", ge=0)] = 100
    keep_checkpoints: Annotated[int, _f("newest checkpoints kept (0: all)", ge=0)] = 3
    resume: Annotated[str | None, _f("'auto' (newest valid checkpoint) or a checkpoint path")] = (
        None
    )
    resume_override: Annotated[list[str], _f("with resume: fields that may differ from the "
                                              "checkpoint's run, e.g. optimizer.lr,max_steps")] = (
        field(default_factory=list)
    )  # fmt: skip
    dtype: Annotated[Literal[DTYPES], _c("parameter dtype")] = "float32"  # type: ignore[valid-type]
    autocast: Annotated[Literal["none", "bfloat16"], _c("bf16 compute, fp32 masters")] = "none"
    collective_timeout_s: Annotated[float, _f("a collective waiting longer fails", gt=0)] = 600.0
    wandb_project: Annotated[str | None, _f("also log to this W&B project (pip install wandb)")] = (
        None
    )
    wandb_mode: Annotated[Literal["offline", "online"], _c("offline: no network, sync later")] = (
        "offline"
    )

    @property
    def tokens_per_step_per_rank(self) -> int:
        """Tokens one process trains on per step (all its simulated ranks'; ``simulate_ranks``)."""
        return self.batch_size * self.grad_accum * self.seq_len * self.simulate_ranks


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_ADAPTER = TypeAdapter(TrainConfig)


def expected(key: str) -> str:
    """What ``key`` must be, in words, from the schema ("an integer >= 1", "one of [...]")."""
    from frugal_dist.train.config_cli import field_info

    info = field_info(key)
    if info.choices:
        return f"one of {list(info.choices)}"
    what = {"int": "an integer", "float": "a finite number", "dict": "a mapping (a YAML section)",
            "str": "a string", "list": "a list of names (command line: comma-separated)"}.get(
                info.kind, info.kind)  # fmt: skip
    bounds = " and ".join(f"{op} {v}" for op, v in info.bounds)
    return f"{what}{' ' + bounds if bounds else ''}{' or null' if info.optional else ''}"


def _unknown(key: str, allowed: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r} in {where}.{hint} Allowed keys: {allowed}")


def _coerce(text: str) -> Any:
    """A command-line value: YAML (``true``, ``[0.9, 0.95]``, ``null``), numbers as numbers
    (YAML 1.1 reads ``1e-3`` as a string)."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` (``optimizer.density=0.5``, leading ``--`` optional) strings to a raw
    config dict, by the rules of ``config_files.merge_configs``."""
    out: dict[str, Any] = {}
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=100)")
        key, value = item.split("=", 1)
        key = key.replace("-", "_")
        section, _, sub = key.partition(".")
        if sub:
            if section in out and not isinstance(out[section], dict):
                raise ValueError(f"{section!r} is not a section; cannot set {key!r}")
            out.setdefault(section, {})[sub] = _coerce(value)
        else:
            out[key] = _coerce(value)
    return merge_configs(raw, out)  # a switch of optimizer.name / data.source as between files


def build_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate keys and types; returns a ``TrainConfig``."""
    for key in raw:
        if key not in FIELDS:
            raise _unknown(key, sorted(FIELDS), "the training config")
    values = dict(raw)
    if isinstance(values.get("resume_override"), str):  # --resume_override=optimizer.lr,max_steps
        values["resume_override"] = [
            k.strip() for k in values["resume_override"].split(",") if k.strip()
        ]
    for key in ("optimizer", "data"):
        if key in values and values[key] is None:
            values[key] = {}
        if isinstance(values.get(key), dict):
            values[key] = {**getattr(TrainConfig(), key), **values[key]}
    try:
        cfg = _ADAPTER.validate_python(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "config"
        raise ValueError(f"{key} must be {expected(key)}, got {err['input']!r}") from None
    cfg.data = validate_data_config(cfg.data)  # known keys for the source, defaults filled in
    validate_config(cfg)  # across fields; the optimizer section
    return cfg


def load_config(
    path: str | Path | list[str | Path] | None, overrides: list[str] = ()
) -> TrainConfig:
    """One config file or several (later files override earlier ones: see
    ``frugal_dist.train.config_files``), then the ``--key=value`` overrides."""
    from frugal_dist.train.config_files import read_configs

    return build_config(apply_overrides(read_configs(path), list(overrides)))
