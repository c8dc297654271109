"""The training loop: single process or DDP (torchrun / ``mp.spawn``), gloo on CPU, NCCL on GPU.

Each optimizer step: ``grad_accum`` micro-batches per rank (DDP gradient sync only on the last),
gradient clipping, FRUGAL (or a baseline) step, lr schedule. Rank 0 prints progress and, with
``output_dir``, appends one JSON object per logged step to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from frugal_dist.comm.ddp_hooks import defer_to_optimizer_hook
from frugal_dist.comm.timeouts import explain_collective_timeouts, process_group_timeout, set_phase
from frugal_dist.train import checkpoint
from frugal_dist.train.config import TrainConfig
from frugal_dist.train.engine_setup import SHARDED_ENGINES, clip_gradients, wrap_and_build
from frugal_dist.train.faults import maybe_kill
from frugal_dist.train.model import build_model
from frugal_dist.train.optimizers import build_optimizer
from frugal_dist.train.pipeline import build_data
from frugal_dist.train.progress import Progress, memory_gib
from frugal_dist.train.safeguards import check_model_agreement, check_run_agreement
from frugal_dist.train.schedule import lr_factor


def init_distributed(collective_timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment (no-op for one process).

    ``collective_timeout_s`` bounds how long any collective waits for a peer (None: torch's
    default). gloo raises on the waiting ranks; NCCL's watchdog logs the timeout and ends the
    job about a minute later, without a Python exception (see ``frugal_dist.comm.timeouts``).
    """
    from frugal_dist.engines.deepspeed import mpi_environment

    mpi_environment()  # under mpirun: RANK / WORLD_SIZE / LOCAL_RANK from the MPI launcher
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=process_group_timeout(collective_timeout_s),
        )
    return rank, world, device


def compute_context(cfg: TrainConfig, device: torch.device):
    """``torch.autocast`` to bf16 when ``cfg.autocast == "bfloat16"`` (float32 master weights and
    optimizer state; matmuls in bf16), otherwise a no-op. The loss is computed in float32 by the
    model either way."""
    if getattr(cfg, "autocast", "none") != "bfloat16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data, cfg: TrainConfig, rank: int, world: int, device
) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(cfg.eval_batches):
        batch = data.batch(i, cfg.batch_size, rank, world).to(device)
        with compute_context(cfg, device):
            _, loss = model(batch, labels=batch)
        total += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


@explain_collective_timeouts  # a stalled rank: CollectiveTimeoutError naming the step
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns a summary (first/last loss, val loss, tokens/s, final state bytes)."""
    rank, world, device = init_distributed(cfg.collective_timeout_s)
    check_run_agreement(cfg, world)  # same code, config and seed on every rank, or raise
    engine = cfg.engine if cfg.engine != "auto" else ("ddp" if world > 1 else "single")
    if engine == "ddp" and world == 1 and not dist.is_initialized():
        engine = "single"
    if engine == "fsdp2" and not dist.is_initialized():  # FSDP2's mesh needs a group, even of 1
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)  # fmt: skip
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.seq_len, seed=cfg.seed)  # vocab: the tokenizer's
    model = build_model(cfg.model, max_seq_len=max(cfg.seq_len, 16), vocab_size=data.vocab_size).to(
        device
    )
    check_model_agreement(model)
    set_phase("start-up (model wrapping, optimizer)")
    if cfg.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if cfg.optimizer.get("name") == "rso":  # RSO: swap Linears for RSO layers before any wrapping
        from frugal_dist.optim.rso_layers import apply_rso_from_options

        apply_rso_from_options(model, cfg.optimizer, seed=cfg.seed)
    if engine == "fsdp2":
        from frugal_dist.engines.fsdp2 import default_mesh, shard_model

        shard_model(model, mesh=default_mesh(replicas=cfg.fsdp2_replicas))  # > 1: HSDP
    if engine != "deepspeed":
        wrapped = DDP(model) if engine == "ddp" else model
    opt_cfg = dict(cfg.optimizer)
    name = opt_cfg.pop("name", "frugal")
    opt_cfg.setdefault("seed", cfg.seed)
    ds_engine = None
    if engine == "deepspeed":
        ds_engine, optimizer = _deepspeed_engine(model, cfg, name, opt_cfg)
        wrapped = ds_engine
    elif engine in SHARDED_ENGINES:  # fsdp1 / fairscale: the wrapper and optimizer go together
        wrapped, optimizer = wrap_and_build(engine, model, name, opt_cfg)
    else:
        optimizer = build_optimizer(model, name, **opt_cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if engine == "ddp" and getattr(optimizer, "reduce_gradients", False):
        # FRUGAL reduces the gradients itself (compressed): DDP must not all-reduce them too.
        wrapped.register_comm_hook(None, defer_to_optimizer_hook)

    train_data, val_data = data.train, data.val
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    start = checkpoint.resume_into(cfg, engine, model=model, optimizer=optimizer,
                                   ds_engine=ds_engine, train_data=train_data,
                                   wrapped=wrapped)  # fmt: skip
    progress = Progress(out_dir, rank, start.step, cfg.max_steps)
    if rank == 0:
        n_params = sum(
            int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in model.parameters()
        )
        print(
            f"[frugal_dist] model={cfg.model} ({n_params / 1e6:.2f}M params) engine={engine} "
            f"world={world} optimizer={name} {opt_cfg} tokens/step="
            f"{cfg.tokens_per_step_per_rank * world}",
            flush=True,
        )

    history: list[dict[str, Any]] = []
    tokens = start.tokens
    t_last = time.perf_counter()
    tokens_last = tokens
    val_loss = start.val_loss
    for step in range(start.step, cfg.max_steps):
        set_phase(f"training step {step + 1} (forward/backward, gradient sync, optimizer step)")
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * factor
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = train_data.batch(step * cfg.grad_accum + micro, cfg.batch_size, rank, world)
            batch = batch.to(device)
            last = micro == cfg.grad_accum - 1
            accumulates = engine in ("ddp", *SHARDED_ENGINES)  # wrappers with no_sync()
            sync = nullcontext() if (last or not accumulates) else wrapped.no_sync()
            if engine == "fsdp2":  # reduce-scatter only on the last micro-step
                model.set_requires_gradient_sync(last)
            if ds_engine is not None:  # DeepSpeed accumulates, clips and steps at the boundary
                with compute_context(cfg, device):
                    _, loss = ds_engine(batch, labels=batch)
                ds_engine.backward(loss)
                ds_engine.step()
                loss_sum += loss.item() / cfg.grad_accum
                continue
            with sync:
                with compute_context(cfg, device):  # backward runs outside autocast
                    _, loss = wrapped(batch, labels=batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
        if ds_engine is None:
            if cfg.grad_clip > 0 and engine in SHARDED_ENGINES:
                clip_gradients(engine, wrapped, optimizer, cfg.grad_clip)
            elif cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            # fairscale's ShardedDataParallel keeps references to the .grad tensors
            optimizer.zero_grad(set_to_none=engine != "fairscale")
        tokens += cfg.tokens_per_step_per_rank * world
        loss_t = torch.tensor([loss_sum], device=device)
        if world > 1:
            dist.all_reduce(loss_t)
            loss_t /= world
        record: dict[str, Any] = {"step": step + 1, "tokens": tokens, "loss": loss_t.item(),
                                  "lr": optimizer.param_groups[0]["lr"]}  # fmt: skip
        do_eval = cfg.eval_every > 0 and (
            (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps
        )
        if do_eval:
            set_phase(f"evaluation after step {step + 1}")
            val_loss = evaluate(wrapped, val_data, cfg, rank, world, device)
            record["val_loss"] = val_loss
            record["val_ppl"] = math.exp(min(val_loss, 50.0))
        logged = (step + 1) % cfg.log_every == 0 or step == start.step or do_eval
        if logged:
            now = time.perf_counter()
            record["tokens_per_s"] = (tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens
            state_bytes = getattr(optimizer, "state_bytes", None)
            record["opt_state_mib"] = (
                state_bytes() if state_bytes else _state_bytes(optimizer)
            ) / 2**20
            if hasattr(optimizer, "comm_stats") and optimizer.comm_stats()["last_step_total"]:
                record["comm_bytes"] = optimizer.comm_stats()["last_step_total"]
            record["mem_gib"] = memory_gib(device)
            skipped = getattr(optimizer, "skipped_steps", None)  # non-finite gradients (FRUGAL)
            if callable(skipped):
                record["skipped_steps"] = int(skipped())
        progress.update(record, logged)
        history.append(record)
        saved = checkpoint.maybe_save(cfg, step + 1, tokens, val_loss, engine=engine, model=model,
                                      optimizer=optimizer, ds_engine=ds_engine,
                                      train_data=train_data, wrapped=wrapped)  # fmt: skip
        if saved is not None:
            progress.note(f"[frugal_dist] checkpoint {saved}")
        maybe_kill(step + 1, rank)
    progress.close()
    k = max(1, min(10, len(history) // 5))
    summary = {
        "losses": [r["loss"] for r in history],
        "first_loss": sum(r["loss"] for r in history[:k]) / k,
        "last_loss": sum(r["loss"] for r in history[-k:]) / k,
        "val_loss": val_loss,
        "steps": len(history),
        "tokens": tokens,
        "world_size": world,
        "engine": engine,
        "state_bytes": optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else None,
        "comm_bytes_last_step": (
            optimizer.comm_stats()["last_step_total"] if hasattr(optimizer, "comm_stats") else None
        ),
    }
    if rank == 0:
        print(f"[frugal_dist] done: {json.dumps(summary)}", flush=True)
        _final_report(out_dir, val_loss)
    return summary


def _deepspeed_engine(model, cfg: TrainConfig, name: str, opt_cfg: dict[str, Any]):
    """A DeepSpeed engine from ``cfg.deepspeed_config``. The DeepSpeed JSON's FRUGAL section gives
    defaults; the training config's ``optimizer`` section (and ``--optimizer.*``) override them.
    Batch size, accumulation and clipping come from the training config."""
    from frugal_dist.engines.deepspeed import _load_config, initialize

    if cfg.deepspeed_config is None:
        raise ValueError("engine=deepspeed needs --deepspeed_config=ds_configs/zero2.json")
    ds_cfg = _load_config(cfg.deepspeed_config)
    ds_cfg["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_cfg["gradient_accumulation_steps"] = cfg.grad_accum
    ds_cfg.pop("train_batch_size", None)
    ds_cfg["gradient_clipping"] = cfg.grad_clip
    if cfg.dtype != "bfloat16":
        ds_cfg.setdefault("bf16", {})["enabled"] = False
    if name not in ("frugal", "rso"):
        raise ValueError(
            "engine=deepspeed runs FRUGAL or RSO from the DeepSpeed config; optimizer.name "
            f"must be 'frugal' or 'rso', got {name!r}"
        )
    section = ds_cfg.setdefault("optimizer", {"type": name.upper(), "params": {}})
    if name == "rso" and str(section.get("type", "")).lower() != "rso":  # RSO: own section
        section = ds_cfg["optimizer"] = {"type": "RSO", "params": {}}
    if str(section.get("type", "")).lower() == name:  # the experiment config's values win
        section["params"] = {**section.get("params", {}), **opt_cfg}
    engine, optimizer, _, _ = initialize(model=model, config=ds_cfg)
    inner = (
        optimizer if hasattr(optimizer, "state_bytes") else getattr(optimizer, "optimizer", None)
    )
    return engine, inner


def _final_report(out_dir: Path | None, val_loss: float) -> None:
    """Rank 0, end of run: the validation perplexity and, with ``output_dir``, the run's plot."""
    if not math.isnan(val_loss):
        print(f"[frugal_dist] final validation loss {val_loss:.4f}, perplexity "
              f"{math.exp(min(val_loss, 50.0)):.2f}", flush=True)  # fmt: skip
    if out_dir is None:
        return
    try:
        from frugal_dist.train.plot import plot_runs

        print(f"[frugal_dist] plot: {plot_runs([out_dir], out_dir / 'curves.png')}", flush=True)
    except ImportError as exc:
        print(f"[frugal_dist] no plot ({exc})", flush=True)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in optimizer.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )
