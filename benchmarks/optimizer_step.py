#!/usr/bin/env python
"""Optimizer-step micro-benchmark on a LLaMA-130M-shaped parameter set (no model, no data).

What is measured: ``optimizer.step()`` alone. The parameters are built directly with the shapes of
LLaMA-130M (vocab 32000, dim 768, 12 layers, 12 heads, intermediate 2048 -> 134.1M parameters);
random gradients are set once, before any timing, and never recreated. Every variant starts from
the same parameter values (fixed seeds) and a fresh optimizer.

Param groups follow the paper: the 2-D weights of the transformer layers (q/k/v/o/gate/up/down)
are the ``"frugal"`` group; embeddings, lm_head and all RMSNorm weights are the ``"adamw"`` group.

Variants: ``torch.optim.AdamW`` (foreach=True), ``torch.optim.AdamW`` (fused=True, skipped with a
note when unsupported), FRUGAL with subspace {block (descending), coordinate (columns),
projection (random)} x density {0.0, 0.25}, and one diagnostic variant, FRUGAL block density 1.0
(every tensor state-full: FRUGAL's own AdamW path, to separate the cost of FRUGAL's AdamW kernels
from the cost of the subspace machinery).

Timeline of one variant (``update_gap`` defaults to ``warmup + steps + 1``)::

    step index 0                    refresh 0 (+ lazy state creation)   -> refresh_ms
    step index 1 .. warmup          warm-up, not timed
    step index warmup+1 .. +steps   timed, no refresh                   -> median_ms / mean_ms
    (state bytes measured here and checked against the closed form)
    step index update_gap           refresh 1 (steady-state refresh)    -> refresh2_ms

Timing: ``time.perf_counter`` around each step on CPU; on CUDA a pair of ``torch.cuda.Event`` per
step (synchronised before the first and after the last), plus the peak extra CUDA memory a step
allocates beyond params + grads + state (``step_peak_extra_bytes``).

Usage::

    python benchmarks/optimizer_step.py --device cpu --steps 5 --warmup 1
    python benchmarks/optimizer_step.py --device cuda --rounds 3 # GPU figures, 3 interleaved passes
    python benchmarks/optimizer_step.py --quick                  # smoke test
    python benchmarks/optimizer_step.py --profile frugal_projection_d0.25   # torch.profiler table

Writes ``benchmarks/results/optimizer_step_<device>.json`` (or ``--out``) and a PNG bar chart with
the same stem, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from optimizer_step_report import code_version, hardware, markdown_table, plot
from optimizer_step_setup import (  # LLAMA_130M, llama_param_specs: also used by step_profile.py
    FRUGAL_SEED,
    GRAD_SEED,
    LLAMA_130M,
    LR,
    PARAM_SEED,
    REPO,
    WEIGHT_DECAY,
    build_tensors,
    llama_param_specs,
    variant_list,
)
from optimizer_step_timing import Timer, merge_rounds, profile_variant, run_variant

__all__ = ["LLAMA_130M", "code_version", "llama_param_specs", "main", "parse_args"]


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after step 0 (default 3)")
    ap.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="params/grads dtype"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    ap.add_argument("--update-gap", type=int, default=0, help="default 0 = warmup + steps + 1")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/optimizer_step_<device>.json)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole variant list this many times (interleaved) and pool the steps",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 warm-up")
    ap.add_argument("--only", default=None, help="comma-separated variant names to run")
    ap.add_argument(
        "--profile",
        default=None,
        metavar="VARIANT",
        help="instead of benchmarking, print a torch.profiler table of 3 steps of VARIANT",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--no-prewarm",
        dest="prewarm",
        action="store_false",
        help="skip the untimed throw-away step 0 that precedes each variant's timed step 0",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.update_gap == 0:
        args.update_gap = args.warmup + args.steps + 1
    if args.update_gap <= args.warmup + args.steps:
        ap.error("--update-gap must exceed warmup + steps (no refresh inside the timed steps)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(PARAM_SEED)
    specs = llama_param_specs(LLAMA_130M)
    params, init = build_tensors(specs, device, dtype)
    n_params = sum(p.numel() for p in params)
    n_frugal = sum(math.prod(s) for _, s, g in specs if g == "frugal")
    print(
        f"LLaMA-130M shapes: {len(params)} tensors, {n_params:,} params "
        f"({n_frugal:,} in the frugal group); device={device}, dtype={args.dtype}, "
        f"threads={torch.get_num_threads()}, steps={args.steps}, warmup={args.warmup}, "
        f"update_gap={args.update_gap}",
        flush=True,
    )

    if args.profile:
        profile_variant(args.profile, args, specs, params, init, device)
        return

    variants = variant_list()
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v["name"] in keep]
    timer = Timer(device)
    per_round: list[list[dict[str, Any]]] = []
    for r in range(args.rounds):  # rounds interleave the variants, so drifts hit them all alike
        rows_r = []
        for v in variants:
            t0 = time.perf_counter()
            row = run_variant(v, args, specs, params, init, device, timer)
            rows_r.append(row)
            status = row.get("note", "") if row["skipped"] else f"median {row['median_ms']:.1f} ms"
            tag = f"[round {r + 1}/{args.rounds}] " if args.rounds > 1 else ""
            print(
                f"  {tag}{v['name']:<26} {status}  ({time.perf_counter() - t0:.1f} s)", flush=True
            )
        per_round.append(rows_r)
    rows = [merge_rounds(list(rs)) for rs in zip(*per_round)]

    table = markdown_table(rows, args.device)
    print()
    print(table)
    out = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / "results" / f"optimizer_step_{args.device}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "optimizer_step",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv] if argv is None else ["<main()>", *argv],
        "argv": sys.argv,
        "hardware": hardware(device),
        "code": code_version(),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("OMP_", "MKL_", "MALLOC_", "PYTORCH_", "CUDA_VISIBLE", "TORCH_"))
        },
        "torch_version": torch.__version__,
        "python_version": sys.version,
        "config": {
            "model": "llama_130m",
            **LLAMA_130M,
            "n_params": n_params,
            "n_params_frugal_group": n_frugal,
            "n_tensors": len(params),
            "dtype": args.dtype,
            "steps": args.steps,
            "prewarm": args.prewarm,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "update_gap": args.update_gap,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "seeds": {"params": PARAM_SEED, "grads": GRAD_SEED, "frugal": FRUGAL_SEED},
            "frugal": {
                "state_full": "adamw",
                "state_free": "signsgd",
                "block_order": "descending",
                "coord_choice": "columns",
                "proj_type": "random",
                "proj_side": "auto",
            },
        },
        "rows": rows,
        "markdown_table": table,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    if not args.no_plot:
        title = (
            f"optimizer step, LLaMA-130M shapes ({n_params / 1e6:.1f}M params), {args.dtype}, "
            f"{result['hardware'].get('gpu_name') or result['hardware'].get('cpu_model')}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        )
        plot(rows, out.with_suffix(".png"), title)


if __name__ == "__main__":
    main()
