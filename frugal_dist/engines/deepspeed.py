"""DeepSpeed adapter: ``frugal_dist.deepspeed.initialize`` is ``deepspeed.initialize`` that reads a
``"optimizer": {"type": "FRUGAL", "params": {...}}`` section of the DeepSpeed config.

    engine, optimizer, loader, scheduler = frugal_dist.deepspeed.initialize(
        model=model, config="ds_configs/zero2.json")           # the only change in a user script

It builds FRUGAL with named param groups, hands it to DeepSpeed as a client optimizer, then binds
it to the engine's layout (verified against DeepSpeed 0.15-0.19.8 attribute names):

* ZeRO-0, fp32: the module's own parameters (dense); bf16: ``fp32_groups`` full-size masters
* ZeRO-1/2: one flat fp32 partition per group (``single_partition_of_fp32_groups`` or, under
  ``BF16_Optimizer``, ``fp32_groups_flat_partition``); each parameter's fragment from
  ``p._hp_mapping`` (``lp_fragment_address`` in the parameter, ``hp_fragment_address`` in the flat)
* ZeRO-3: one flat fp32 tensor per sub-group (``fp32_partitioned_groups_flat``); parameters of
  ``fp16_groups[s]`` back to back, ``partition_numel()`` slots each, rank r holding elements
  [r * part, min((r + 1) * part, ds_numel)).

``"type": "RSO"`` builds ``frugal_dist.RSO`` instead (transforming the model with ``apply_rso``
unless that was done already); it needs no layout binding (see ``frugal_dist.optim.rso``).

DeepSpeed clips the gradients it hands the optimizer (``gradient_clipping``; its default is 1.0
from DeepSpeed 0.19.3, 0 before) and averages them over ranks; FRUGAL sees that gradient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from frugal_dist.layouts.flat import FlatEntry, FlatLayout
from frugal_dist.optim import FRUGAL, build_param_groups, pop_group_options

FRUGAL_TYPES = ("frugal", "rso")
DEEPSPEED_BUILTINS = ("adam", "adamw", "lamb", "onebitadam", "onebitlamb", "zerooneadam",
                      "muadam", "muadamw", "musgd", "lion", "adagrad", "sgd", "muon",
                      "cpuadam", "fusedadam")  # fmt: skip


def read_config(config: Any, field: str = "config") -> dict[str, Any]:
    """A DeepSpeed config (a dict, deep-copied, or a JSON file) as a dict. A missing or corrupt
    file raises ``ValueError`` naming the file, the position and ``field`` (the argument)."""
    if config is None:
        raise ValueError("frugal_dist.deepspeed.initialize needs config= (a dict or a JSON path) "
                         "or args.deepspeed_config")  # fmt: skip
    if not isinstance(config, (str, Path)):
        return json.loads(json.dumps(config))  # a deep copy of a JSON-like dict
    if not Path(config).is_file():
        raise ValueError(f"{field}={str(config)!r}: the file does not exist; give the path of a "
                         "DeepSpeed JSON (e.g. ds_configs/zero2.json)")  # fmt: skip
    try:
        with open(config) as fh:
            out = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config}: not valid JSON at line {exc.lineno} column {exc.colno} "
                         f"({exc.msg}); fix the file given as {field}") from exc  # fmt: skip
    if not isinstance(out, dict):
        raise ValueError(f"{config}: a DeepSpeed config must be a JSON object, got "
                         f"{type(out).__name__}")  # fmt: skip
    return out


def _zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def frugal_options(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The FRUGAL keyword arguments of a DeepSpeed config, or None if it names another optimizer.

    Raises ``ValueError`` with the fix for an unknown type or a missing
    ``zero_allow_untested_optimizer``."""
    section = cfg.get("optimizer")
    if section is None:
        return None
    kind = str(section.get("type", ""))
    if kind.lower() not in FRUGAL_TYPES:
        if kind.lower() in DEEPSPEED_BUILTINS or hasattr(torch.optim, kind):
            return None
        raise ValueError(
            f'unknown optimizer type {kind!r} in the DeepSpeed config: write "type": "FRUGAL" '
            f'(with its arguments under "params"), or one of DeepSpeed\'s own optimizers'
        )
    extra = set(section) - {"type", "params"}
    if extra:
        raise ValueError(f'optimizer section keys {sorted(extra)} are not understood; use "type" '
                         'and "params"')  # fmt: skip
    if _zero_stage(cfg) >= 1 and not cfg.get("zero_allow_untested_optimizer", False):
        raise ValueError(
            'FRUGAL is a client optimizer: ZeRO stage >= 1 needs "zero_allow_untested_optimizer": '
            "true at the top level of the DeepSpeed config"
        )
    zopt = cfg.get("zero_optimization", {})
    if zopt.get("round_robin_gradients", False):
        raise ValueError('"round_robin_gradients": true breaks DeepSpeed\'s fragment map '
                         '(_hp_mapping); set it to false for FRUGAL')  # fmt: skip
    offload = zopt.get("offload_optimizer", {}).get("device", "none") != "none"
    if offload and cfg.get("zero_force_ds_cpu_optimizer", True):
        raise ValueError('ZeRO-Offload with FRUGAL needs "zero_force_ds_cpu_optimizer": false')
    params = dict(section.get("params", {}))
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    return params


def initialize(args: Any = None, model: torch.nn.Module | None = None, config: Any = None,
               **kwargs: Any):  # fmt: skip
    """``deepspeed.initialize`` with FRUGAL built from the config's optimizer section; same
    arguments and return value ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    The config is ``config`` (or ``config_params``) or, as in DeepSpeed, ``args.deepspeed_config``;
    giving both is an error."""
    import deepspeed

    if model is None:
        raise ValueError("frugal_dist.deepspeed.initialize needs model=")
    if config is None:
        config = kwargs.pop("config_params", None)
    from_args = getattr(args, "deepspeed_config", None)
    if from_args is not None and config is not None:
        raise ValueError(f"a DeepSpeed config was given twice: args.deepspeed_config={from_args!r} "
                         "and config=; pass one of them")  # fmt: skip
    cfg = read_config(config if config is not None else from_args,
                      "args.deepspeed_config" if config is None else "config")  # fmt: skip
    if from_args is not None:  # DeepSpeed takes the config from us, as a dict, not from args
        args.deepspeed_config = None
    try:
        return _initialize(deepspeed, args, model, cfg, kwargs)
    finally:
        if from_args is not None:
            args.deepspeed_config = from_args


def _initialize(deepspeed: Any, args: Any, model: torch.nn.Module, cfg: dict[str, Any],
                kwargs: dict[str, Any]):  # fmt: skip
    args = () if args is None else (args,)
    options = frugal_options(cfg)
    if options is None or kwargs.get("optimizer") is not None:
        return deepspeed.initialize(*args, model=model, config=cfg, **kwargs)
    kind = str(cfg.pop("optimizer").get("type", "")).lower()
    _skip_cpu_shm_build()
    if kind == "rso":  # RSO: transform the model (unless done), no layout binding (see optim.rso)
        return _initialize_rso(deepspeed, args, model, cfg, options, kwargs)
    frugal = FRUGAL(build_param_groups(model, **pop_group_options(options)), **options)
    # DeepSpeed may call step() once inside initialize with zero gradients (ZeRO-0 bf16): run it
    # with lr 0 and forget its state, so the first real step is step 1 everywhere.
    lrs = [g["lr"] for g in frugal.param_groups]
    for g in frugal.param_groups:
        g["lr"] = 0.0
    out = deepspeed.initialize(*args, model=model, optimizer=frugal, config=cfg, **kwargs)
    for g, lr in zip(frugal.param_groups, lrs):
        g["lr"] = lr
    frugal.state.clear()
    bind(out[0], frugal)
    return out


def _initialize_rso(deepspeed: Any, args: tuple, model: torch.nn.Module, cfg: dict[str, Any],
                    options: dict[str, Any], kwargs: dict[str, Any]):  # fmt: skip
    """RSO updates are elementwise on whatever tensors ZeRO hands it, and the merge runs in the
    RSO layers (ZeRO-1/2/3 merge at the next forward, from the B the engine copied back)."""
    from frugal_dist.optim.rso import build_rso

    rso = build_rso(model, **options)
    lrs = [g["lr"] for g in rso.param_groups]
    for g in rso.param_groups:  # a warm-up step() inside initialize (ZeRO-0 bf16) changes nothing
        g["lr"] = 0.0
    out = deepspeed.initialize(*args, model=model, optimizer=rso, config=cfg, **kwargs)
    for g, lr in zip(rso.param_groups, lrs):
        g["lr"] = lr
    rso.reset_counters()
    return out


def _skip_cpu_shm_build() -> None:
    """On CPU DeepSpeed compiles a shared-memory op (~2 min) used only by inference all-reduce."""
    if torch.cuda.is_available():
        return
    try:
        import deepspeed.ops as ops

        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - other DeepSpeed versions
        pass


def frugal_optimizer(engine: Any) -> Any:
    """The FRUGAL (or RSO) optimizer that a DeepSpeed ``engine`` steps: the object to call
    ``observe_loss(loss)`` on after ``engine.step()`` (``refresh_policy="loss"``), and
    ``state_bytes()`` / ``comm_stats()``. ZeRO-0 in fp32 steps it as ``engine.optimizer``;
    ZeRO-1/2/3, bf16 and offload wrap it, as ``engine.optimizer.optimizer`` (DeepSpeed's
    attribute for the client optimizer). ``ValueError`` when the engine steps another one."""
    from frugal_dist.optim.rso import RSO

    outer = getattr(engine, "optimizer", None)
    for opt in (outer, getattr(outer, "optimizer", None)):
        if isinstance(opt, (FRUGAL, RSO)):
            return opt
    raise ValueError(
        f"this DeepSpeed engine steps {type(outer).__name__}, not FRUGAL or RSO: build it with "
        "frugal_dist.deepspeed.initialize and a config whose optimizer section has "
        '"type": "FRUGAL" (or "RSO")'
    )


def bind(engine: Any, frugal: FRUGAL) -> None:
    """Bind ``frugal`` to the layout of ``engine`` (see module doc)."""
    entries = fragments(engine, frugal)
    if entries is not None:
        frugal.bind_layout(FlatLayout(entries, getattr(engine.optimizer, "dp_process_group", None)))


def fragments(engine: Any, frugal: FRUGAL) -> list[FlatEntry] | None:
    """Every parameter's fragment on this rank, or None where the layout is dense (ZeRO-0)."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    index = {n: i for g in frugal.param_groups for i, n in enumerate(g["names"])}
    out: list[FlatEntry] = []
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        pg = getattr(opt, "dp_process_group", None)
        for s, params in enumerate(opt.fp16_groups):
            flat, off = opt.fp32_partitioned_groups_flat[s], 0
            for p in params:
                part = p.partition_numel()
                r = dist.get_rank(group=getattr(p, "ds_process_group", pg))
                n = max(0, min(part, p.ds_numel - r * part))
                name = names[id(p)]
                out.append(FlatEntry(name, tuple(p.ds_shape), index[name], flat, off,
                                     r * part if n else 0, n))  # fmt: skip
                off += part
        return out
    lp = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    hp = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(
        opt, "fp32_groups_flat_partition", None
    )
    if lp is not None and hp is not None:  # ZeRO-1/2 (DeepSpeedZeroOptimizer, BF16_Optimizer)
        for i, params in enumerate(lp):
            for p in params:
                name = names[id(p)]
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    out.append(FlatEntry(name, tuple(p.shape), index[name], hp[i], 0, 0, 0))
                else:
                    out.append(FlatEntry(name, tuple(p.shape), index[name], hp[i],
                                         m.hp_fragment_address.start, m.lp_fragment_address.start,
                                         m.hp_fragment_address.numel))  # fmt: skip
        return out
    return None  # ZeRO-0: params (or full fp32 masters) in the groups, in order -> dense


def mpi_environment() -> None:
    """Under ``mpirun``, fill torch.distributed's variables from the MPI launcher's, on loopback
    (DeepSpeed's own discovery picks a non-loopback address)."""
    env = os.environ
    rank = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK"))
    size = env.get("PMI_SIZE", env.get("OMPI_COMM_WORLD_SIZE"))
    local = env.get("MPI_LOCALRANKID", env.get("OMPI_COMM_WORLD_LOCAL_RANK", rank))
    if rank is None or size is None or "RANK" in env:
        return
    env.update(RANK=rank, WORLD_SIZE=size, LOCAL_RANK=local or "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29511")
