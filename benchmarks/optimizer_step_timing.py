"""How ``optimizer_step.py`` times one variant: per-step wall time (perf_counter on CPU, CUDA
events on GPU), the refresh steps, the state size checked against the closed form, the pooling of
interleaved rounds, and the optional torch.profiler table.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from optimizer_step_setup import (
    expected_frugal_bytes,
    expected_torch_adamw_bytes,
    make_optimizer,
    torch_state_bytes,
    variant_list,
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
