#!/usr/bin/env python
"""Memory and speed of whole training steps, LLaMA-1B (paper shape), one engine per launch.

    python benchmarks/gpu_memory_speed.py --engine single
    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_memory_speed.py --engine fsdp2
    torchrun --standalone --nproc_per_node 2 benchmarks/gpu_memory_speed.py --engine zero2
    python benchmarks/gpu_memory_speed.py --engine single --scaling     # largest model that fits

One launch runs every variant one after the other in the same process (model, optimizer and
engine are rebuilt and freed in between): torch AdamW (fused on CUDA), FRUGAL rho=0.25 with
block / coordinate-columns / random- and svd-projection subspaces, FRUGAL rho=0, and RSO when
``frugal_dist.train.optimizers`` offers an ``rso`` preset (else a row says it was skipped).

Per variant: ``--warmup`` untimed steps (the first one creates the state and refreshes the
subspaces; ``update_gap`` is set past the run so no timed step refreshes), then up to ``--steps``
timed steps with CUDA events: step time and tokens/s end to end (forward + backward + optimizer),
the optimizer step alone (``optimizer.step()``; under DeepSpeed ``engine.step()``, which also
all-gathers the updated bf16 weights), peak allocated memory, optimizer-state bytes per rank
(``state_bytes()`` or the sum of the state tensors), ``refresh_ms`` / ``refresh_step_ms`` (the
median optimizer step / whole step of three extra steps that each refresh the subspaces: every
param group's ``update_gap`` is set to the steps taken so far, so s % T == 0; each one's optimizer
time in ``refresh_ms_each``; None for AdamW and RSO, whose refresh is not
``update_gap``-driven), and the optimizer step's bandwidth bound:

    bytes_min = n_local * (2 * b_param + b_grad) + 2 * S_local        (read + write params,
    bound_ms  = bytes_min / B_copy                                      read grads, read + write
                                                                        every state byte)

with n_local the master-parameter elements this rank updates (all of them single-GPU, 1/world
under FSDP2 / ZeRO-2/3), b_param / b_grad their byte widths, S_local the state bytes and B_copy
the bandwidth of a 1 GiB device copy (read + write) measured at start-up. It ignores temporaries
and FRUGAL's projection products, so it is a lower bound for every variant.

Precision (``--precision``): ``mixed`` (default) keeps float32 master weights and computes in
bf16 (single: ``torch.autocast``; FSDP2: ``MixedPrecisionPolicy(bf16, reduce float32)``; ZeRO:
DeepSpeed ``bf16``), so every optimizer keeps float32 moments; ``bf16`` casts the model to bf16
(single/FSDP2 only; torch AdamW then keeps bf16 moments, FRUGAL float32); ``fp32``.

``--scaling`` tries ``--scaling-models`` (350m, 1b, 3b, 7b, 13b, 20b) for ``--scaling-variants``
(AdamW, FRUGAL rho=0), ``--scaling-steps`` steps each, with activation checkpointing, and records
the peak memory or "oom"; a variant stops at its first OOM.

``--grad-clip MAX_NORM`` (default 0: none): every variant, AdamW included, clips its gradients
to that total norm in each timed iteration with the training loop's call
(``train.engine_setup.clip_gradients``: torch's ``get_total_norm`` + ``clip_grads_with_norm_``,
i.e. ``clip_grad_norm_``, FSDP2's DTensor norm made whole), after backward and before the
optimizer-step mark (so in ``step_ms``, not in ``opt_ms``). FRUGAL variants on ``single`` / ``ddp``
clip with ``FRUGAL.clip_grad_norm_`` there (the same norm, no multiply of every gradient: the
step applies the coefficient where a scale-dependent rule reads the gradient, inside its
kernels, ``optim.clipping``; the norm is the step's inf/nan verdict); AdamW keeps torch's clip;
FRUGAL on other engines passes the returned norm to ``step(grad_norm=...)``
(``engine_setup.step_grad_norm``). ZeRO engines clip inside DeepSpeed (``gradient_clipping``;
FRUGAL keeps its own check there). Recorded in the JSON (``grad_clip``, ``config.grad_clip``).

``--max-seconds`` bounds the launch: each pending variant gets an equal share of what is left,
the number of timed steps shrinks to fit it, and the JSON is rewritten after every variant.
A CUDA OOM (or any error) in a variant is recorded and the next variant runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    REPO,
    Budget,
    copy_bandwidth,
    fmt,
    free_memory,
    frugal_device_options,
    is_oom,
    markdown_table,
    provenance,
    try_plot,
    write_json,
)  # fmt: skip

from frugal_dist.train import optimizers as presets  # noqa: E402
from frugal_dist.train.engine_setup import clip_gradients, step_grad_norm  # noqa: E402
from frugal_dist.train.model import LLAMA_CONFIGS, LlamaConfig, build_model  # noqa: E402

ENGINES = ("single", "fsdp2", "zero2", "zero3")
FRUGAL_COMMON = dict(lr=1e-3, weight_decay=0.0, state_full="adamw", state_free="signsgd",
                     update_gap=100_000)  # fmt: skip
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "frugal_block_d0.25": ("frugal", dict(density=0.25, subspace="block",
                                          block_order="descending")),
    "frugal_block_strided_d0.25": ("frugal", dict(density=0.25, subspace="block",
                                                  block_order="strided")),
    "frugal_columns_d0.25": ("frugal", dict(density=0.25, subspace="coordinate",
                                            coord_choice="columns")),
    "frugal_projection_d0.25": ("frugal", dict(density=0.25, subspace="projection",
                                               proj_type="random")),
    "frugal_svd_d0.25": ("frugal", dict(density=0.25, subspace="projection", proj_type="svd")),
    "frugal_svd_tf32_d0.25": ("frugal", dict(density=0.25, subspace="projection", proj_type="svd",
                                             proj_precision="tf32")),
    # FRUGAL+ (configs/presets/frugal-plus.yaml): the state-free step matched to RMS(U) per
    # tensor, on the batched Triton apply (kernels.projection_matched)
    "frugal_svd_matched_d0.25": ("frugal", dict(density=0.25, subspace="projection",
                                                proj_type="svd", free_scale="matched",
                                                inactive_lr_scale=1.0)),
    "frugal_d0": ("frugal", dict(density=0.0, subspace="block")),
    "rso": ("rso", dict(lr=1e-3, weight_decay=0.0, density=0.25, inner_steps=100_000)),
}  # fmt: skip
EXTRA_CONFIGS = {  # larger shapes for --scaling (OpenLLaMA-3B-like, LLaMA-13B, a ~20B)
    "3b": LlamaConfig(32000, 3200, 26, 32, 8640, 256),
    "13b": LlamaConfig(32000, 5120, 40, 40, 13824, 256),
    "20b": LlamaConfig(32000, 6144, 44, 48, 16384, 256),
}


def model_config(name: str) -> LlamaConfig:
    cfg = LLAMA_CONFIGS.get(name) or EXTRA_CONFIGS.get(name)
    if cfg is None:
        raise ValueError(f"--model {name!r} unknown; use one of "
                         f"{sorted(LLAMA_CONFIGS) + sorted(EXTRA_CONFIGS)}")  # fmt: skip
    return cfg


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer (non-reentrant), without renaming parameters:
    each layer's ``forward`` is replaced on the instance."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        inner = layer.forward

        def fwd(x, cos, sin, _inner=inner):
            return checkpoint(_inner, x, cos, sin, use_reentrant=False)

        layer.forward = fwd


class Run:
    """One variant's model, optimizer and step function on one engine."""

    def __init__(self, args, engine: str, model_name: str, variant: str, device, world: int,
                 batch_size: int, checkpointing: bool) -> None:  # fmt: skip
        self.device, self.engine, self.ds = device, engine, None
        self.grad_clip, self.world = args.grad_clip, world
        name, opts = VARIANTS[variant]
        if name == "frugal":
            opts = {**FRUGAL_COMMON, **frugal_device_options(), **opts}
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = build_model(model_config(model_name), max_seq_len=args.seq_len)
        if args.precision == "bf16":
            model = model.to(torch.bfloat16)
        if name == "rso":  # RSO trains B factors of swapped-in layers: transform before wrapping
            from frugal_dist.optim.rso_layers import apply_rso_from_options

            apply_rso_from_options(model, opts, seed=args.seed)
        if checkpointing:
            checkpoint_layers(model)
        self.autocast = engine == "single" and args.precision == "mixed"
        if engine == "fsdp2":
            from frugal_dist.engines.fsdp2 import default_mesh, shard_model

            shard_model(model, mesh=default_mesh(), bf16=args.precision == "mixed")
        if engine.startswith("zero"):
            self.ds, self.opt = self._deepspeed(args, model, name, opts, int(engine[-1]),
                                                batch_size)  # fmt: skip
        else:
            kw = {"lr": 1e-3, "weight_decay": 0.0} if name == "adamw" else opts
            self.opt = presets.build_optimizer(model, name, **kw)
        self.model = model
        gen = torch.Generator().manual_seed(args.seed + 1 + (dist.get_rank() if world > 1 else 0))
        vocab = model_config(model_name).vocab_size
        self.batch = torch.randint(0, vocab, (batch_size, args.seq_len), generator=gen).to(device)

    @staticmethod
    def _deepspeed(args, model, name: str, opts: dict[str, Any], stage: int, batch_size: int):
        import frugal_dist.deepspeed as fds

        with open(REPO / "ds_configs" / f"zero{stage}.json") as fh:
            cfg = json.load(fh)
        cfg.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1,
                   gradient_clipping=args.grad_clip,
                   bf16={"enabled": args.precision == "mixed"})  # fmt: skip
        cfg.pop("train_batch_size", None)
        if name == "adamw":
            cfg.pop("optimizer")
            client = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0,
                                       fused=torch.cuda.is_available() or None)  # fmt: skip
            engine, opt, _, _ = fds.initialize(model=model, optimizer=client, config=cfg)
        elif name in presets.PRESETS:  # a FRUGAL preset: DeepSpeed config section, bound layout
            cfg["optimizer"] = {"type": "FRUGAL", "params": {**presets.PRESETS[name], **opts}}
            engine, opt, _, _ = fds.initialize(model=model, config=cfg)
        elif name == "rso":  # RSO's own DeepSpeed section (elementwise: no layout binding)
            cfg["optimizer"] = {"type": "RSO", "params": opts}
            engine, opt, _, _ = fds.initialize(model=model, config=cfg)
        else:
            raise NotImplementedError(f"optimizer {name!r} has no DeepSpeed path here")
        inner = opt if hasattr(opt, "state_bytes") else getattr(opt, "optimizer", opt)
        return engine, inner

    def step(self, events: list | None = None) -> None:
        """forward + backward, [mark], optimizer step, [mark]."""
        if self.ds is not None:
            _, loss = self.ds(self.batch, labels=self.batch)
            self.ds.backward(loss)
            _mark(events)
            self.ds.step()
        else:
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                _, loss = self.model(self.batch, labels=self.batch)
            loss.backward()
            kw = {}
            if self.grad_clip > 0:  # every variant the same clip; FRUGAL gets its norm
                norm = clip_gradients(self.engine, self.model, self.opt, self.grad_clip)
                kw = step_grad_norm(self.opt, norm, self.world)
            _mark(events)
            self.opt.step(**kw)
            self.opt.zero_grad(set_to_none=True)
        _mark(events)

    def state_bytes(self) -> int:
        if hasattr(self.opt, "state_bytes"):
            return int(self.opt.state_bytes())
        total = 0
        for st in self.opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v = v.to_local() if hasattr(v, "to_local") else v
                    total += v.numel() * v.element_size()
        return total

    def master_numel_and_widths(self, world: int) -> tuple[int, int, int]:
        """(elements this rank's optimizer updates, param bytes, grad bytes) for the bound."""
        params = [p for p in self.model.parameters() if p.requires_grad]  # RSO: W is frozen
        if self.ds is not None:
            n = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in params)
            return -(-n // world), 4, 4  # float32 partitions of params and grads
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        width = local[0].element_size()
        return sum(t.numel() for t in local), width, width

    def close(self) -> None:
        if self.ds is not None and hasattr(self.ds, "destroy"):
            self.ds.destroy()
        self.ds = self.opt = self.model = self.batch = None


def time_refresh(run: Run, count: int = 3) -> list[tuple[float, float]] | None:
    """(whole step ms, optimizer step ms) of ``count`` consecutive steps that each refresh every
    subspace: during them each param group with an ``update_gap`` gets T = 1 (every counter s
    then refreshes, with refresh index k = s: a new k each step, so random bases and coordinate
    sets are drawn anew each time -- with one T = ``steps_taken + i`` every refresh had k = 1 and
    only the first drew), then its old T back. None without such groups. The first such step may
    include a one-time cost (a kernel specialisation or a library handle the refresh path is
    first to use), hence several."""
    groups = [g for g in getattr(run.opt, "param_groups", []) if "update_gap" in g]
    if not groups:
        return None
    old = [g["update_gap"] for g in groups]
    out = []
    try:
        for g in groups:
            g["update_gap"] = 1
        for _ in range(count):
            events: list = []
            _sync()
            _mark(events)
            run.step(events)
            _sync()
            out.append((_ms(events[0], events[2]), _ms(events[1], events[2])))
    finally:
        for g, gap in zip(groups, old):
            g["update_gap"] = gap
    return out


def _mark(events: list | None) -> None:
    if events is None:
        return
    if torch.cuda.is_available():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append(e)
    else:
        events.append(time.perf_counter())


def _ms(a, b) -> float:
    return a.elapsed_time(b) if torch.cuda.is_available() else (b - a) * 1e3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _agree_min(x: float, world: int) -> float:
    """The minimum of ``x`` over ranks (so every rank takes the same number of steps)."""
    if world == 1:
        return x
    t = torch.tensor(
        [x], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def measure(
    args,
    variant: str,
    model_name: str,
    device,
    world: int,
    share_s: float,
    batch_size: int,
    steps: int,
    warmup: int,
    checkpointing: bool,
) -> dict[str, Any]:
    """Build, warm up, time; returns this rank's figures."""
    t_start = time.perf_counter()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    run = Run(args, args.engine, model_name, variant, device, world, batch_size, checkpointing)
    built = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    try:
        _sync()
        t0 = time.perf_counter()
        for _ in range(warmup):
            run.step()
        _sync()
        per_step = (time.perf_counter() - t0) / max(1, warmup)
        left = share_s - (time.perf_counter() - t_start)
        n = int(_agree_min(max(1.0, min(steps, left / max(per_step, 1e-6))), world))
        events: list = []
        for _ in range(n):
            _mark(events)
            run.step(events)
        _sync()
        step_ms = [_ms(events[3 * i], events[3 * i + 2]) for i in range(n)]
        opt_ms = [_ms(events[3 * i + 1], events[3 * i + 2]) for i in range(n)]
        refresh = time_refresh(run) if VARIANTS[variant][0] == "frugal" else None
        numel, bp, bg = run.master_numel_and_widths(world)
        state = run.state_bytes()
        out = {
            "status": "ok", "timed_steps": n, "warmup_steps": warmup,
            "step_ms": step_ms, "opt_ms": opt_ms,
            "step_ms_mean": sum(step_ms) / n, "opt_ms_mean": sum(opt_ms) / n,
            "refresh_step_ms": statistics.median(r[0] for r in refresh) if refresh else None,
            "refresh_ms": statistics.median(r[1] for r in refresh) if refresh else None,
            "refresh_ms_each": [r[1] for r in refresh] if refresh else None,
            "tokens_per_s": batch_size * args.seq_len * world / (sum(step_ms) / n / 1e3),
            "state_bytes": state, "master_numel": numel, "param_bytes": bp, "grad_bytes": bg,
            "bound_bytes": numel * (2 * bp + bg) + 2 * state,
            "memory_before_bytes": base, "memory_after_build_bytes": built,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated()
            if torch.cuda.is_available() else None,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()
            if torch.cuda.is_available() else None,
        }  # fmt: skip
    finally:
        run.close()
        del run
    return out


def run_one(args, variant, model_name, device, world, rank, share, **kw) -> dict[str, Any]:
    """``measure`` with OOM/error capture; every rank's figures gathered (rank-0 view)."""
    name = VARIANTS[variant][0]
    t = time.perf_counter()
    if name not in presets.OPTIMIZERS:
        local = {"status": "skipped", "note": f"frugal_dist.train.optimizers has no {name!r} "
                 f"preset in this checkout (offers {list(presets.OPTIMIZERS)})"}  # fmt: skip
    else:
        try:
            local = measure(args, variant, model_name, device, world, share, **kw)
        except Exception as exc:  # noqa: BLE001 - recorded per variant; the next one runs
            local = {"status": "oom" if is_oom(exc) else "error",
                     "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}  # fmt: skip
    free_memory()
    local["seconds"] = time.perf_counter() - t
    per_rank = [local]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, local)
    row = dict(per_rank[0])
    statuses = {r["status"] for r in per_rank}
    row["status"] = "oom" if "oom" in statuses else ("error" if "error" in statuses
                                                       else row["status"])  # fmt: skip
    if row["status"] != "ok" and row.get("note") is None:
        row["note"] = next((r.get("note") for r in per_rank if r.get("note")), None)
    for key in ("peak_allocated_bytes", "state_bytes", "step_ms_mean", "opt_ms_mean", "refresh_ms"):
        vals = [r.get(key) for r in per_rank if r.get(key) is not None]
        if vals:
            row[key + "_max_over_ranks"] = max(vals)
    row["per_rank"] = per_rank if world > 1 else None
    row.update(variant=variant, model=model_name)
    if rank == 0:
        print(f"[{model_name} {variant}] {row['status']} "
              f"{fmt(row.get('step_ms_mean'))} ms/step, opt {fmt(row.get('opt_ms_mean'))} ms, "
              f"refresh {fmt(row.get('refresh_ms'))} ms, "
              f"peak {fmt((row.get('peak_allocated_bytes') or 0) / 2**30, '.2f')} GiB, "
              f"state {fmt(row.get('state_bytes', 0) / 2**30, '.3f')} GiB {row.get('note') or ''}",
              flush=True)  # fmt: skip
    return row


def _worst(r: dict[str, Any], key: str) -> float:
    """The busiest rank's value (rank 0's in JSONs written before the max was recorded)."""
    return r.get(key + "_max_over_ranks", r.get(key)) or 0


def table(result: dict[str, Any]) -> str:
    """Memory columns are the busiest rank's (``*_max_over_ranks``): ZeRO-2's flat partition can
    put every active block on one rank, and that rank decides what fits."""
    bw = result["copy_bandwidth_bytes_per_s"]
    rows = []
    for r in result["rows"]:
        ok = r["status"] == "ok"
        bound = r["bound_bytes"] / bw * 1e3 if ok else None
        peak = _worst(r, "peak_allocated_bytes")
        rows.append([r["model"], r["variant"], r["status"], fmt(r.get("tokens_per_s"), ",.0f"),
                     fmt(r.get("step_ms_mean")), fmt(r.get("opt_ms_mean"), ",.2f"),
                     fmt(bound, ",.2f"), fmt(_worst(r, "refresh_ms") or None, ",.1f"),
                     fmt(peak / 2**30, ",.2f") if ok and peak else "-",
                     fmt(_worst(r, "state_bytes") / 2**30, ",.3f") if ok else "-"])  # fmt: skip
    return markdown_table(["model", "variant", "status", "tokens/s", "step ms", "opt step ms",
                           "opt bound ms", "refresh opt ms (max rank)", "peak GiB (max rank)",
                           "state GiB (max rank)"],
                          rows)  # fmt: skip


def merge(paths: list[str], out: Path) -> dict[str, Any]:
    """One result from several launches of the same engine/model/world (``--only`` one variant
    each, e.g. ZeRO-3, whose engine does not free its memory when a variant ends): rows in the
    given order, each launch's config and provenance kept under ``launches``."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    keys = {(p["config"]["engine"], p["config"]["model"], p["world_size"]) for p in parts}
    if len(keys) != 1:
        raise SystemExit(f"--merge: launches differ in (engine, model, world): {sorted(keys)}")
    result = dict(parts[0])
    result["rows"] = [row for p in parts for row in p["rows"]]
    result["launches"] = [{"file": Path(p).name, "config": q["config"],
                           "provenance": q["provenance"], "elapsed_s": q.get("elapsed_s")}
                          for p, q in zip(paths, parts)]  # fmt: skip
    result["complete"] = all(p.get("complete") for p in parts)
    write_json(out, result)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return
    labels = [f"{r['model']} {r['variant']}" for r in rows]
    bw = result["copy_bandwidth_bytes_per_s"]

    def draw(plt):
        fig, ax = plt.subplots(1, 4, figsize=(18, 0.4 * len(rows) + 2), sharey=True)
        y = list(range(len(rows)))
        ax[0].barh(y, [r["tokens_per_s"] for r in rows])
        ax[0].set_xlabel("tokens/s (global)")
        ax[1].barh(y, [r["opt_ms_mean"] for r in rows], label="measured")
        ax[1].scatter([r["bound_bytes"] / bw * 1e3 for r in rows], y, color="k", marker="|",
                      s=200, label="bandwidth bound", zorder=3)  # fmt: skip
        ax[1].set_xlabel("optimizer step (ms)")
        ax[1].legend(fontsize=8)
        ax[2].barh(y, [_worst(r, "peak_allocated_bytes") / 2**30 for r in rows])
        ax[2].set_xlabel("peak allocated GiB, busiest rank")
        ax[3].barh(y, [_worst(r, "state_bytes") / 2**30 for r in rows])
        ax[3].set_xlabel("optimizer state GiB, busiest rank")
        ax[0].set_yticks(y)
        ax[0].set_yticklabels(labels)
        ax[0].invert_yaxis()
        hw = result["provenance"]["hardware"]
        fig.suptitle(f"{result['config']['engine']} x{result['world_size']} on "
                     f"{hw.get('gpu_name') or hw.get('cpu_model')}", fontsize=10)  # fmt: skip

    try_plot(draw, path)


def grad_clip_note(args) -> dict[str, Any]:
    """The JSON's record of ``--grad-clip`` (also in ``config.grad_clip``)."""
    if args.grad_clip <= 0:
        return {"max_norm": 0.0, "how": "no clipping"}
    if args.engine.startswith("zero"):
        how = ("DeepSpeed's gradient_clipping inside engine.step() (in opt_ms); FRUGAL runs its "
               "own inf/nan check")  # fmt: skip
    else:
        how = ("train.engine_setup.clip_gradients (torch get_total_norm + clip_grads_with_norm_, "
               "= clip_grad_norm_; FSDP2's norm made whole) for every variant after backward, "
               "before the optimizer-step mark (in step_ms, not opt_ms); FRUGAL variants on "
               "single/ddp: FRUGAL.clip_grad_norm_ instead (norm only; the step applies the "
               "coefficient in its kernels), else the norm to step(grad_norm=...)")  # fmt: skip
    return {"max_norm": args.grad_clip, "how": how}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=ENGINES, default="single")
    ap.add_argument("--model", default="1b")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (fewer if over budget)")
    ap.add_argument("--precision", choices=("mixed", "bf16", "fp32"), default="mixed")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--only", default=None, help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--max-seconds", type=float, default=None, help="wall budget of the launch")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--scaling-models", default="350m,1b,3b,7b,13b,20b")
    ap.add_argument("--scaling-variants", default="adamw,frugal_d0")
    ap.add_argument("--scaling-batch-size", type=int, default=4)
    ap.add_argument("--scaling-steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-clip", type=float, default=0.0, metavar="MAX_NORM",
                    help="clip every variant's gradients to this total norm in each timed "
                    "iteration (FRUGAL: step(grad_norm=...)); 0: no clip")  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON path (PNG and .md alongside)")
    ap.add_argument("--replot", default=None, help="redraw the PNG/table of an existing JSON")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="JSONs of one-variant launches to join into --out (then replot)",
    )
    args = ap.parse_args(argv)
    if args.merge and not args.out:
        ap.error("--merge needs --out (the joined JSON)")
    if args.grad_clip < 0:
        ap.error(f"--grad-clip must be >= 0 (0: no clipping), got {args.grad_clip}")
    if args.precision == "bf16" and args.engine.startswith("zero"):
        ap.error("--precision bf16 is for single/fsdp2; DeepSpeed keeps float32 masters (mixed)")
    for name in (args.only or "").split(",") + args.scaling_variants.split(","):
        if name and name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        result = merge(args.merge, Path(args.out))
        Path(args.out).with_suffix(".md").write_text(table(result) + "\n")
        plot(result, Path(args.out).with_suffix(".png"))
        print(table(result))
        return
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        plot(result, Path(args.replot).with_suffix(".png"))
        print(table(result))
        return
    budget = Budget(args.max_seconds)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.engine != "single" and world < 2:
        raise SystemExit(f"--engine {args.engine} needs torchrun --nproc_per_node >= 2")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else \
        torch.device("cpu")  # fmt: skip
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=180))  # fmt: skip
    suffix = f"_{args.engine}" + ("_scaling" if args.scaling else "") + ("" if cuda else "_cpu")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu_memory_speed{suffix}.json")
    result: dict[str, Any] = {
        "benchmark": "gpu_memory_speed", "config": vars(args), "world_size": world,
        "provenance": provenance(), "copy_bandwidth_bytes_per_s": copy_bandwidth(device),
        "frugal_common": {**FRUGAL_COMMON, **frugal_device_options()}, "variants": VARIANTS,
        "grad_clip": grad_clip_note(args),
        "rows": [], "complete": False,
    }  # fmt: skip
    if args.scaling:
        plan = [(m, v) for m in args.scaling_models.split(",")
                for v in args.scaling_variants.split(",")]  # fmt: skip
        kw = dict(batch_size=args.scaling_batch_size, steps=max(1, args.scaling_steps - 1),
                  warmup=1, checkpointing=True)  # fmt: skip
    else:
        names = args.only.split(",") if args.only else list(VARIANTS)
        plan = [(args.model, v) for v in names]
        kw = dict(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                  checkpointing=args.checkpointing)  # fmt: skip
    if args.engine == "zero3" and len({v for _, v in plan}) > 1 and rank == 0:
        print("[gpu_memory_speed] warning: under ZeRO-3 DeepSpeed keeps a finished engine's "
              "memory in the process, so later variants' peaks include earlier ones; for memory "
              "figures run one variant per launch (--only) and join them with --merge",
              flush=True)  # fmt: skip
    failed: set[str] = set()
    for i, (model_name, variant) in enumerate(plan):
        share = budget.share(len(plan) - i)
        if args.scaling and variant in failed:
            row = {"status": "skipped", "note": "a smaller model already ran out of memory"}
        elif args.max_seconds is not None and _agree_min(budget.remaining(), world) < 5:
            row = {"status": "skipped", "note": "time budget (--max-seconds) exhausted"}
        else:
            row = run_one(args, variant, model_name, device, world, rank, share, **kw)
        row.update(variant=variant, model=model_name)
        if row["status"] in ("oom", "error"):
            failed.add(variant)
        result["rows"].append(row)
        result["elapsed_s"] = budget.elapsed()
        if rank == 0:
            write_json(out, result)
    result["complete"] = True
    if rank == 0:
        write_json(out, result)
        md = table(result)
        out.with_suffix(".md").write_text(md + "\n")
        print(md)
        print(f"wrote {out}")
        plot(result, out.with_suffix(".png"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
