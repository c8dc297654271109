"""The training loop: single process or DDP (torchrun / ``mp.spawn``), gloo on CPU, NCCL on GPU.

Each optimizer step: ``grad_accum`` micro-batches per rank (DDP gradient sync only on the last),
gradient clipping (``engine_setup.clip_gradients``; its total norm goes to FRUGAL's
``step(grad_norm=...)`` for the inf/nan verdict, ``engine_setup.step_grad_norm``; DeepSpeed
clips inside its engine and steps FRUGAL itself, unchanged), FRUGAL (or a baseline) step, lr
schedule; or, with ``simulate_ranks`` > 1, the step of that many data-parallel ranks in this one
process (``frugal_dist.train.simulated``).
Rank 0 prints progress and, with ``output_dir``, appends one JSON object per logged step to
``metrics.jsonl``. With ``data.test_files``, the last step's record also has ``test_loss`` /
``test_ppl``: one ``evaluate`` on the test split (every rank; the same all-reduce as validation)
after the last step, whatever ``eval_every`` is. A run resumed at ``max_steps`` takes no step
and so no test evaluation.
"""

from __future__ import annotations

import dataclasses
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
from frugal_dist.optim.engine_hooks import logical_shape
from frugal_dist.train import checkpoint
from frugal_dist.train.config import TrainConfig
from frugal_dist.train.engine_setup import (
    SHARDED_ENGINES,
    clip_gradients,
    deepspeed_engine,
    step_grad_norm,
    wrap_and_build,
)
from frugal_dist.train.faults import maybe_kill
from frugal_dist.train.input_errors import input_errors
from frugal_dist.train.logs import logger, setup_console
from frugal_dist.train.model import build_model
from frugal_dist.train.optimizers import build_optimizer
from frugal_dist.train.pipeline import build_data
from frugal_dist.train.progress import Progress, memory_gib
from frugal_dist.train.safeguards import check_model_agreement, check_run_agreement
from frugal_dist.train.schedule import lr_factor
from frugal_dist.train.simulated import simulated_step
from frugal_dist.train.summary import report, run_summary


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
    """Mean loss of ``cfg.eval_batches`` batches of ``data`` (validation or test split).

    Every rank evaluates its rows of each global batch; with ``world`` > 1 one all-reduce of
    (sum of losses, count): 16 bytes (float64) per rank. Must be called on every rank.
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(cfg.eval_batches):
        # simulated ranks (simulate_ranks = W): the rows of all W, as the real run evaluates
        batch = data.batch(i, cfg.batch_size * cfg.simulate_ranks, rank, world).to(device)
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
    with input_errors():  # a bad input at start-up: one line, exit 2 (launchers/train.py)
        rank, world, device = init_distributed(cfg.collective_timeout_s)
        setup_console(rank)
        if cfg.simulate_ranks > 1 and world > 1:
            raise ValueError(
                f"simulate_ranks={cfg.simulate_ranks} simulates the ranks in one process, but "
                f"this launch has {world} (WORLD_SIZE={world}); run one process"
            )
        if cfg.engine == "single" and world > 1:  # each rank would train alone, unreduced
            raise ValueError(
                f"engine='single' runs one process, but this launch has {world} ranks (WORLD_SIZE="
                f"{world}): each would train its own model without gradient reduction; use "
                "--engine=ddp (or auto) for data parallelism, or run one process (python "
                "launchers/train.py ...)"
            )
        check_run_agreement(cfg, world)  # same code, config and seed on every rank, or raise
        engine = cfg.engine if cfg.engine != "auto" else ("ddp" if world > 1 else "single")
        if engine == "ddp" and world == 1 and not dist.is_initialized():
            engine = "single"
        if engine == "fsdp2" and not dist.is_initialized():  # FSDP2's mesh needs a group of 1+
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)  # fmt: skip
        torch.manual_seed(cfg.seed)
        data = build_data(cfg.data, cfg.seq_len, seed=cfg.seed)  # vocab: the tokenizer's
        model = build_model(
            cfg.model, max_seq_len=max(cfg.seq_len, 16), vocab_size=data.vocab_size
        ).to(device)
        check_model_agreement(model)
        set_phase("start-up (model wrapping, optimizer)")
        if cfg.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        if cfg.optimizer.get("name") == "rso":  # RSO: swap Linears for RSO layers first
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
            ds_engine, optimizer = deepspeed_engine(model, cfg, name, opt_cfg)
            wrapped = ds_engine
        elif engine in SHARDED_ENGINES:  # fsdp1 / fairscale: the wrapper and optimizer go together
            wrapped, optimizer = wrap_and_build(engine, model, name, opt_cfg)
        else:
            optimizer = build_optimizer(model, name, **opt_cfg)
        # before resume_into: this run's lr (resume_override=optimizer.lr), not the checkpoint's
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        if engine == "ddp" and getattr(optimizer, "reduce_gradients", False):
            # FRUGAL reduces the gradients itself (compressed): DDP must not all-reduce them too.
            wrapped.register_comm_hook(None, defer_to_optimizer_hook)

        train_data, val_data, test_data = data.train, data.val, data.test
        out_dir = Path(cfg.output_dir) if cfg.output_dir else None
        start = checkpoint.resume_into(cfg, engine, model=model, optimizer=optimizer,
                                       ds_engine=ds_engine, train_data=train_data,
                                       wrapped=wrapped)  # fmt: skip
        sinks = [wandb_sink(cfg, out_dir)] if rank == 0 and cfg.wandb_project else []
    progress = Progress(out_dir, rank, start.step, cfg.max_steps, sinks=sinks)
    n_params = sum(int(torch.Size(logical_shape(p)).numel()) for p in model.parameters())
    logger.info(f"model={cfg.model} ({n_params / 1e6:.2f}M params) engine={engine} "
                f"world={world} optimizer={name} {opt_cfg} "
                f"tokens/step={cfg.tokens_per_step_per_rank * world}")  # fmt: skip
    t_start = time.perf_counter()

    history: list[dict[str, Any]] = []
    tokens = start.tokens
    t_last = time.perf_counter()
    tokens_last = tokens
    val_loss = start.val_loss
    test_loss = None
    for step in range(start.step, cfg.max_steps):
        set_phase(f"training step {step + 1} (forward/backward, gradient sync, optimizer step)")
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * factor
        loss_sum = 0.0
        if cfg.simulate_ranks > 1:  # W ranks in this process (frugal_dist.train.simulated)
            loss_sum = simulated_step(cfg, model, optimizer, train_data, step, device,
                                      compute_context)  # fmt: skip
        for micro in range(cfg.grad_accum if cfg.simulate_ranks == 1 else 0):
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
        if ds_engine is None and cfg.simulate_ranks == 1:
            # the clip's total norm gives FRUGAL its inf/nan verdict (no second gradient read)
            norm = None
            if cfg.grad_clip > 0:
                norm = clip_gradients(engine, wrapped, optimizer, cfg.grad_clip)
            optimizer.step(**step_grad_norm(optimizer, norm, world))
            # fairscale's ShardedDataParallel keeps references to the .grad tensors
            optimizer.zero_grad(set_to_none=engine != "fairscale")
        tokens += cfg.tokens_per_step_per_rank * world
        loss_t = torch.tensor([loss_sum], device=device)
        if world > 1:
            dist.all_reduce(loss_t)
            loss_t /= world
        loss_value = loss_t.item()  # the mean over ranks and micro-batches: the same everywhere
        observe = getattr(optimizer, "observe_loss", None)
        if observe is not None:  # FRUGAL refresh_policy="loss" (no collective: this value)
            observe(loss_value)
        record: dict[str, Any] = {"step": step + 1, "tokens": tokens, "loss": loss_value,
                                  "lr": optimizer.param_groups[0]["lr"]}  # fmt: skip
        do_eval = cfg.eval_every > 0 and (
            (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps
        )
        if do_eval:
            set_phase(f"evaluation after step {step + 1}")
            val_loss = evaluate(wrapped, val_data, cfg, rank, world, device)
            record["val_loss"] = val_loss
            record["val_ppl"] = math.exp(min(val_loss, 50.0))
        final = step + 1 == cfg.max_steps  # the first and last steps are always logged
        if final and test_data is not None:  # data.test_files: once, on every rank
            set_phase(f"test evaluation after step {step + 1}")
            test_loss = evaluate(wrapped, test_data, cfg, rank, world, device)
            record["test_loss"] = test_loss
            record["test_ppl"] = math.exp(min(test_loss, 50.0))
        logged = (step + 1) % cfg.log_every == 0 or step == start.step or do_eval or final
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
            progress.note(f"checkpoint {saved}")
        maybe_kill(step + 1, rank)
    progress.close()
    summary = run_summary(history, val_loss=val_loss, tokens=tokens, world=world, engine=engine,
                          elapsed_s=time.perf_counter() - t_start, optimizer=optimizer,
                          test_loss=test_loss)  # fmt: skip
    if rank == 0:
        report(summary, out_dir)
    return summary


def wandb_sink(cfg: TrainConfig, out_dir: Path | None):
    """Rank 0's W&B run (``wandb_project``, ``wandb_mode``; see ``metric_sinks``)."""
    from frugal_dist.train.metric_sinks import WandbSink

    name = out_dir.name if out_dir is not None else None
    return WandbSink(cfg.wandb_project, cfg.wandb_mode, out_dir, name, dataclasses.asdict(cfg))


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in optimizer.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )
