#!/usr/bin/env python
"""Where ``optimizer.step()`` spends its time at LLaMA-1B shapes: a per-kernel breakdown.

For each variant (the optimizer options of ``gpu_memory_speed.py``'s ``VARIANTS``, plus the same
with ``nonfinite="ignore"`` where it matters, and ``*_normgiven``: the same with
``step(grad_norm=...)``, the norm computed outside the timed step as a loop's clip would; the
row's ``grad_norm`` says so, None elsewhere), on one GPU: build LLaMA-1B (float32 parameters),
set fixed random float32 gradients once (seed 1), build the optimizer, take ``--warmup`` steps
(the first one creates the state and chooses the subspace; ``update_gap`` is larger than the run,
so no later step refreshes), then

* ``step_ms``: the median of ``--steps`` CUDA-event times of ``step()``;
* ``host_ms``: the median wall time of the ``step()`` call itself (no synchronisation inside the
  timed region; the GPU is idle when it starts), i.e. the Python + launch time;
* a ``torch.profiler`` pass over ``--profile-steps`` steps: every CUDA kernel's total time and
  launch count per step (the top ``--top`` by time), and the number of kernel launches per step;
* with ``--cprofile``: a ``cProfile`` pass over ``--profile-steps`` more steps, the ``--top``
  Python functions by own time per step (where the host time goes);
* with ``--refresh`` (FRUGAL variants): every group's ``update_gap`` set to 1, so that each step
  refreshes the subspaces: the median CUDA-event time of ``--refresh-steps`` such steps
  (``refresh.step_ms``, after one untimed refresh that compiles what the refresh path compiles),
  the top kernels of one more (``refresh.top_kernels``) and, with ``--cprofile``, its top Python
  functions (``refresh.host_top``).

Usage::

    python benchmarks/step_trace.py [--only adamw,frugal_block_d0.25] [--out PATH]

Writes JSON (default ``benchmarks/results/step_trace_cuda.json``) and prints a table. Needs CUDA.
"""

from __future__ import annotations

import argparse
import functools
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
# ``<variant>_normgiven``: the variant's options (default ``nonfinite="skip"``), each step given
# ``grad_norm`` -- the total 2-norm of the fixed gradients, computed once outside every timed
# region (``torch.nn.utils.get_total_norm``, what a training loop's clip returns each step) --
# so the inf/nan verdict is isfinite(grad_norm) instead of the gradient-reading check.
GRAD_NORM_BASES = (
    "frugal_block_d0.25",
    "frugal_d0",
    "frugal_columns_d0.25",
    "frugal_svd_d0.25",
    "frugal_svd_matched_d0.25",
)
GRAD_NORM_OF = {f"{v}_normgiven": v for v in GRAD_NORM_BASES}
TRACE_VARIANTS.update({k: TRACE_VARIANTS[v] for k, v in GRAD_NORM_OF.items()})
GRAD_NORM_NOTE = ("step(grad_norm=n), n = torch.nn.utils.get_total_norm of the fixed gradients, "
                  "computed once before timing (outside every timed region)")  # fmt: skip


def _kernel_table(prof: Any, steps: int, top: int) -> tuple[list[dict[str, Any]], float, int]:
    """(top kernels by time per step, kernel ms per step, launches per step) of a profile."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launches = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name[:90]]
            k[0] += ev.device_time_total / 1e3 / steps
            k[1] += 1
            launches += 1
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    table = [{"name": n, "ms_per_step": v[0], "launches_per_step": v[1] / steps} for n, v in rows]
    return table, sum(v[0] for v in kernels.values()), launches // max(steps, 1)


def _host_table(step: Any, steps: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` Python functions by own time per step over ``steps`` calls of ``step``."""
    import cProfile
    import pstats

    cp = cProfile.Profile()
    torch.cuda.synchronize()
    cp.enable()
    for _ in range(steps):
        step()
    cp.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(cp).stats  # (file, line, func) -> (cc, nc, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {
            "function": f"{Path(k[0]).name}:{k[1]}:{k[2]}",
            "calls_per_step": v[1] / steps,
            "own_ms_per_step": v[2] * 1e3 / steps,
            "cum_ms_per_step": v[3] * 1e3 / steps,
        }
        for k, v in rows
    ]


def _event_ms(step: Any, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        step()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def trace_refresh(opt: Any, args: argparse.Namespace, step: Any) -> dict[str, Any] | None:
    """The ``--refresh`` figures (module docstring) of ``step()`` (``opt.step``, or with its
    ``grad_norm``), or None without ``update_gap`` groups."""
    groups = [g for g in opt.param_groups if "update_gap" in g]
    if not groups:
        return None
    old = [g["update_gap"] for g in groups]
    for g in groups:
        g["update_gap"] = 1
    try:
        step()  # untimed: what only the refresh path compiles
        torch.cuda.synchronize()
        ms = _event_ms(step, args.refresh_steps)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        top, kernel_ms, launches = _kernel_table(prof, 1, args.top)
        host = _host_table(step, 1, args.top) if args.cprofile else []
    finally:
        for g, gap in zip(groups, old):
            g["update_gap"] = gap
    return {"step_ms": statistics.median(ms), "all_ms": ms, "kernel_ms": kernel_ms,
            "launches": launches, "top_kernels": top, "host_top": host}  # fmt: skip


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
    step = opt.step
    if variant in GRAD_NORM_OF:  # the norm a loop's clip would hand over (outside the step)
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        step = functools.partial(opt.step, grad_norm=norm)
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    torch.cuda.synchronize()
    step_ms, host_ms = [], []
    for _ in range(args.steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        a.record()
        step()
        b.record()
        host_ms.append((time.perf_counter() - t) * 1e3)
        b.synchronize()
        step_ms.append(a.elapsed_time(b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.profile_steps):
            step()
        torch.cuda.synchronize()
    top, kernel_ms, launches = _kernel_table(prof, args.profile_steps, args.top)
    host_top = _host_table(step, args.profile_steps, args.top) if args.cprofile else []
    row = {
        "variant": variant, "options": kw, "first_step_s": first_s,
        "step_ms": statistics.median(step_ms), "host_ms": statistics.median(host_ms),
        "kernel_ms_per_step": kernel_ms, "launches_per_step": launches,
        "top_kernels": top, "host_top": host_top,
        "grad_norm": GRAD_NORM_NOTE if variant in GRAD_NORM_OF else None,
        "refresh": trace_refresh(opt, args, step) if args.refresh and name == "frugal" else None,
    }  # fmt: skip
    del step, opt, model
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
    ap.add_argument("--refresh", action="store_true", help="also steps that refresh (FRUGAL)")
    ap.add_argument("--refresh-steps", type=int, default=3)
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
        ref = row["refresh"]
        if ref:
            every = [round(x, 1) for x in ref["all_ms"]]
            print(f"   refresh step {ref['step_ms']:.1f} ms (all {every}), "
                  f"kernels {ref['kernel_ms']:.1f} ms in {ref['launches']} launches")  # fmt: skip
            for k in ref["top_kernels"]:
                ms, x = k["ms_per_step"], k["launches_per_step"]
                print(f"   refresh {ms:8.3f} ms x{x:<5.0f} {k['name']}")
            for h in ref["host_top"]:
                own, cum, x = h["own_ms_per_step"], h["cum_ms_per_step"], h["calls_per_step"]
                fn = h["function"]
                print(f"   refresh host {own:8.3f} ms own, {cum:8.3f} cum, x{x:<6.0f} {fn}")
    write_json(
        Path(args.out),
        {"provenance": provenance(), "code": git_info(REPO), "args": vars(args), "rows": rows},
    )


if __name__ == "__main__":
    main()
