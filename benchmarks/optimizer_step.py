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
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
try:  # an installed (or PYTHONPATH) frugal_dist wins; else the checkout this file lives in
    import frugal_dist
except ImportError:
    sys.path.insert(0, str(REPO))
    import frugal_dist

from frugal_dist import FRUGAL  # noqa: E402

LLAMA_130M = dict(vocab=32000, dim=768, layers=12, heads=12, intermediate=2048)
LR = 1e-3
WEIGHT_DECAY = 0.0  # as FRUGAL's default; torch AdamW's default (1e-2) is overridden to match
PARAM_SEED = 0
GRAD_SEED = 1
FRUGAL_SEED = 0


# ---------------------------------------------------------------------------------------- shapes
def llama_param_specs(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, group) of every LLaMA parameter, in model order; group is frugal|adamw.

    Linear weights are (out_features, in_features) as in ``torch.nn.Linear``.
    """
    v, d, f = cfg["vocab"], cfg["dim"], cfg["intermediate"]
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (v, d), "adamw")]
    for i in range(cfg["layers"]):
        pre = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append((f"{pre}.self_attn.{proj}.weight", (d, d), "frugal"))
        specs.append((f"{pre}.mlp.gate_proj.weight", (f, d), "frugal"))
        specs.append((f"{pre}.mlp.up_proj.weight", (f, d), "frugal"))
        specs.append((f"{pre}.mlp.down_proj.weight", (d, f), "frugal"))
        specs.append((f"{pre}.input_layernorm.weight", (d,), "adamw"))
        specs.append((f"{pre}.post_attention_layernorm.weight", (d,), "adamw"))
    specs.append(("model.norm.weight", (d,), "adamw"))
    specs.append(("lm_head.weight", (v, d), "adamw"))
    return specs


# ------------------------------------------------------------------------- closed-form state size
def _rhu(x: float) -> int:
    """Round half up, the rounding FRUGAL uses for every subspace size."""
    return int(math.floor(x + 0.5))


def _mat(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def expected_frugal_bytes(
    specs: list[tuple[str, tuple[int, ...], str]],
    subspace: str,
    density: float,
    block_order: str = "descending",
    coord_choice: str = "columns",
) -> tuple[int, int]:
    """(state bytes, aux bytes) of FRUGAL during refresh 0, from the shapes alone.

    State (frugal.py): every parameter keeps ``step`` (float32 scalar, 4 B). The state-full part
    adds ``sf_step`` (4 B) and AdamW's ``exp_avg`` + ``exp_avg_sq`` (float32, 8 B per state-full
    coordinate):

    * adamw group: everything state-full -> 8 * numel + 4 + 4 per param.
    * block: a = round_half_up(rho * n) (>= 1 if rho > 0) active tensors -> 8 * numel + 4 each;
      inactive tensors keep only ``step``.
    * coordinate columns: every matrix keeps sf_step and an (m, round(rho*n)) pair of buffers
      (an empty (m, 0) pair at rho = 0); rows (round(rho*m), n); randk round(rho*m*n).
    * projection: r = round(rho * min(m, n)); buffers (r, max) -> 8 * r * max(m, n) + 4.

    Aux (rebuildable metadata): coordinate indices int64 (8 B per selected column/row/entry);
    random projection bases float32 (min(m, n), r) -> 4 * r * min(m, n); block: nothing.
    """
    state = aux = 0
    frugal = [shape for _, shape, g in specs if g == "frugal"]
    for _, shape, g in specs:
        if g == "adamw":
            state += 8 * math.prod(shape) + 4 + 4
    state += 4 * len(frugal)  # `step` of every frugal-group parameter
    if subspace == "block":
        n = len(frugal)
        a = 0 if density <= 0 else min(n, max(1, _rhu(density * n)))
        if block_order == "descending":
            active = list(range(n - a, n))
        elif block_order in ("ascending", "mirror"):
            active = list(range(a))
        else:
            raise ValueError("closed form only for ascending/descending/mirror block orders")
        for i in active:
            state += 8 * math.prod(frugal[i]) + 4
    elif subspace == "coordinate":
        for shape in frugal:
            m, n = _mat(shape)
            if coord_choice == "columns":
                k = min(n, _rhu(density * n))
                state += 8 * m * k + 4
            elif coord_choice == "rows":
                k = min(m, _rhu(density * m))
                state += 8 * k * n + 4
            else:
                k = min(m * n, _rhu(density * m * n))
                state += 8 * k + 4
            aux += 8 * k
    elif subspace == "projection":
        for shape in frugal:
            m, n = _mat(shape)
            r = min(min(m, n), _rhu(density * min(m, n)))
            state += 8 * r * max(m, n) + 4
            aux += 4 * r * min(m, n)
    else:
        raise ValueError(subspace)
    return state, aux


def expected_torch_adamw_bytes(params: list[torch.Tensor]) -> int:
    """torch.optim.AdamW: exp_avg + exp_avg_sq in the param dtype, float32 scalar ``step``."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


def torch_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


# --------------------------------------------------------------------------------------- variants
def variant_list() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        dict(
            name="adamw_foreach",
            label="torch AdamW (foreach)",
            kind="torch",
            opts=dict(foreach=True),
        ),
        dict(name="adamw_fused", label="torch AdamW (fused)", kind="torch", opts=dict(fused=True)),
    ]
    choice = {
        "block": dict(block_order="descending"),
        "coordinate": dict(coord_choice="columns"),
        "projection": dict(proj_type="random"),
    }
    what = {"block": "block desc", "coordinate": "coord columns", "projection": "proj random"}
    for sub in ("block", "coordinate", "projection"):
        for rho in (0.0, 0.25):
            out.append(
                dict(
                    name=f"frugal_{sub}_d{rho:g}",
                    label=f"FRUGAL {what[sub]} ρ={rho:g}",
                    kind="frugal",
                    subspace=sub,
                    density=rho,
                    opts=dict(subspace=sub, density=rho, **choice[sub]),
                )
            )
    out.append(
        dict(
            name="frugal_block_d1",
            label="FRUGAL block ρ=1 (diag.)",
            kind="frugal",
            subspace="block",
            density=1.0,
            diagnostic=True,
            opts=dict(subspace="block", density=1.0, block_order="descending"),
        )
    )
    return out


def make_optimizer(
    v: dict[str, Any], frugal_p: list, frugal_n: list, adamw_p: list, adamw_n: list, gap: int
) -> torch.optim.Optimizer:
    if v["kind"] == "torch":
        return torch.optim.AdamW(frugal_p + adamw_p, lr=LR, weight_decay=WEIGHT_DECAY, **v["opts"])
    groups = [
        {"params": frugal_p, "names": frugal_n, "algorithm": "frugal"},
        {"params": adamw_p, "names": adamw_n, "algorithm": "adamw"},
    ]
    return FRUGAL(
        groups,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        update_gap=gap,
        seed=FRUGAL_SEED,
        state_full="adamw",
        state_free="signsgd",
        **v["opts"],
    )


# ----------------------------------------------------------------------------------------- timing
class Timer:
    """Per-call wall time of a callable: perf_counter on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def one(self, fn: Callable[[], Any]) -> float:
        return self.many(fn, 1)[0]

    def many(self, fn: Callable[[], Any], n: int) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            ev = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(n)
            ]
            for a, b in ev:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in ev]
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def code_version() -> dict[str, Any]:
    """Which frugal_dist was measured: its path, a hash of its sources, and git state if any."""
    import hashlib
    import subprocess

    pkg = Path(frugal_dist.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    info: dict[str, Any] = {
        "frugal_dist_path": str(pkg),
        "frugal_dist_sources_sha256": h.hexdigest(),
    }
    try:
        git = ["git", "-C", str(pkg.parent)]
        info["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "frugal_dist"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        info["frugal_dist_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu_model"] = platform.processor() or "unknown"
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
    return info


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


def build_tensors(specs, device, dtype):
    """Params (fixed seed), their initial values, and gradients set once (fixed seed)."""
    gen = torch.Generator(device=device)
    params, init = [], []
    gen.manual_seed(PARAM_SEED)
    for _, shape, _ in specs:
        t = torch.empty(shape, device=device, dtype=torch.float32)
        t.normal_(0.0, 0.02, generator=gen)
        p = torch.nn.Parameter(t.to(dtype))
        params.append(p)
        init.append(p.detach().clone())
    gen.manual_seed(GRAD_SEED)
    for p in params:
        g = torch.empty(p.shape, device=device, dtype=torch.float32)
        g.normal_(0.0, 1e-2, generator=gen)
        p.grad = g.to(dtype)
    return params, init


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU (None if n/a).

    Unlike the load average it does not count this benchmark's own threads while they fit the
    cores, so a value well above 0 means another process competed for the CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split()[1].split("=")[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_variant(v, args, specs, params, init, device, timer) -> dict[str, Any]:
    fr = [(n, p) for (n, _, g), p in zip(specs, params) if g == "frugal"]
    ad = [(n, p) for (n, _, g), p in zip(specs, params) if g == "adamw"]

    def fresh() -> torch.optim.Optimizer:
        with torch.no_grad():  # every instance starts from the same parameter values
            for p, x in zip(params, init):
                p.copy_(x)
        fp, fn = [p for _, p in fr], [n for n, _ in fr]
        return make_optimizer(v, fp, fn, [p for _, p in ad], [n for n, _ in ad], args.update_gap)

    row: dict[str, Any] = {k: v.get(k) for k in ("name", "label", "kind", "subspace", "density")}
    row["diagnostic"] = bool(v.get("diagnostic", False))
    if hasattr(os, "getloadavg"):  # other processes on the machine skew CPU timings: record it
        row["loadavg_1min_before"] = round(os.getloadavg()[0], 2)
    psi = cpu_pressure()
    if psi is not None:
        row["cpu_pressure_avg10_before"] = psi
    try:
        if args.prewarm:  # a throw-away instance loads kernels / warms allocators for step 0
            tmp = fresh()
            tmp.step()
            del tmp
            gc.collect()
        opt = fresh()
        refresh_ms = timer.one(opt.step)  # step index 0: refresh 0 + lazy state creation
    except (RuntimeError, ValueError, TypeError) as e:  # e.g. fused unsupported on device/dtype
        if v["kind"] != "torch":
            raise
        row.update(skipped=True, note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        gc.collect()
        return row
    if args.warmup:
        timer.many(opt.step, args.warmup)
    base_mem = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = timer.many(opt.step, args.steps)
    if device.type == "cuda":
        row["step_peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base_mem
    # state after the timed steps, still inside refresh 0
    if v["kind"] == "frugal":
        state, aux = opt.state_bytes(), opt.aux_bytes()
        exp_state, exp_aux = expected_frugal_bytes(
            specs,
            v["subspace"],
            v["density"],
            v["opts"].get("block_order", "descending"),
            v["opts"].get("coord_choice", "columns"),
        )
        assert state == torch_state_bytes(opt), "state_bytes() disagrees with the state tensors"
        assert state == exp_state, f"{v['name']}: state_bytes {state} != closed form {exp_state}"
        assert aux == exp_aux, f"{v['name']}: aux_bytes {aux} != closed form {exp_aux}"
        if args.update_gap == 1 + args.warmup + args.steps:
            refresh2_ms = timer.one(opt.step)  # step index update_gap: refresh 1
            row["state_bytes_after_refresh2"] = opt.state_bytes()
        else:  # a custom --update-gap: refresh 1 is too far away to reach
            refresh2_ms = None
    else:
        state, aux = torch_state_bytes(opt), 0
        exp_state = expected_torch_adamw_bytes(params)
        exp_aux = 0
        if state != exp_state:
            print(f"note: {v['name']} state {state} B != expected {exp_state} B", file=sys.stderr)
        refresh2_ms = None
    row.update(
        skipped=False,
        steps=args.steps,
        median_ms=statistics.median(times),
        mean_ms=statistics.fmean(times),
        min_ms=min(times),
        max_ms=max(times),
        times_ms=times,
        refresh_ms=refresh_ms,
        refresh2_ms=refresh2_ms,
        state_bytes=state,
        expected_state_bytes=exp_state,
        state_matches_formula=state == exp_state,
        aux_bytes=aux,
        expected_aux_bytes=exp_aux,
    )
    if v["name"] == "adamw_fused":
        row["note"] = "fused=True"
    del opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def merge_rounds(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rows of several rounds: step statistics over all timed steps, the median
    of the refresh times, the max of the peak memory; sizes are identical across rounds."""
    row = dict(rs[0])
    if row["skipped"] or len(rs) == 1:
        return row
    times = [t for r in rs for t in r["times_ms"]]
    row.update(
        rounds=len(rs),
        times_ms=times,
        median_ms=statistics.median(times),
        mean_ms=statistics.fmean(times),
        min_ms=min(times),
        max_ms=max(times),
        round_median_ms=[r["median_ms"] for r in rs],
        refresh_ms=statistics.median(r["refresh_ms"] for r in rs),
        round_refresh_ms=[r["refresh_ms"] for r in rs],
    )
    if row["refresh2_ms"] is not None:
        row["refresh2_ms"] = statistics.median(r["refresh2_ms"] for r in rs)
        row["round_refresh2_ms"] = [r["refresh2_ms"] for r in rs]
    if "step_peak_extra_bytes" in row:
        row["step_peak_extra_bytes"] = max(r["step_peak_extra_bytes"] for r in rs)
    if "loadavg_1min_before" in row:
        row["loadavg_1min_before"] = [r["loadavg_1min_before"] for r in rs]
    if "cpu_pressure_avg10_before" in row:
        row["cpu_pressure_avg10_before"] = [r["cpu_pressure_avg10_before"] for r in rs]
    assert all(r["state_bytes"] == row["state_bytes"] for r in rs)
    return row


def profile_variant(name, args, specs, params, init, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    v = next((x for x in variant_list() if x["name"] == name), None)
    if v is None:
        sys.exit(f"unknown variant {name!r}; choose from {[x['name'] for x in variant_list()]}")
    fr = [(n, p) for (n, _, g), p in zip(specs, params) if g == "frugal"]
    ad = [(n, p) for (n, _, g), p in zip(specs, params) if g == "adamw"]
    gap = max(args.update_gap, args.warmup + 5)  # the 3 profiled steps must contain no refresh
    opt = make_optimizer(
        v, [p for _, p in fr], [n for n, _ in fr], [p for _, p in ad], [n for n, _ in ad], gap
    )
    for _ in range(1 + args.warmup):
        opt.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(3):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# torch.profiler, 3 non-refresh steps of {name} on {device.type}")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def markdown_table(rows: list[dict[str, Any]], device: str) -> str:
    base = next(
        (r["state_bytes"] for r in rows if r["name"] == "adamw_foreach" and not r["skipped"]), None
    )
    base_ms = next(
        (r["median_ms"] for r in rows if r["name"] == "adamw_foreach" and not r["skipped"]), None
    )
    cuda = device == "cuda"
    head = [
        "variant",
        "median ms",
        "mean ms",
        "× AdamW time",
        "refresh ms (step 0)",
        "refresh ms (later)",
        "state MiB",
        "state / AdamW",
        "aux KiB",
        "state = formula",
    ]
    if cuda:
        head.append("step peak extra MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r["skipped"]:
            cells = [r["label"], "skipped"] + [""] * (len(head) - 3) + [r.get("note", "")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            r["label"],
            f"{r['median_ms']:.1f}",
            f"{r['mean_ms']:.1f}",
            "-" if not base_ms else f"{r['median_ms'] / base_ms:.2f}",
            f"{r['refresh_ms']:.1f}",
            "-" if r["refresh2_ms"] is None else f"{r['refresh2_ms']:.1f}",
            fmt_mib(r["state_bytes"]),
            "-" if not base else f"{r['state_bytes'] / base:.3f}",
            f"{r['aux_bytes'] / 1024:,.1f}",
            "yes" if r["state_matches_formula"] else "NO",
        ]
        if cuda:
            cells.append(fmt_mib(r.get("step_peak_extra_bytes")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    ok = [r for r in rows if not r["skipped"]]
    labels = [r["label"] for r in ok]
    colors = [
        "#888888" if r["kind"] == "torch" else ("#c9a0dc" if r["diagnostic"] else "#1f77b4")
        for r in ok
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.45 * len(ok) + 2.2), sharey=True)
    y = range(len(ok))
    axes[0].barh(y, [r["median_ms"] for r in ok], color=colors)
    axes[0].set_xlabel("median step time (ms)")
    axes[1].barh(y, [r["refresh_ms"] for r in ok], color=colors, label="step 0")
    axes[1].scatter(
        [r["refresh2_ms"] if r["refresh2_ms"] is not None else float("nan") for r in ok],
        list(y),
        color="k",
        marker="|",
        s=200,
        label="later refresh",
        zorder=3,
    )
    axes[1].set_xlabel("refresh step time (ms)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axes[1].legend(
        handles=[
            Patch(facecolor="#bbbbbb", label="step 0 (bar)"),
            Line2D(
                [],
                [],
                color="k",
                marker="|",
                linestyle="none",
                markersize=12,
                label="later refresh",
            ),
        ],
        loc="lower right",
        fontsize=8,
    )
    axes[2].barh(y, [r["state_bytes"] / 2**20 for r in ok], color=colors)
    axes[2].set_xlabel("optimizer state (MiB)")
    axes[0].set_yticks(list(y))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


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
