"""The command line of ``launchers/train.py``, generated from the schema ``TrainConfig`` and the
``optimizer`` / ``data`` section tables below: every key is an option with a one-line description,
its choices and its default, so ``--help`` documents all of them.

``parse_command_line(argv) -> (config files, overrides)``: ``--config`` (repeatable), then any key
as ``--key value`` or ``--key=value`` (``--max-steps`` = ``--max_steps``; dotted keys for the
sections: ``--optimizer.density 0.5``, ``--data.source files``). Values are YAML (``true``,
``null``, ``[0.9, 0.95]``; numbers such as ``1e-3`` are numbers). Validation is not argparse's:
``frugal_dist.train.config.build_config`` checks the merged config, so a file and a flag are held
to the same rules and messages. Keys not listed (a typo) are passed on and refused there with a
suggestion.

The section tables are checked against the code by tests: every ``FRUGAL(...)`` keyword, RSO
option and data key must have a line here (a new option without one fails the test suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, NamedTuple

from frugal_dist.optim.fast_apply import KERNELS
from frugal_dist.optim.frugal import FRUGAL_DEFAULTS
from frugal_dist.optim.nonfinite import NONFINITE_MODES
from frugal_dist.optim.param_groups import NON_SPLIT
from frugal_dist.optim.validation import CHOICES, PROJ_QR_DEVICES, RESIDUAL_COMM

# key -> (optimizers that take it, description); defaults come from the code
OPTIMIZER_KEYS: dict[str, tuple[str, str]] = {
    "name": ("all", "frugal | adamw | signsgd | galore | badam | rso (galore, badam: presets)"),
    "lr": ("all", "peak learning rate (warm-up and cosine decay scale it)"),
    "betas": ("all", "Adam moment decay rates [beta1, beta2]"),
    "eps": ("all", "Adam denominator epsilon (> 0)"),
    "weight_decay": ("all", "decoupled weight decay (norms and biases: none)"),
    "seed": ("all", "base seed of the subspace choices"),
    "density": ("frugal, rso", "rho: fraction of each split matrix with Adam state (RSO: rank)"),
    "density_final": ("frugal", "density decays linearly to this (null: fixed density)"),
    "density_decay_steps": ("frugal", "step at which the density reaches density_final"),
    "update_gap": ("frugal", "T: steps between subspace refreshes"),
    "refresh_policy": ("frugal", "fixed: refresh every update_gap; loss: T grows as loss stalls"),
    "update_gap_max": ("frugal", "refresh_policy loss: cap of T (null: 8 x update_gap)"),
    "refresh_threshold": ("frugal", "refresh_policy loss: min gain per update_gap (null: 0.01)"),
    "subspace": ("frugal", "which part of each matrix is state-full"),
    "block_order": ("frugal", "block subspace: order of active blocks (gradnorm: largest grads)"),
    "coord_choice": ("frugal", "coordinate subspace: rows, columns or single entries"),
    "proj_type": (
        "frugal, rso",
        "projection matrix: frugal svd|random|randperm, rso gaussian|orthonormal",
    ),  # fmt: skip
    "proj_side": ("frugal", "project the rows or the columns (auto: the smaller side)"),
    "state_full": ("frugal", "update rule inside the subspace"),
    "state_free": ("frugal", "update rule outside it (none: frozen, as in BAdam/GaLore)"),
    "inactive_lr_scale": ("frugal", "state-free lr = lr * inactive_lr_scale (0.1 measured best)"),
    "proj_params_lr_scale": ("frugal, rso", "lr scale of every split parameter (RSO: of B)"),
    "reset_statistics": ("frugal, rso", "zero the Adam moments at each refresh (RSO: merge)"),
    "moment_transfer": ("frugal", "projection refresh: none, or rotate moments into the new basis"),
    "free_scale": ("frugal", "state-free step: fixed (lr*s_i), or matched to RMS(U) per tensor"),
    "algorithm": ("frugal", "rule of every group (signsgd: pure signSGD)"),
    "non_split": ("frugal", "rule of embeddings, heads, norms, biases: state_full's or AdamW"),
    "shard_state": ("frugal", "DDP: each rank keeps 1/world of the state (ZeRO-1 style)"),
    "reduce_gradients": ("frugal", "DDP: FRUGAL reduces gradients itself (compressed)"),
    "residual_comm": ("frugal", "with reduce_gradients: residual exact, 1-bit, or hierarchical"),
    "node_groups": ("frugal", "hierarchical: ranks per node (null: LOCAL_WORLD_SIZE)"),
    "check_agreement": ("frugal", "check at start-up that ranks share seed and options"),
    "nonfinite": ("frugal", "a NaN/inf gradient: skip the step, raise, or ignore"),
    "fused": ("frugal", "fused kernels (null: on CUDA)"),
    "proj_qr_device": ("frugal", "where random projection bases are drawn (auto: on CUDA)"),
    "proj_precision": ("frugal", "projection GEMMs: auto (bf16 on CUDA), fp32, tf32 or bf16"),
    "svd_method": ("frugal", "svd refresh: warm (subspace iteration), randomized or exact"),
    "kernels": ("frugal", "Triton kernels: auto (on CUDA), triton or torch"),
    "inner_steps": ("rso", "steps between merges of B into W"),
    "prox": ("rso", "proximal pull of B towards 0"),
    "rank": ("rso", "rank r of B (instead of density)"),
    "targets": ("rso", "names of the Linear layers RSO replaces"),
    "rso": ("rso", "internal: marks RSO groups (do not set)"),
}
OPTIMIZER_CHOICES: dict[str, tuple[Any, ...]] = {
    **{k: v for k, v in CHOICES.items() if k != "proj_type"},
    "name": ("frugal", "adamw", "signsgd", "galore", "badam", "rso"),
    "residual_comm": RESIDUAL_COMM,
    "nonfinite": NONFINITE_MODES,
    "proj_qr_device": PROJ_QR_DEVICES,
    "kernels": KERNELS,
    "non_split": NON_SPLIT,
}
# key -> (sources that take it, description)
DATA_KEYS: dict[str, tuple[str, str]] = {
    "source": ("all", "embedded (stdlib source, no download) | files | hf"),
    "tokenizer": ("all", "byte | path to a tokenizers .json | HF name or dir"),
    "eos_token": ("all", "document separator token"),
    "max_bytes": ("embedded", "bytes of stdlib source read per split"),
    "train_files": ("files", "glob or list: .txt .jsonl(.gz/.xz) .parquet"),
    "val_files": ("files", "same; absent: val_fraction of documents held out by hash"),
    "test_files": ("files", "same formats; evaluated once after the last step (test_loss)"),
    "val_fraction": ("files, hf", "share of documents held out when no validation files/split"),
    "text_field": ("files, hf", "JSON field / parquet or dataset column with the text"),
    "txt_split": ("files", "file (one document per .txt) | blank_line"),
    "cache_dir": ("files, hf", "token cache directory (none: tokenise in every process)"),
    "name": ("hf", "datasets.load_dataset path: hub id (allenai/c4) or json"),
    "config": ("hf", "dataset config name, e.g. en"),
    "data_files": ("hf", "data_files for packaged builders (json/parquet/text)"),
    "split": ("hf", "training split"),
    "val_split": ("hf", "validation split; null: hold out val_fraction"),
    "streaming": ("hf", "stream instead of downloading the whole split"),
    "revision": ("hf", "dataset git revision"),
    "shuffle_buffer": ("hf", "documents in the seeded shuffle buffer (0: stream order)"),
    "val_tokens": ("hf", "tokens of val_split materialised for evaluation"),
}
DATA_CHOICES = {"source": ("embedded", "files", "hf"), "txt_split": ("file", "blank_line")}


class FieldInfo(NamedTuple):
    kind: str  # int | float | str | dict | choice
    choices: tuple[Any, ...]
    bounds: tuple[tuple[str, Any], ...]  # (">=", 1), ...
    optional: bool
    description: str
    default: Any


def field_info(key: str) -> FieldInfo:
    """What the schema says about the top-level ``key``."""
    from frugal_dist.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    base, *meta = typing.get_args(hints[key])
    args = typing.get_args(base)
    optional = type(None) in args
    if typing.get_origin(base) is typing.Literal:
        choices, kind = args, "choice"
    elif typing.get_origin(base) is list:
        choices, kind = (), "list"
    else:
        choices = ()
        inner = [a for a in args if a is not type(None)] or [base]
        kind = getattr(typing.get_origin(inner[0]) or inner[0], "__name__", str(inner[0]))
    bounds, description = [], ""
    for info in meta:
        description = getattr(info, "description", None) or description
        for m in getattr(info, "metadata", []):
            for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if getattr(m, attr, None) is not None:
                    bounds.append((op, getattr(m, attr)))
    fld = {f.name: f for f in dataclasses.fields(TrainConfig)}[key]
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
    return FieldInfo(kind, tuple(choices), tuple(bounds), optional, description, default)


def _help(text: str, default: Any, choices: tuple[Any, ...] = (), who: str = "") -> str:
    """One help line: description, {choices}, [who takes it], (default)."""
    parts = [text]
    if choices:
        parts.append("{" + ", ".join(map(str, choices)) + "}")
    if who and who != "all":
        parts.append(f"[{who}]")
    parts.append(f"(default: {default!r})")
    return " ".join(parts).replace("%", "%%")  # argparse formats help strings with %


class _Said(str):
    """A default described in words (its repr is the text)."""

    def __repr__(self) -> str:
        return str(self)


def optimizer_defaults() -> dict[str, Any]:
    """The value each optimizer key has when no file or flag sets it."""
    from frugal_dist.optim.rso import RSO_DEFAULTS
    from frugal_dist.train.config import TrainConfig

    return {**RSO_DEFAULTS, **FRUGAL_DEFAULTS, "shard_state": False,
            "reduce_gradients": False, "residual_comm": "exact", "check_agreement": True,
            "nonfinite": "skip", "fused": None, "proj_qr_device": "auto", "kernels": "auto",
            "non_split": NON_SPLIT[0],
            "seed": _Said("the run's seed"), **TrainConfig().optimizer}  # fmt: skip


def data_defaults() -> dict[str, Any]:
    from frugal_dist.train.pipeline import DATA_DEFAULTS

    out: dict[str, Any] = {"source": "embedded", "tokenizer": "byte",
                           "eos_token": _Said("the tokenizer's")}  # fmt: skip
    for section in DATA_DEFAULTS.values():
        for k, v in section.items():
            out.setdefault(k, v)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The launcher's parser: ``--config`` plus one option per key (see the module docstring)."""
    from frugal_dist.train.config import FIELDS

    parser = argparse.ArgumentParser(
        prog="launchers/train.py",
        usage="%(prog)s [-h] [--config YAML ...] [--KEY VALUE ...]",
        allow_abbrev=False,  # --max_step is a typo for our check, not a prefix of --max_steps
        description="Pre-train a LLaMA-style model with FRUGAL (or a baseline). Settings come "
        "from --config files (later ones override earlier ones), then from --key value flags. "
        "Section keys are dotted: --optimizer.lr 1e-3, --data.source files.",
    )
    parser.add_argument(
        "--config", action="append", default=None, metavar="YAML",
        help="YAML config file (configs/*.yaml); repeat to combine, e.g. --config "
        "configs/llama-60m.yaml --config configs/presets/galore.yaml",
    )  # fmt: skip
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # fmt: skip  (the deepspeed launcher passes it)
    run = parser.add_argument_group("run keys (YAML top level)")
    for key in FIELDS:
        if key in ("optimizer", "data"):
            continue
        info = field_info(key)
        kinds = {"int": "INT", "float": "NUM", "str": "STR", "list": "KEYS"}
        metavar = kinds.get(info.kind, "CHOICE")
        _add(run, key, _help(info.description, info.default, info.choices), metavar)
    opt = parser.add_argument_group(
        "optimizer keys (YAML 'optimizer:' section; [..]: the optimizers that take the key)"
    )
    defaults = optimizer_defaults()
    for key, (who, text) in OPTIMIZER_KEYS.items():
        if key == "rso":
            continue
        _add(opt, f"optimizer.{key}",
             _help(text, defaults.get(key), OPTIMIZER_CHOICES.get(key, ()), who))  # fmt: skip
    data = parser.add_argument_group(
        "data keys (YAML 'data:' section; [..]: the sources that take the key)"
    )
    ddefaults = data_defaults()
    for key, (who, text) in DATA_KEYS.items():
        _add(data, f"data.{key}", _help(text, ddefaults.get(key), DATA_CHOICES.get(key, ()), who))
    return parser


def _add(group: Any, key: str, help_text: str, metavar: str = "VALUE") -> None:
    names = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
    group.add_argument(*names, dest=key, default=argparse.SUPPRESS, metavar=metavar,
                       help=help_text)  # fmt: skip


def parse_command_line(argv: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """``(config files, ["key=value", ...])`` of a launcher command line, in the given order."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    known = {k: v for k, v in vars(args).items() if k not in ("config", "local_rank")}
    return args.config, [f"{k}={v}" for k, v in known.items()] + _join(unknown)


def _join(tokens: list[str]) -> list[str]:
    """Tokens argparse did not know (typos) as ``key=value`` for ``build_config`` to refuse."""
    out, i = [], 0
    while i < len(tokens):
        tok, nxt = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.startswith("--") and "=" not in tok and nxt is not None and not nxt.startswith("--"):
            out.append(f"{tok}={nxt}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return out
