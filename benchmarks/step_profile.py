#!/usr/bin/env python
"""``optimizer.step()`` time against its memory-bandwidth bound, LLaMA-130M-shaped parameters.

Parameters have LLaMA-130M's shapes (see ``optimizer_step.py``: 84 layer matrices in the FRUGAL
group, embeddings / lm_head / norms in an AdamW group), float32, fixed seeds; fake gradients are
set once. Variants: ``torch.optim.AdamW(fused=True)``; FRUGAL with every tensor in AdamW groups;
FRUGAL block (descending) / coordinate (columns) / projection (random) at rho = 0.25 and 0; on
CUDA also projection with ``proj_qr_device="param"`` (QR on the GPU at refreshes).

Timing: CUDA events around each step on a GPU, ``time.perf_counter`` on the CPU; the median of
``--steps`` steps after ``--warmup`` untimed ones, with ``update_gap`` larger than the run so no
timed step refreshes; "refresh ms" is step 0 (lazy state creation + first subspace choice).

Bandwidth bound: the bytes any implementation must move per step, divided by the device's
measured copy bandwidth (a large ``copy_``, read + write counted). Per float32 parameter: read W
and G, write W (12 B); per state-full (compact) coordinate additionally read and write m and v
(16 B): AdamW 28 B/param, FRUGAL 12 B/param + 16 B x state-full coordinates.

Usage::

    python benchmarks/step_profile.py [--device cuda|cpu] [--steps 20] [--out PATH]

Writes JSON (default ``benchmarks/results/step_profile_<device>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import frugal_dist  # noqa: F401 - an installed / PYTHONPATH frugal_dist wins
except ImportError:
    sys.path.insert(0, str(HERE.parent))
from optimizer_step import LLAMA_130M, code_version, llama_param_specs  # noqa: E402

from frugal_dist import FRUGAL  # noqa: E402
from frugal_dist.core.subspaces import (  # noqa: E402
    block_count,
    coordinate_count,
    matrix_shape,
    projection_rank,
)

LR = 1e-3


def variants(device: torch.device) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        dict(name="torch_adamw_fused", kind="torch"),
        dict(name="frugal_all_adamw", kind="frugal", all_adamw=True, opts={}),
    ]
    choice = {"block": dict(block_order="descending"), "coordinate": dict(coord_choice="columns"),
              "projection": dict(proj_type="random")}  # fmt: skip
    for sub in ("block", "coordinate", "projection"):
        for rho in (0.25, 0.0):
            opts = dict(subspace=sub, density=rho, **choice[sub])
            out.append(dict(name=f"frugal_{sub}_d{rho:g}", kind="frugal", opts=opts))
    if device.type == "cuda":
        opts = dict(subspace="projection", density=0.25, proj_type="random",
                    proj_qr_device="param")  # fmt: skip
        out.append(dict(name="frugal_projection_d0.25_qr_on_device", kind="frugal", opts=opts))
    return out


def state_full_numel(specs, v: dict[str, Any]) -> int:
    """Compact state-full coordinates per step (each costs 16 B of moment traffic)."""
    if v["kind"] == "torch" or v.get("all_adamw"):
        return sum(math.prod(s) for _, s, _ in specs)
    total = sum(math.prod(s) for _, s, g in specs if g == "adamw")
    frugal = [s for _, s, g in specs if g == "frugal"]
    rho, sub = v["opts"]["density"], v["opts"]["subspace"]
    if sub == "block":
        a = block_count(len(frugal), rho)
        return total + sum(math.prod(s) for s in frugal[len(frugal) - a :])  # descending
    for s in frugal:
        m, n = matrix_shape(s)
        if sub == "coordinate":
            total += m * coordinate_count(n, rho)
        else:
            total += projection_rank((m, n), rho) * max(m, n)
    return total


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy (read + write)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of float32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        times.append(timed(lambda: dst.copy_(src), device))
    return 2 * src.nbytes / (statistics.median(times[1:]) / 1e3)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def make(v, specs, params) -> torch.optim.Optimizer:
    if v["kind"] == "torch":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    fr = [(n, p) for (n, _, g), p in zip(specs, params) if g == "frugal" and not v.get("all_adamw")]
    ad = [(n, p) for (n, _, g), p in zip(specs, params) if g == "adamw" or v.get("all_adamw")]
    groups = [{"params": [p for _, p in ad], "names": [n for n, _ in ad], "algorithm": "adamw"}]
    if fr:
        groups.insert(0, {"params": [p for _, p in fr], "names": [n for n, _ in fr]})
    return FRUGAL(groups, lr=LR, update_gap=10_000, seed=0, **v["opts"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    specs = llama_param_specs(LLAMA_130M)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device))
              for _, s, _ in specs]  # fmt: skip
    ggen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=ggen) * 0.01).to(device)
    init = [p.detach().clone() for p in params]
    bw = copy_bandwidth(device)
    n_params = sum(p.numel() for p in params)
    print(f"{n_params:,} params on {device}; copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    keep = set(filter(None, args.only.split(",")))
    for v in variants(device):
        if keep and v["name"] not in keep:
            continue
        with torch.no_grad():
            for p, x in zip(params, init):
                p.copy_(x)
        try:
            opt = make(v, specs, params)
        except (ValueError, RuntimeError) as e:  # e.g. an older FRUGAL without an option
            rows.append(dict(name=v["name"], skipped=f"{type(e).__name__}: {e}"))
            print(f"  {v['name']:<40} skipped: {e}", flush=True)
            continue
        refresh_ms = timed(opt.step, device)
        for _ in range(args.warmup):
            opt.step()
        times = [timed(opt.step, device) for _ in range(args.steps)]
        sf = state_full_numel(specs, v)
        nbytes = 12 * n_params + 16 * sf
        med = statistics.median(times)
        bound = nbytes / bw * 1e3
        rows.append(dict(name=v["name"], median_ms=med, min_ms=min(times), times_ms=times,
                         refresh_ms=refresh_ms, bytes_per_step=nbytes, state_full_numel=sf,
                         bound_ms=bound, x_bound=med / bound))  # fmt: skip
        print(f"  {v['name']:<40} {med:9.2f} ms  (bound {bound:7.2f} ms, x{med / bound:5.1f}; "
              f"refresh {refresh_ms:8.1f} ms)", flush=True)  # fmt: skip
        del opt
    out = Path(args.out) if args.out else HERE / "results" / f"step_profile_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    result = dict(benchmark="step_profile", date=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                  command=[sys.executable, *sys.argv], device=device.type, hardware=info,
                  code=code_version(), n_params=n_params, copy_bandwidth_Bps=bw,
                  steps=args.steps, warmup=args.warmup, rows=rows)  # fmt: skip
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
