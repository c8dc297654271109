#!/usr/bin/env python
"""The fused elementwise kernels (``frugal_dist.kernels.elementwise``) against torch fused AdamW,
LLaMA-1B shapes, one CUDA GPU.

Parameters and gradients: float32, LLaMA-1B shapes (``llama_param_specs``: 1.34 B parameters;
the 168 layer matrices are the FRUGAL part, embeddings / lm_head / norms the AdamW part), built
once from fixed seeds (``optimizer_step_setup.build_tensors``), no model, no data, no decay.

Rows (each the apply work of one optimizer step; "torch" = ``impl="torch"``, the present code's
kernels; "triton" = the new kernels; the AdamW part is torch fused in both unless named):

* ``adamw``: ``torch.optim.AdamW(fused=True).step()`` over every tensor -- the ratio's 1.0.
* ``block_d0.25``: AdamW on the AdamW part + the 42 active matrices (``descending``, window 0),
  ``free_apply_`` signSGD on the other 126; ``block_d0.25_triton_adamw``: AdamW part in Triton.
* ``rho0``: AdamW on the AdamW part, ``free_apply_`` on all 168 matrices.
* ``columns_d0.25``: AdamW on the AdamW part, ``coordinate_adamw_apply_`` on the 168 matrices
  (one call per shape, 3 in all; columns drawn as FRUGAL draws them, positions prebuilt).
* ``adamw_kernel``: ``adamw_apply_`` over every tensor, torch fused vs Triton (decides
  ``elementwise.ADAMW_AUTO``), and a ``BLOCK`` x ``NUM_WARPS`` sweep of the Triton kernels on
  the 168 matrices (plus the coordinate kernel with and without 128-bit W / G access,
  ``elementwise_triton.COORD_VECTOR``).

Timing: CUDA events around each call, median of ``--reps`` after ``--warmup`` untimed calls; host
time: ``perf_counter`` around the same call before the sync (submission cost). Bound: the bytes
any implementation must move (read p, g, write p: 12 B/param; AdamW entries +16 B for m, v),
divided by the measured copy bandwidth (``bench_common.copy_bandwidth``). Check: each Triton row
is rerun once against the torch row from the same start on a copy of the first matrices, and the
largest absolute difference is recorded.

Usage::

    python benchmarks/kernels_elementwise.py [--reps 20] [--out PATH] [--no-sweep]
    python benchmarks/kernels_elementwise.py --replot RESULT.json    # redraw PNG and table
    TRITON_INTERPRET=1 python benchmarks/kernels_elementwise.py --device cpu --model tiny  # smoke

Writes JSON (default ``benchmarks/results/kernels_elementwise_cuda.json``) and a PNG next to it;
prints a table. Without CUDA it prints why and exits 0 without writing anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import (  # noqa: E402
    copy_bandwidth,
    fmt,
    free_memory,
    markdown_table,
    provenance,
    try_plot,
    write_json,
)
from optimizer_step_setup import build_tensors, llama_param_specs  # noqa: E402

from frugal_dist.core.subspaces import BlockSchedule, coordinate_selection  # noqa: E402
from frugal_dist.kernels import elementwise as ew  # noqa: E402

MODELS = {
    "1b": dict(vocab=32000, dim=2048, layers=24, heads=32, intermediate=5461),
    "tiny": dict(vocab=512, dim=64, layers=2, heads=2, intermediate=172),  # smoke runs only
}
LR, BETAS, EPS, RHO = 1e-3, (0.9, 0.999), 1e-8, 0.25
TARGETS = {"block_d0.25": 0.55, "rho0": 0.45, "columns_d0.25": 0.6}  # issue 15, x torch AdamW
CHECK_MATRICES = 14  # matrices copied for the Triton-vs-torch check (two layers)
DEVICE = torch.device("cuda")  # set by main()


# ---------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], None], warmup: int, reps: int) -> dict[str, float]:
    """Median / min CUDA-event ms and median host submission ms of ``fn`` (on the CPU, a smoke
    run: both are ``perf_counter`` ms)."""
    cuda = torch.cuda.is_available() and DEVICE.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    dev_ms, host_ms = [], []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        fn()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            b.record()
            torch.cuda.synchronize()
            dev_ms.append(a.elapsed_time(b))
        else:
            dev_ms.append(host_ms[-1])
    return dict(ms=statistics.median(dev_ms), min_ms=min(dev_ms),
                host_ms=statistics.median(host_ms))  # fmt: skip


class Counter:
    """Host step counts of a list of AdamW tensors (the count after each step)."""

    def __init__(self, n: int) -> None:
        self.t, self.n = 0, n

    def next(self) -> list[int]:
        self.t += 1
        return [self.t] * self.n


# ---------------------------------------------------------------------------------- the rows
class Setup:
    """Params, grads and the per-variant state of LLaMA-1B shapes on one GPU."""

    def __init__(self, model: str) -> None:
        self.specs = llama_param_specs(MODELS[model])
        self.params, _ = build_tensors(self.specs, DEVICE, torch.float32)
        self.p = [p.data for p in self.params]
        self.g = [p.grad for p in self.params]
        self.mats = [i for i, (_, _, grp) in enumerate(self.specs) if grp == "frugal"]
        self.adam = [i for i, (_, _, grp) in enumerate(self.specs) if grp == "adamw"]
        sched = BlockSchedule(len(self.mats), RHO, "descending", 0)
        active = sched.active(0)
        self.active = [self.mats[j] for j in sorted(active)]
        self.inactive = [self.mats[j] for j in range(len(self.mats)) if j not in active]
        self.numel = {i: self.p[i].numel() for i in range(len(self.p))}

    def count(self, idx: list[int]) -> int:
        return sum(self.numel[i] for i in idx)

    def adam_part(self, idx: list[int], impl: str) -> Callable[[], None]:
        p, g = [self.p[i] for i in idx], [self.g[i] for i in idx]
        m, v = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
        c = Counter(len(p))

        def fn() -> None:
            ew.adamw_apply_(p, g, m, v, c.next(), lr=LR, betas=BETAS, eps=EPS, impl=impl)

        return fn

    def free_part(self, idx: list[int], impl: str) -> Callable[[], None]:
        p, g = [self.p[i] for i in idx], [self.g[i] for i in idx]
        return lambda: ew.free_apply_(p, g, LR, rule="signsgd", impl=impl)

    def columns_part(self, idx: list[int], impl: str) -> Callable[[], None]:
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            groups.setdefault(tuple(self.p[i].shape), []).append(i)
        calls = []
        for shape, members in groups.items():
            sels = [coordinate_selection(shape, RHO, "columns", 1000 + i).index.to(DEVICE)
                    for i in members]  # fmt: skip
            k = sels[0].numel()
            m = [torch.zeros(shape[0], k, device=DEVICE) for _ in members]
            v = [torch.zeros_like(x) for x in m]
            pos = [ew.coordinate_positions(s, shape[1]) for s in sels]
            calls.append(([self.p[i] for i in members], [self.g[i] for i in members], m, v,
                          sels, pos, Counter(len(members))))  # fmt: skip

        def fn() -> None:
            for W, G, m, v, sels, pos, c in calls:
                ew.coordinate_adamw_apply_(W, G, m, v, sels, c.next(), lr=LR, betas=BETAS,
                                           eps=EPS, positions=pos, impl=impl)  # fmt: skip

        return fn


def variants(s: Setup) -> list[dict[str, Any]]:
    """name, row builder per impl, bytes any implementation must move."""
    adam_n, act_n = s.count(s.adam), s.count(s.active)
    selected = sum(s.p[i].shape[0] * coordinate_selection(tuple(s.p[i].shape), RHO, "columns",
                                                          1000 + i).index.numel()
                   for i in s.mats)  # fmt: skip
    out = []
    for name, adam_idx, other, kind, extra in (
        ("block_d0.25", s.adam + s.active, s.inactive, "free", 0),
        ("rho0", s.adam, s.mats, "free", 0),
        ("columns_d0.25", s.adam, s.mats, "columns", 16 * selected),
    ):
        nbytes = 28 * (adam_n + (act_n if name == "block_d0.25" else 0))
        nbytes += 12 * s.count(other) + extra
        out.append(dict(name=name, adam=adam_idx, other=other, kind=kind, bytes=nbytes))
    return out


def build(s: Setup, v: dict[str, Any], impl: str, adam_impl: str) -> Callable[[], None]:
    a = s.adam_part(v["adam"], adam_impl)
    b = s.free_part(v["other"], impl) if v["kind"] == "free" else s.columns_part(v["other"], impl)

    def fn() -> None:
        a()
        b()

    return fn


def check(s: Setup, v: dict[str, Any]) -> float:
    """Max |triton - torch| after one step of the row's other part on copies of a few matrices."""
    idx = v["other"][:CHECK_MATRICES]
    saved = [s.p[i].clone() for i in idx]
    out = []
    for impl in ("torch", "triton"):
        for i, x in zip(idx, saved):
            s.p[i].copy_(x)
        part = s.free_part(idx, impl) if v["kind"] == "free" else s.columns_part(idx, impl)
        part()
        out.append([s.p[i].clone() for i in idx])
    for i, x in zip(idx, saved):
        s.p[i].copy_(x)
    return max((a - b).abs().max().item() for a, b in zip(*out))


# ---------------------------------------------------------------------------------- main
def measure(args) -> dict[str, Any]:
    from frugal_dist.kernels import elementwise_triton as tk

    torch.manual_seed(0)
    bw = copy_bandwidth(DEVICE)
    s = Setup(args.model)
    total = s.count(list(range(len(s.p))))
    rows: list[dict[str, Any]] = []

    opt = torch.optim.AdamW(s.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)
    base = timed(opt.step, args.warmup, args.reps)
    rows.append(dict(name="adamw", impl="torch_fused_optimizer", bytes=28 * total, **base))
    del opt
    free_memory()
    for impl in ("torch", "triton"):
        r = timed(s.adam_part(list(range(len(s.p))), impl), args.warmup, args.reps)
        rows.append(dict(name="adamw_kernel", impl=impl, bytes=28 * total, **r))
        free_memory()
    for v in variants(s):
        for impl, adam_impl in (("torch", "torch"), ("triton", "torch"), ("triton", "triton")):
            label = impl if adam_impl == "torch" else "triton+triton_adamw"
            r = timed(build(s, v, impl, adam_impl), args.warmup, args.reps)
            row = dict(name=v["name"], impl=label, bytes=v["bytes"], **r)
            if impl == "triton" and adam_impl == "torch":
                row["check_max_abs_diff_vs_torch"] = check(s, v)
            rows.append(row)
            free_memory()
    sweep = []
    if not args.no_sweep:
        saved = (tk.BLOCK, tk.NUM_WARPS, tk.COORD_BLOCK, tk.COORD_WARPS)
        mats = s.mats
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                tk.BLOCK, tk.NUM_WARPS = tk.COORD_BLOCK, tk.COORD_WARPS = block, warps
                entry = dict(block=block, num_warps=warps)
                entry["free_ms"] = timed(s.free_part(mats, "triton"), 2, args.reps)["ms"]
                entry["adamw_ms"] = timed(s.adam_part(mats, "triton"), 2, args.reps)["ms"]
                entry["columns_ms"] = timed(s.columns_part(mats, "triton"), 2, args.reps)["ms"]
                sweep.append(entry)
                free_memory()
        tk.BLOCK, tk.NUM_WARPS, tk.COORD_BLOCK, tk.COORD_WARPS = saved
        for vector in (False, True):  # 128-bit W / G access in the coordinate kernel
            tk.COORD_VECTOR = vector
            entry = dict(block=tk.COORD_BLOCK, num_warps=tk.COORD_WARPS, coord_vector=vector)
            entry["columns_ms"] = timed(s.columns_part(mats, "triton"), 2, args.reps)["ms"]
            sweep.append(entry)
            free_memory()
        tk.COORD_VECTOR = False
    for row in rows:
        row["bound_ms"] = row["bytes"] / bw * 1e3
        row["x_bound"] = row["ms"] / row["bound_ms"]
        row["x_adamw"] = row["ms"] / base["ms"]
        target = TARGETS.get(row["name"])
        if target is not None:
            row["target_x_adamw"] = target
            row["meets_target"] = row["x_adamw"] <= target
    return dict(
        benchmark="kernels_elementwise", provenance=provenance(),
        model=f"llama_{args.model}", device=str(DEVICE), parameters=total,
        layer_matrices=len(s.mats),
        active_matrices=len(s.active), copy_bandwidth_bytes_per_s=bw,
        block=tk.BLOCK, num_warps=tk.NUM_WARPS, warmup=args.warmup, reps=args.reps,
        rows=rows, sweep=sweep,
    )  # fmt: skip


def table(result: dict[str, Any]) -> str:
    head = ["row", "impl", "ms", "x AdamW", "target", "x bound", "host ms", "check"]
    body = [[r["name"], r["impl"], f"{r['ms']:.2f}", f"{r['x_adamw']:.3f}",
             r.get("target_x_adamw", "-"), f"{r['x_bound']:.2f}", f"{r['host_ms']:.3f}",
             f"{r['check_max_abs_diff_vs_torch']:.1e}" if "check_max_abs_diff_vs_torch" in r
             else "-"] for r in result["rows"]]  # fmt: skip
    out = markdown_table(head, body)
    if result.get("sweep"):
        sw = [[e["block"], e["num_warps"], e.get("coord_vector", False),
               fmt(e.get("free_ms"), ".2f"), fmt(e.get("adamw_ms"), ".2f"),
               fmt(e["columns_ms"], ".2f")] for e in result["sweep"]]  # fmt: skip
        head = ["BLOCK", "warps", "coord 128-bit", "free ms", "adamw ms", "columns ms"]
        out += "\n\n" + markdown_table(head, sw)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    def draw(plt) -> None:
        rows = [r for r in result["rows"] if r["name"] != "adamw"]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        labels = [f"{r['name']}\n{r['impl']}" for r in rows]
        ax.bar(range(len(rows)), [r["x_adamw"] for r in rows], color="tab:blue", label="step")
        ax.scatter(range(len(rows)), [r["bound_ms"] / result["rows"][0]["ms"] for r in rows],
                   color="black", marker="_", s=400, label="bandwidth bound", zorder=3)  # fmt: skip
        for i, r in enumerate(rows):
            if "target_x_adamw" in r:
                ax.plot([i - 0.4, i + 0.4], [r["target_x_adamw"]] * 2, color="tab:red")
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("time / torch fused AdamW step")
        gpu = result["provenance"]["hardware"].get("gpu_name")
        ax.set_title(
            f"Fused elementwise kernels, {result['model']} shapes, {gpu} (red: issue 15 target)"
        )
        ax.legend(fontsize=8)

    try_plot(draw, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true", help="skip the BLOCK x warps sweep")
    ap.add_argument(
        "--out", default=None, help="default benchmarks/results/kernels_elementwise_<device>.json"
    )
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a smoke run of this script (Triton rows need TRITON_INTERPRET=1)",
    )
    ap.add_argument("--replot", default=None, help="redraw the PNG/table of an existing JSON")
    args = ap.parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        print(table(result))
        plot(result, Path(args.replot).with_suffix(".png"))
        return 0
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("kernels_elementwise: needs a CUDA GPU; nothing measured, nothing written")
        return 0
    if not ew.triton_available():
        print("kernels_elementwise: needs triton; nothing measured, nothing written")
        return 0
    out = args.out or str(HERE / "results" / f"kernels_elementwise_{DEVICE.type}.json")
    result = measure(args)
    write_json(out, result)
    print(f"wrote {out}")
    print(table(result))
    plot(result, Path(out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
