#!/usr/bin/env python
"""Where ``optimizer.step()`` spends its time at LLaMA-1B shapes: a per-kernel breakdown.

For each variant (the optimizer options of ``gpu_memory_speed.py``'s ``VARIANTS``, plus the same
with ``nonfinite="ignore"`` where it matters), on one GPU: build LLaMA-1B (float32 parameters),
set fixed random float32 gradients once (seed 1), build the optimizer, take ``--warmup`` steps
(the first one creates the state and chooses the subspace; ``update_gap`` is larger than the run,
so no later step refreshes), then

* ``step_ms``: the median of ``--steps`` CUDA-event times of ``step()``;
* ``host_ms``: the median wall time of the ``step()`` call itself (no synchronisation inside the
  timed region; the GPU is idle when it starts), i.e. the Python + launch time;
* a ``torch.profiler`` pass over ``--profile-steps`` steps: every CUDA kernel's total time and
  launch count per step (the top ``--top`` by time), and the number of kernel launches per step;
* with ``--cprofile``: a ``cProfile`` pass over ``--profile-steps`` more steps, the ``--top``
  Python functions by own time per step (where the host time goes).

Usage::

    python benchmarks/step_trace.py [--only adamw,frugal_block_d0.25] [--out PATH]

Writes JSON (default ``benchmarks/results/step_trace_cuda.json``) and prints a table. Needs CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, frugal_device_options, git_info, provenance, write_json  # noqa: E402
from gpu_memory_speed import FRUGAL_COMMON, VARIANTS, model_config  # noqa: E402

from frugal_dist.train import optimizers as presets  # noqa: E402
from frugal_dist.train.model import build_model  # noqa: E402

TRACE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{k: v for k, v in VARIANTS.items() if k not in ("rso", "frugal_block_strided_d0.25")},
    "frugal_block_d0.25_nocheck": ("frugal", {**VARIANTS["frugal_block_d0.25"][1],
                                              "nonfinite": "ignore"}),
    "frugal_d0_nocheck": ("frugal", {**VARIANTS["frugal_d0"][1], "nonfinite": "ignore"}),
}  # fmt: skip


def trace_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    name, opts = TRACE_VARIANTS[variant]
    if name == "frugal":
        opts = {**FRUGAL_COMMON, **frugal_device_options(), **opts}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(model_config(args.model), max_seq_len=256)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device="cuda", dtype=p.dtype) * 1e-3
    kw = {"lr": 1e-3, "weight_decay": 0.0} if name == "adamw" else opts
    opt = presets.build_optimizer(model, name, **kw)
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        opt.step()
    torch.cuda.synchronize()
    step_ms, host_ms = [], []
    for _ in range(args.steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        a.record()
        opt.step()
        b.record()
        host_ms.append((time.perf_counter() - t) * 1e3)
        b.synchronize()
        step_ms.append(a.elapsed_time(b))
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile_steps):
            opt.step()
        torch.cuda.synchronize()
    host_top: list[dict[str, Any]] = []
    if args.cprofile:
        import cProfile
        import pstats

        cp = cProfile.Profile()
        torch.cuda.synchronize()
        cp.enable()
        for _ in range(args.profile_steps):
            opt.step()
        cp.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(cp).stats  # (file, line, func) -> (cc, nc, tottime, cumtime, callers)
        rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[: args.top]
        host_top = [
            {
                "function": f"{Path(k[0]).name}:{k[1]}:{k[2]}",
                "calls_per_step": v[1] / args.profile_steps,
                "own_ms_per_step": v[2] * 1e3 / args.profile_steps,
                "cum_ms_per_step": v[3] * 1e3 / args.profile_steps,
            }
            for k, v in rows
        ]
    launches = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name[:90]]
            k[0] += ev.device_time_total / 1e3 / args.profile_steps
            k[1] += 1
            launches += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]
    row = {
        "variant": variant, "options": kw, "first_step_s": first_s,
        "step_ms": statistics.median(step_ms), "host_ms": statistics.median(host_ms),
        "kernel_ms_per_step": sum(v[0] for v in kernels.values()),
        "launches_per_step": launches / args.profile_steps,
        "top_kernels": [{"name": n, "ms_per_step": v[0],
                         "launches_per_step": v[1] / args.profile_steps} for n, v in top],
        "host_top": host_top,
    }  # fmt: skip
    del opt, model
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--only", default=None, help=f"comma list of {list(TRACE_VARIANTS)}")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--cprofile", action="store_true", help="also the Python functions by own time")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/step_trace_cuda.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_trace.py needs CUDA")
    names = args.only.split(",") if args.only else list(TRACE_VARIANTS)
    rows = []
    for v in names:
        row = trace_variant(v, args)
        rows.append(row)
        print(f"== {v}: step {row['step_ms']:.2f} ms, host {row['host_ms']:.2f} ms, "
              f"kernels {row['kernel_ms_per_step']:.2f} ms in {row['launches_per_step']:.0f} "
              f"launches, first step {row['first_step_s']:.2f} s", flush=True)  # fmt: skip
        for k in row["top_kernels"]:
            print(f"   {k['ms_per_step']:7.3f} ms  x{k['launches_per_step']:<5.0f} {k['name']}")
        for h in row["host_top"]:
            print(
                f"   host {h['own_ms_per_step']:7.3f} ms own, {h['cum_ms_per_step']:7.3f} cum, "
                f"x{h['calls_per_step']:<6.0f} {h['function']}"
            )
    write_json(
        Path(args.out),
        {"provenance": provenance(), "code": git_info(REPO), "args": vars(args), "rows": rows},
    )


if __name__ == "__main__":
    main()
