#!/usr/bin/env python
"""The projection kernels (``frugal_dist.kernels.projection`` / ``refresh``) at LLaMA-1B shapes.

    python benchmarks/kernels_projection.py                       # CUDA, LLaMA-1B shapes
    python benchmarks/kernels_projection.py --model tiny --allow-cpu --reps 2    # CPU smoke
    python benchmarks/kernels_projection.py --refresh-only     # refreshes only (no step rows)

One process, one GPU, fp32 parameters and gradients of every LLaMA parameter. Timed with CUDA
events (median of ``--reps`` after ``--warmup``), all in the same run:

* ``adamw``: ``torch.optim.AdamW(fused=True)`` over every parameter (the baseline of the ratios).
* ``proj_step[backend, precision]``: a whole projection step (rho = 0.25): fused AdamW on the
  embeddings / head / norms, then per shape group ``project_down``, an Adam direction on the
  compact gradients (batched foreach-free tensor ops, the ``state`` column), ``apply_projection``
  with a signSGD residual and weight decay. ``down`` / ``state`` / ``apply`` are timed alone too.
  Backends ``torch`` / ``bmm`` / ``triton`` (batched Triton apply and down kernels, tiles from
  ``frugal_dist/kernels/projection_tiles.json``, recorded as ``triton_tiles``), and
  ``triton+fused_state``: the optimizer's own batched path -- the state phase as one
  ``kernels.projection_state.adamw_state`` launch per group on per-matrix moments, U written in
  the apply's layout and dtype (bf16: plus the bfloat16 copy of G_sf), bases stacked once in
  the operand dtype: no cast, transpose or stacking copies (bf16).
* ``frugal_step[precision]`` (CUDA): ``FRUGAL.step()`` itself on the same tensors (random
  projection, rho 0.25, signSGD residual, AdamW state, the embeddings / head / norms in an
  AdamW group; no refresh inside the timed steps), host time included, with the peak memory the
  step adds over what it holds before (``step_peak_extra_bytes``) and its state bytes.
* refreshes of all split matrices: ``svd_bases`` per method / oversampling / power steps / QR /
  precision (the rows the optimizer's step runs are marked ``step:``: ``warm``, its first refresh
  = ``randomized`` with ``optim.svd_refresh``'s settings, at the default ``proj_precision``
  tf32), ``random_bases`` (Householder, CholeskyQR2; the step draws one CholeskyQR2 batch per
  (dim, r) at a refresh), and the exact SVD on ``--exact-sample``
  matrices per shape, scaled to the whole model (``extrapolated: true``), unless ``--exact-all``.
  ``energy``: captured / optimal energy (``captured_energy`` / ``optimal_energy``, float64) on
  ``--energy-sample`` matrices per shape. The gradients are synthetic: a spectrum decaying like
  i^-0.5 over every direction plus noise (``--noise``), so the tail beyond rank r matters; ``warm``
  starts from the basis of the "previous" gradient, this one plus an independent half-size one.

Writes ``benchmarks/results/kernels_projection_cuda.json`` (``_cpu`` on CPU), ``.md`` and ``.png``.
Without CUDA (and without ``--allow-cpu``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, fmt, markdown_table, provenance, try_plot, write_json  # noqa: E402
from optimizer_step_setup import llama_param_specs  # noqa: E402

from frugal_dist.core.seeding import projection_seed  # noqa: E402
from frugal_dist.core.subspaces import projection_rank, resolve_side  # noqa: E402
from frugal_dist.kernels.projection import apply_projection, project_down  # noqa: E402
from frugal_dist.kernels.refresh import (  # noqa: E402
    captured_energy,
    optimal_energy,
    random_bases,
    svd_bases,
)
from frugal_dist.optim import svd_refresh  # noqa: E402
from frugal_dist.train.model import LLAMA_CONFIGS  # noqa: E402

REFRESH_CONFIGS = [  # (method, oversample, power_iters, qr, precision)
    ("randomized", 8, 1, "householder", "tf32"),
    ("randomized", 8, 1, "cholesky", "tf32"),
    ("randomized", 8, 2, "cholesky", "tf32"),
    ("randomized", 0, 2, "cholesky", "tf32"),  # the step's first svd refresh (svd_refresh)
    ("randomized", 0, 2, "cholesky", "bf16"),
    ("randomized", 0, 3, "cholesky", "tf32"),
    ("warm", 0, 1, "householder", "tf32"),
    ("warm", 0, 1, "cholesky", "tf32"),
    ("warm", 0, 1, "cholesky", "bf16"),
    ("warm", 8, 1, "cholesky", "tf32"),
    ("warm", 0, 2, "cholesky", "tf32"),
]
BETAS, EPS, LR, WD = (0.9, 0.999), 1e-8, 1e-3, 0.01


def median_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Groups:
    """The split matrices grouped by (shape, side): params, grads, bases, compact state."""

    def __init__(self, specs, device, density: float, noise: float, seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        self.rest_p, self.rest_g = [], []
        self.by_key: dict[tuple, dict[str, Any]] = {}
        for name, shape, kind in specs:
            p = torch.randn(shape, device=device, generator=gen) * 0.02
            if kind != "frugal":
                self.rest_p.append(p)
                self.rest_g.append(torch.randn(shape, device=device, generator=gen) * 1e-3)
                continue
            side = resolve_side("auto", shape)
            r = projection_rank(shape, density)
            grp = self.by_key.setdefault((shape, side, r), {"names": [], "W": [], "G": []})
            grp["names"].append(name)
            grp["W"].append(p)
            grp["G"].append(structured(shape, noise, gen, device))
        for (shape, side, r), grp in self.by_key.items():
            dim = shape[0] if side == "left" else shape[1]
            seeds = [projection_seed(seed, n, 0) for n in grp["names"]]
            grp["P"] = random_bases(dim, r, seeds, device)
            compact = (len(seeds), shape[0], r) if side == "right" else (len(seeds), r, shape[1])
            grp["m"] = torch.zeros(compact, device=device)
            grp["v"] = torch.zeros(compact, device=device)
        for p, g in zip(self.rest_p, self.rest_g):
            p.grad = g
        self.t = 0

    @property
    def numel(self) -> int:
        n = sum(p.numel() for p in self.rest_p)
        return n + sum(w.numel() for g in self.by_key.values() for w in g["W"])


def structured(shape, noise: float, gen, device, decay: float = 0.5) -> torch.Tensor:
    """A (m, n) matrix A diag(i^-decay) B / sqrt(K) (Gaussian A, B, K = min(m, n): a spectrum
    decaying roughly like i^-decay over every direction, so the tail beyond rank r matters)
    plus Gaussian noise of std ``noise``."""
    m, n = shape
    k = min(m, n)
    d = torch.arange(1, k + 1, device=device, dtype=torch.float32).pow(-decay)
    a = torch.randn(m, k, device=device, generator=gen) * d
    b = torch.randn(k, n, device=device, generator=gen)
    return (a @ b) / (k**0.5) + noise * torch.randn(m, n, device=device, generator=gen)


def adam_direction(grp: dict[str, Any], x: torch.Tensor, t: int) -> torch.Tensor:
    """U = m_hat / (sqrt(v_hat) + eps) on a batched compact gradient (the state phase)."""
    b1, b2 = BETAS
    grp["m"].lerp_(x, 1 - b1)
    grp["v"].mul_(b2).addcmul_(x, x, value=1 - b2)
    denom = (grp["v"] / (1 - b2**t)).sqrt_().add_(EPS)
    return (grp["m"] / (1 - b1**t)).div_(denom)


def fused_state(grp: dict[str, Any], x: torch.Tensor, t: int, side: str, precision: str):
    """(X as the apply reads it, U): one ``adamw_state`` launch on the per-matrix moments, U in
    the apply kernel's layout / dtype, bf16 with the bfloat16 copy of X (as
    ``optim.projection_batch.state_batched``)."""
    from frugal_dist.kernels.projection_state import adamw_state

    B, a, c = x.shape
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    if side == "left" and precision != "fp32":
        u = torch.empty(B, c, a, device=x.device, dtype=dt).mT
    else:
        u = torch.empty(B, a, c, device=x.device, dtype=dt)
    x_op = torch.empty_like(u) if precision == "bf16" else None
    adamw_state(x, grp["m_list"], grp["v_list"], [t] * B, BETAS, EPS, u, x_op)
    return (x if x_op is None else x_op), u


def step_fns(gs: Groups, rest_opt, backend: str, precision: str) -> dict[str, Callable[[], Any]]:
    downs: dict[tuple, torch.Tensor] = {}  # down's X, per group
    keep: dict[tuple, tuple] = {}  # the state phase's (X as the apply reads it, U)
    fused = backend == "triton+fused_state"
    backend = "triton" if fused else backend
    for grp in gs.by_key.values():  # the optimizer's layout: one moment tensor per matrix
        grp["m_list"], grp["v_list"] = list(grp["m"].unbind(0)), list(grp["v"].unbind(0))
        P = grp["P"]
        grp["P_op"] = P.to(torch.bfloat16) if fused and precision == "bf16" else P  # per refresh

    def down():
        for key, grp in gs.by_key.items():
            downs[key] = project_down(grp["G"], grp["P_op"], key[1], precision=precision,
                                      backend=backend)  # fmt: skip

    def state():
        gs.t += 1
        for key, grp in gs.by_key.items():
            x = downs[key]  # float32: a timed rep must not read the previous rep's bf16 copy
            if fused:
                keep[key] = fused_state(grp, x, gs.t, key[1], precision)
            else:
                keep[key] = (x, adam_direction(grp, x, gs.t))

    def apply():
        for key, grp in gs.by_key.items():
            x, u = keep[key]
            apply_projection(grp["W"], grp["G"], grp["P_op"], x, u, key[1], lr=LR,
                             weight_decay=WD, precision=precision, backend=backend)  # fmt: skip

    def whole():
        rest_opt.step()
        down()
        state()
        apply()

    down()
    state()
    return {"step": whole, "down": down, "state": state, "apply": apply}


def frugal_step(gs: Groups, args, device, precision: str) -> dict[str, Any]:
    """``FRUGAL.step()`` on the benchmark's tensors (module docstring): median step ms (CUDA
    events around the call, host time included), state bytes, and the peak memory one step
    adds over what is allocated before it."""
    from frugal_dist import FRUGAL

    names = [n for grp in gs.by_key.values() for n in grp["names"]]
    mats = [w for grp in gs.by_key.values() for w in grp["W"]]
    for w, g in zip(mats, [g for grp in gs.by_key.values() for g in grp["G"]]):
        w.grad = g
    rest_names = [f"rest.{i}" for i in range(len(gs.rest_p))]
    opt = FRUGAL(
        [{"params": mats, "names": names},
         {"params": gs.rest_p, "names": rest_names, "algorithm": "adamw"}],
        lr=LR, weight_decay=WD, subspace="projection", proj_type="random", density=args.density,
        update_gap=10**6, proj_precision=precision, seed=args.seed,
    )  # fmt: skip
    opt.step()  # the refresh: bases drawn and stacked, state allocated
    ms = median_ms(opt.step, device, args.reps, args.warmup)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    row = {"precision": precision, "step_ms": ms, "state_bytes": opt.state_bytes(),
           "aux_bytes": opt.aux_bytes(),
           "step_peak_extra_bytes": torch.cuda.max_memory_allocated() - before}  # fmt: skip
    del opt
    for w in mats:
        w.grad = None
    return row


def time_refresh(gs: Groups, args, device, prev: dict, cfg) -> dict[str, Any]:
    method, over, iters, qr, precision = cfg
    total, ratios = 0.0, []
    for key, grp in gs.by_key.items():
        shape, side, r = key
        seeds = [projection_seed(args.seed, n, 1) for n in grp["names"]]

        def run(G=grp["G"], side=side, r=r, seeds=seeds, key=key):
            return svd_bases(G, r, side, method=method, seeds=seeds, previous=prev.get(key),
                             oversample=over, power_iters=iters, qr=qr,
                             precision=precision)  # fmt: skip

        total += median_ms(run, device, min(3, max(1, args.reps // 4)), 1)
        P = run()
        k = args.energy_sample
        ratios += (captured_energy(grp["G"][:k], P[:k], side) / grp["best"][:k]).tolist()
    return {"method": method, "oversample": over, "power_iters": iters, "qr": qr,
            "precision": precision, "ms": total, "energy_ratio_min": min(ratios),
            "energy_ratio_mean": sum(ratios) / len(ratios)}  # fmt: skip


def refreshes(gs: Groups, args, device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    prev: dict[tuple, torch.Tensor] = {}
    for key, grp in gs.by_key.items():
        shape, side, r = key
        k = args.energy_sample
        grp["best"] = optimal_energy(grp["G"][:k], r)
        g_prev = [g + 0.5 * structured(shape, args.noise, gen, device) for g in grp["G"]]
        prev[key] = svd_bases(g_prev, r, side, method="randomized", oversample=8, power_iters=2,
                              seeds=list(range(len(g_prev))))  # fmt: skip
        del g_prev
    out: dict[str, Any] = {
        "svd": [time_refresh(gs, args, device, prev, c) for c in REFRESH_CONFIGS]
    }
    exact_ms, exact_ratio, sampled = 0.0, [], False
    for key, grp in gs.by_key.items():
        shape, side, r = key
        count = len(grp["G"])
        take = count if args.exact_all else min(count, args.exact_sample)
        sampled |= take < count
        sub = grp["G"][:take]
        ms = median_ms(lambda sub=sub, side=side, r=r: svd_bases(sub, r, side, method="exact"),
                       device, 1, 0)  # fmt: skip
        exact_ms += ms * count / take
        P = svd_bases(sub[: args.energy_sample], r, side, method="exact")
        k = min(args.energy_sample, take)
        exact_ratio += (captured_energy(sub[:k], P[:k], side) / grp["best"][:k]).tolist()
    out["exact"] = {"ms": exact_ms, "extrapolated": sampled, "energy_ratio_min": min(exact_ratio)}
    # random bases as the step draws them at a refresh: one call per (dim, r), names in order
    # (optim.kinds.projection.draw_random_bases)
    by_dim: dict[tuple[int, int], list[str]] = {}
    for (shape, side, r), grp in gs.by_key.items():
        by_dim.setdefault((shape[0] if side == "left" else shape[1], r), []).extend(grp["names"])
    out["random"] = []
    for qr in ("householder", "cholesky"):
        total = 0.0
        for (dim, r), names in by_dim.items():
            seeds = [projection_seed(args.seed, n, 1) for n in sorted(names)]
            draw = lambda d=dim, r=r, s=seeds, q=qr: random_bases(d, r, s, device, qr=q)  # noqa: E731
            total += median_ms(draw, device, args.reps, 1)
        out["random"].append({"qr": qr, "ms": total, "calls": len(by_dim)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(LLAMA_CONFIGS))
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--energy-sample", type=int, default=1, help="matrices per shape for energy")
    ap.add_argument("--exact-sample", type=int, default=2, help="matrices per shape, exact SVD")
    ap.add_argument("--exact-all", action="store_true", help="exact SVD of every matrix")
    ap.add_argument("--backends", default="torch,bmm,triton,triton+fused_state",
                    help="triton*: skipped if absent")  # fmt: skip
    ap.add_argument("--frugal-precisions", default="tf32,bf16",
                    help="FRUGAL.step() rows (CUDA); empty: none")  # fmt: skip
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    ap.add_argument("--no-refresh", action="store_true")
    ap.add_argument("--refresh-only", action="store_true", help="skip AdamW and the step rows")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("kernels_projection: no CUDA device; nothing measured (--allow-cpu for a smoke run)")
        return
    device = torch.device("cuda" if cuda else "cpu")
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"kernels_projection_{'cuda' if cuda else 'cpu'}.json")  # fmt: skip
    c = LLAMA_CONFIGS[args.model]
    specs = llama_param_specs(dict(vocab=c.vocab_size, dim=c.dim, intermediate=c.intermediate_size,
                                   layers=c.n_layers))  # fmt: skip
    gs = Groups(specs, device, args.density, args.noise, args.seed)
    result: dict[str, Any] = {
        "benchmark": "kernels_projection", "config": vars(args), "provenance": provenance(),
        "numel": gs.numel, "groups": [{"shape": list(k[0]), "side": k[1], "rank": k[2],
                                       "count": len(g["W"])} for k, g in gs.by_key.items()],
    }  # fmt: skip
    if importlib.util.find_spec("triton"):
        from frugal_dist.kernels import projection_state as ps
        from frugal_dist.kernels import projection_triton as pt

        result["triton_tiles"] = {"tiles": pt.TILES, "down_backend": pt.DOWN_BACKEND,
                                  "state": [ps.TILE_A, ps.TILE_C, ps.NUM_WARPS]}  # fmt: skip
    every = gs.rest_p + [w for g in gs.by_key.values() for w in g["W"]]
    grads = gs.rest_g + [g for grp in gs.by_key.values() for g in grp["G"]]
    for p, g in zip(every, grads):
        p.grad = g
    fused = cuda or None
    rows = []
    if not args.refresh_only:
        adamw = torch.optim.AdamW(every, lr=LR, weight_decay=WD, fused=fused)
        result["adamw_ms"] = median_ms(adamw.step, device, args.reps, args.warmup)
        del adamw
    rest_opt = torch.optim.AdamW(gs.rest_p, lr=LR, weight_decay=WD, fused=fused)
    for backend in [] if args.refresh_only else args.backends.split(","):
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # a CPU smoke run of the kernels
        if backend.startswith("triton") and not (
            (cuda or interpreted) and importlib.util.find_spec("triton")
        ):
            print(f"[proj step {backend}] skipped: needs CUDA and the triton package", flush=True)
            continue
        for precision in args.precisions.split(","):
            fns = step_fns(gs, rest_opt, backend, precision)
            row = {"backend": backend, "precision": precision}
            for part, fn in fns.items():
                row[f"{part}_ms"] = median_ms(fn, device, args.reps, args.warmup)
            row["ratio_to_adamw"] = row["step_ms"] / result["adamw_ms"]
            rows.append(row)
            print(
                f"[proj step {backend} {precision}] {row['step_ms']:.2f} ms "
                f"({row['ratio_to_adamw']:.2f}x AdamW {result['adamw_ms']:.2f} ms)",
                flush=True,
            )
    result["steps"] = rows
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["frugal_steps"] = []
        for precision in [] if args.refresh_only else args.frugal_precisions.split(","):
            if not precision:
                continue
            row = frugal_step(gs, args, device, precision)
            row["ratio_to_adamw"] = row["step_ms"] / result["adamw_ms"]
            result["frugal_steps"].append(row)
            extra = row["step_peak_extra_bytes"] / 2**30
            print(f"[FRUGAL.step {precision}] {row['step_ms']:.2f} ms "
                  f"({row['ratio_to_adamw']:.2f}x AdamW), the step adds {extra:.3f} GiB at peak",
                  flush=True)  # fmt: skip
    write_json(out, result)
    if not args.no_refresh:
        result["refresh"] = refreshes(gs, args, device)
        write_json(out, result)
    md = table(result)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


def step_role(s: dict[str, Any]) -> str:
    """Which refresh of the optimizer's step a configuration is (``optim.svd_refresh``'s
    settings at the default ``proj_precision``), or ""."""
    if s["qr"] != svd_refresh.QR or s["precision"] != "tf32":
        return ""
    if s["method"] == "warm" and (s["oversample"], s["power_iters"]) == (
        0, svd_refresh.WARM_POWER_ITERS
    ):  # fmt: skip
        return "step: warm"
    if s["method"] == "randomized" and (s["oversample"], s["power_iters"]) == (
        svd_refresh.RANDOMIZED_OVERSAMPLE, svd_refresh.RANDOMIZED_POWER_ITERS
    ):  # fmt: skip
        return "step: first refresh (warm) / randomized"
    return ""


def table(result: dict[str, Any]) -> str:
    md = ""
    if "adamw_ms" in result:
        a = result["adamw_ms"]
        rows = [["adamw (fused)", "-", fmt(a, ".2f"), "1.00", "-", "-", "-"]]
        for r in result["steps"]:
            rows.append([f"projection {r['backend']}", r["precision"], fmt(r["step_ms"], ".2f"),
                         fmt(r["ratio_to_adamw"], ".2f"), fmt(r["down_ms"], ".2f"),
                         fmt(r["state_ms"], ".2f"), fmt(r["apply_ms"], ".2f")])  # fmt: skip
        for r in result.get("frugal_steps", []):
            rows.append(["FRUGAL.step()", r["precision"], fmt(r["step_ms"], ".2f"),
                         fmt(r["ratio_to_adamw"], ".2f"), "-", "-", "-"])  # fmt: skip
        md = markdown_table(["step", "precision", "ms", "x AdamW", "down ms", "state ms",
                             "apply ms"], rows)  # fmt: skip
    ref = result.get("refresh")
    if ref:
        rr = [
            [
                "exact svd" + (" (extrapolated)" if ref["exact"]["extrapolated"] else ""),
                "-",
                fmt(ref["exact"]["ms"] / 1e3, ".3f"),
                fmt(ref["exact"]["energy_ratio_min"], ".4f"),
                "svd_method=exact",
            ]
        ]
        for s in ref["svd"]:
            rr.append([f"{s['method']} p={s['oversample']} q={s['power_iters']} {s['qr']}",
                       s["precision"], fmt(s["ms"] / 1e3, ".3f"),
                       fmt(s["energy_ratio_min"], ".4f"), step_role(s)])  # fmt: skip
        for s in ref["random"]:
            role = "step: random refresh" if s["qr"] == "cholesky" else ""
            rr.append([f"random bases {s['qr']}", "fp32", fmt(s["ms"] / 1e3, ".4f"), "-", role])
        head = ["refresh (whole model)", "precision", "s", "energy / exact top-r (min)",
                "in the step"]  # fmt: skip
        md += ("\n\n" if md else "") + markdown_table(head, rr)
    return md


def plot(result: dict[str, Any], path: Path) -> None:
    def draw(plt):
        fig, ax = plt.subplots(1, 2, figsize=(14, 5))
        if "adamw_ms" in result:
            labels = ["adamw"] + [f"{r['backend']} {r['precision']}" for r in result["steps"]]
            ax[0].barh(labels, [result["adamw_ms"]] + [r["step_ms"] for r in result["steps"]])
            ax[0].axvline(1.5 * result["adamw_ms"], color="k", ls="--", label="1.5x AdamW")
            ax[0].set_xlabel("step ms (LLaMA shapes)")
            ax[0].legend()
        ref = result.get("refresh")
        if ref:
            lab = [f"{s['method']} p{s['oversample']} q{s['power_iters']} {s['qr'][:4]} "
                   f"{s['precision']}" for s in ref["svd"]]  # fmt: skip
            ax[1].barh(
                ["exact"] + lab, [ref["exact"]["ms"] / 1e3] + [s["ms"] / 1e3 for s in ref["svd"]]
            )
            ax[1].set_xscale("log")
            ax[1].set_xlabel("svd refresh, whole model (s)")
        fig.tight_layout()

    try_plot(draw, path)


if __name__ == "__main__":
    main()
