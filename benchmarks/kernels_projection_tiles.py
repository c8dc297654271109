#!/usr/bin/env python
"""Tile sweep of the Triton projection kernels (``frugal_dist.kernels.projection_triton``).

    python benchmarks/kernels_projection_tiles.py                  # CUDA, LLaMA-1B shapes

For every shape group of the split LLaMA matrices (rank = density * projected dim), every
precision in ``--precisions`` and every candidate (BM, BN, BK, warps, stages): the batched apply
(signSGD residual, weight decay) and the batched down product, one launch per group, timed with
CUDA events (median of ``--reps``). Each candidate is first checked on one matrix of each group
against the float64 oracle (relative error of the smooth part, fraction of sign flips). Prints
per-candidate totals over the model and the floors (12 bytes per entry at the measured copy
bandwidth; 4 m n r flops for the apply). ``--write-tiles PATH`` writes the fastest candidate
per kernel and precision (and which down product is fastest: Triton, ``bmm`` over stacked G or
one ``mm`` per matrix) in the
format of ``frugal_dist/kernels/projection_tiles.json``, rewritten after every candidate. Writes
``--out`` (JSON) and a markdown table beside it. Without CUDA: exits 0.

``--write-tiles`` merges into ``--base-tiles`` (default the package's table): keys this sweep
did not measure keep their entries. ``--apply-v2`` / ``--down-v2`` sweep only that kernel (or
both), at the precisions given: the table's current tiles (re-measured: the baseline) then
``APPLY_V2`` (the variants of ``kernels/projection_apply_v2.py``, a 7th tile field) /
``DOWN_V2`` (the ``aligned`` down, a 6th field); the ``bmm`` rows are not re-measured.
``--time-cap S``: no candidate starts after S seconds (the rest are recorded as skipped). A
candidate whose check against the float64 oracle fails (``CHECK_LIMITS``) or that needs a
triton feature this install lacks is recorded with its reason and never written to the table.

    python benchmarks/kernels_projection_tiles.py --apply-v2 --down-v2 --precisions bf16 \
        --time-cap 150 --out $OUT/tiles_v2.json --write-tiles $OUT/projection_tiles.json
"""

# ruff: noqa: B023 -- every timed lambda runs inside the loop iteration that defines it
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, copy_bandwidth, markdown_table, provenance, write_json  # noqa: E402
from optimizer_step_setup import llama_param_specs  # noqa: E402

from frugal_dist.core.subspaces import projection_rank, resolve_side  # noqa: E402
from frugal_dist.kernels.refresh import random_bases  # noqa: E402
from frugal_dist.train.model import LLAMA_CONFIGS  # noqa: E402

# apply: a 6th entry 1 = the stacked-operand kernel (one dot of (2 BM x BN) right / (BM x 2 BN)
# left); per output entry it reads r (2/BN + 1/BM) (right) or r (1/BN + 2/BM) (left) operand
# entries from L2, so each side may want its own tile (written as "<precision>.<side>").
APPLY = {
    "bf16": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4),
             (64, 256, 64, 8, 3), (256, 64, 64, 8, 3),
             (64, 128, 64, 4, 3, 1), (64, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1),
             (128, 64, 64, 4, 3, 1), (256, 64, 64, 8, 3, 1), (64, 64, 64, 4, 4, 1)],
    "tf32": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 16, 8, 4),
             (64, 128, 32, 4, 3, 1), (64, 256, 32, 8, 3, 1), (128, 64, 32, 4, 3, 1),
             (256, 64, 32, 8, 3, 1)],
}  # fmt: skip
# apply variants (projection_apply_v2): two float32 accumulators, no stacking (6th field 0), in
# the order worth measuring first (--time-cap drops the tail). ptxas (sm_90a, triton 3.6) says:
# 64x64x64 4 warps takes 174 registers (2 CTAs / SM), 'regs168' 3 CTAs (12 B spill), 'regs128'
# 4 CTAs at 2 stages (128 B spill); 64x128 8 warps 174 (1 CTA) or 'regs128' 2 CTAs (128 B
# spill); 128x128 16 warps 128 (216 B spill; 'seq' 140 B). Operand bytes read from L2 per W
# entry: 2 r (2/BN + 1/BM) right, 2 r (1/BN + 2/BM) left (48 B at 64x64, r = 512), against the
# 12 HBM bytes: the stock 64x64 tiles move ~6.7 TB/s of operands from L2, hence larger tiles.
APPLY_V2 = {
    "bf16": [(64, 64, 64, 4, 3, 0, "grouped+tma+regs168"),
             (64, 128, 64, 8, 2, 0, "grouped+tma+regs128"),
             (64, 64, 64, 4, 3, 0, "grouped+tma"),
             (64, 64, 64, 4, 4, 0, "grouped+tma"),
             (128, 64, 64, 8, 2, 0, "grouped+tma+regs128"),
             (64, 64, 64, 4, 2, 0, "grouped+tma+regs128"),
             (64, 128, 64, 8, 3, 0, "grouped+tma"),
             (128, 128, 64, 16, 3, 0, "grouped+tma"),
             (64, 64, 64, 4, 3, 0, "grouped+early+tma+regs168"),
             (128, 128, 64, 16, 3, 0, "grouped+seq+tma"),
             (64, 64, 64, 4, 3, 0, "grouped+regs168"),
             (64, 64, 64, 4, 3, 0, "grouped+tma+regs168+persist3")],
    "tf32": [(64, 64, 32, 4, 3, 0, "grouped+tma+regs168"),
             (64, 128, 32, 8, 3, 0, "grouped+tma+regs128"),
             (64, 64, 32, 4, 3, 0, "grouped+tma")],
}  # fmt: skip
# down variants: 'aligned' = vector loads of G where every gradient address is a 16-byte
# multiple (without it the table's addresses compile to scalar 4-byte copies of G; ptxas sm_90a:
# 128x256x64x8 226 -> 212 registers, cp.async of 16 bytes)
DOWN_V2 = {
    "bf16": [(128, 256, 64, 8, 3, "aligned"), (128, 256, 32, 8, 4, "aligned"),
             (128, 128, 64, 8, 3, "aligned"), (64, 256, 64, 4, 3, "aligned")],
    "tf32": [(128, 256, 32, 8, 3, "aligned"), (128, 128, 32, 8, 3, "aligned")],
}  # fmt: skip
# a candidate is kept only within these of the float64 oracle (the measured stock kernels:
# bf16 flip 6e-4, smooth 6.1e-3; tf32 1.5e-4, 2.1e-3)
CHECK_LIMITS = {"flip_frac": 5e-3, "max_err_smooth": 0.05, "rel_err": 0.02}
DOWN = {
    "bf16": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 3)],
    "tf32": [(128, 128, 32, 8, 3), (128, 256, 32, 8, 3), (64, 256, 32, 4, 3)],
}
LR, WD = 1e-3, 0.01


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def groups(model: str, density: float, device) -> list[dict[str, Any]]:
    c = LLAMA_CONFIGS[model]
    specs = llama_param_specs(dict(vocab=c.vocab_size, dim=c.dim, intermediate=c.intermediate_size,
                                   layers=c.n_layers))  # fmt: skip
    by: dict[tuple, int] = {}
    for _, shape, kind in specs:
        if kind == "frugal":
            key = (tuple(shape), resolve_side("auto", shape), projection_rank(shape, density))
            by[key] = by.get(key, 0) + 1
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for (shape, side, r), count in by.items():
        m, n = shape
        dim = m if side == "left" else n
        compact = (count, m, r) if side == "right" else (count, r, n)
        out.append({
            "shape": shape, "side": side, "r": r, "count": count,
            "W": [torch.randn(shape, device=device, generator=gen) * 0.02 for _ in range(count)],
            "G": [torch.randn(shape, device=device, generator=gen) * 1e-3 for _ in range(count)],
            "P": random_bases(dim, r, list(range(count)), device),
            "U": torch.randn(compact, device=device, generator=gen),
        })  # fmt: skip
    return out


def operands(grp, precision: str):
    """(P, X, U) as the ``triton`` backend passes them (bfloat16 for bf16; left: K-contiguous)."""
    from frugal_dist.kernels.projection import project_down

    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    X = project_down(grp["G"], grp["P"], grp["side"], precision=precision, backend="bmm")
    P, X, U = grp["P"].to(dt), X.to(dt), grp["U"].to(dt)
    if grp["side"] == "left":
        X, U = X.mT.contiguous().mT, U.mT.contiguous().mT
    return P, X, U


def check_apply(grp, precision, tile) -> dict[str, float]:
    """Errors of the group's first and last matrices (one launch of B = 2, so a variant's
    matrix indexing is checked too) against the float64 oracle: the fraction of entries off by
    more than one signSGD step (sign flips) and the largest other error, in units of lr."""
    from frugal_dist.kernels.projection import reference_projection_step
    from frugal_dist.kernels.projection_triton import fused_apply

    idx = sorted({0, grp["count"] - 1})
    sub = {**grp, "count": len(idx), "W": [grp["W"][i] for i in idx],
           "G": [grp["G"][i] for i in idx], "P": grp["P"][idx], "U": grp["U"][idx]}  # fmt: skip
    P, X, U = operands(sub, precision)
    ws = [w.clone() for w in sub["W"]]
    c = dict(decay=1 - LR * WD, c_u=-LR, c_f=-LR)
    fused_apply(ws, sub["G"], P, X, U, grp["side"], rule="signsgd", precision=precision,
                tile=tile, **c)  # fmt: skip
    flips, smooth = [], []
    for b, w in enumerate(ws):
        _, ref = reference_projection_step(sub["W"][b], sub["G"][b], sub["P"][b],
                                           sub["U"][b].float(), grp["side"], lr=LR,
                                           weight_decay=WD)  # fmt: skip
        err = (w.double() - ref).abs()
        flips.append((err > LR).double().mean().item())
        smooth.append(err[err <= LR].max().item() / LR)
    return {"flip_frac": max(flips), "max_err_smooth": max(smooth)}


def check_failure(chk: dict[str, float]) -> str | None:
    """Why a candidate's check is outside ``CHECK_LIMITS`` (None: within)."""
    bad = [f"{k}={v:.3g} > {CHECK_LIMITS[k]}" for k, v in chk.items()
           if not v <= CHECK_LIMITS.get(k, float("inf"))]  # fmt: skip
    return "check failed: " + ", ".join(bad) if bad else None


def check_down(grp, precision, tile) -> float:
    from frugal_dist.kernels.projection_triton import fused_down

    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    g, P = grp["G"][0], grp["P"][:1]
    m, n = g.shape
    r = grp["r"]
    out = torch.empty((1, m, r) if grp["side"] == "right" else (1, r, n), device=g.device)
    fused_down([g], P.to(dt), grp["side"], out, precision=precision, tile=tile)
    ref = g.double() @ P[0].double() if grp["side"] == "right" else P[0].double().T @ g.double()
    return ((out[0].double() - ref).norm() / ref.norm()).item()


def write_tiles(path: str, res: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """The fastest measured tile per (kernel, precision), per matrix shape (``bf16.2048x5461``)
    and, for the apply, per side (``bf16.right``: the sum over that side's groups);
    ``down_backend``: the fastest down product (the Triton time with the per-precision tile).
    Merged into ``base`` (a tiles table): its entries for keys not measured here stay (with
    their ``ms``); ``measured`` keeps the base's provenance as ``merged_into``."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in res["rows"]:
        if "ms" not in row or row["kind"] not in ("apply", "down"):
            continue
        per_key = [(row["precision"], row["ms"])]
        per_key += [(f"{row['precision']}.{x['shape'][0]}x{x['shape'][1]}", x["ms"])
                    for x in row["groups"]]  # fmt: skip
        if row["kind"] == "apply":
            for side in ("left", "right"):
                ms = [x["ms"] for x in row["groups"] if x["side"] == side]
                if ms:
                    per_key.append((f"{row['precision']}.{side}", sum(ms)))
        for prec, ms in per_key:
            key = (row["kind"], prec)
            if key not in best or ms < best[key]["ms"]:
                best[key] = {**row, "ms": ms}
    base = base or {}
    out: dict[str, Any] = {"measured": {"command": res["provenance"].get("command"),
                                        "date_utc": res["provenance"].get("date_utc"),
                                        "gpu": res["provenance"]["hardware"].get("gpu_name")},
                           "apply": dict(base.get("apply", {})), "down": dict(base.get("down", {})),
                           "down_backend": dict(base.get("down_backend", {})),
                           "ms": dict(base.get("ms", {}))}  # fmt: skip
    if base.get("measured"):
        out["measured"]["merged_into"] = {k: v for k, v in base["measured"].items()
                                          if k != "merged_into"}  # fmt: skip
    for (kind, prec), row in sorted(best.items()):
        out[kind][prec] = row["tile"]
        out["ms"][f"{kind}.{prec}"] = round(row["ms"], 3)
    for row in res["rows"]:
        if row["kind"] == "bmm apply+down" and ("down", row["precision"]) in best:
            ms = {"triton": best[("down", row["precision"])]["ms"],
                  "bmm": sum(x["down_ms"] for x in row["groups"])}  # fmt: skip
            if all("mm_down_ms" in x for x in row["groups"]):  # sweeps before "mm" lack it
                ms["mm"] = sum(x["mm_down_ms"] for x in row["groups"])
            for how in ("bmm", "mm"):
                if how in ms:
                    out["ms"][f"down.{row['precision']}.{how}"] = round(ms[how], 3)
            out["down_backend"][row["precision"]] = min(ms, key=ms.get)
    for kind in ("apply", "down", "down_backend", "ms"):
        out[kind] = dict(sorted(out[kind].items()))
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def candidates(precision: str, apply_v2: bool, down_v2: bool = False) -> list[tuple[str, list]]:
    """(kernel, tiles) to sweep: ``--apply-v2`` / ``--down-v2``: the table's current tiles of
    this precision for that kernel (the baseline, re-measured) then ``APPLY_V2`` / ``DOWN_V2``;
    neither: every list."""
    if not (apply_v2 or down_v2):
        return [("apply", APPLY[precision] + APPLY_V2.get(precision, [])),
                ("down", DOWN[precision] + DOWN_V2.get(precision, []))]  # fmt: skip
    from frugal_dist.kernels.projection_triton import TILES

    out = []
    for kind, on, new in (("apply", apply_v2, APPLY_V2), ("down", down_v2, DOWN_V2)):
        if on:
            now = [tuple(t) for k, t in TILES[kind].items() if k.split(".")[0] == precision]
            out.append((kind, list(dict.fromkeys(now + new.get(precision, [])))))
    return out


def skip_reason(kind: str, tile: tuple, elapsed: float, cap: float) -> str | None:
    """Why a candidate is not measured: past ``--time-cap``, or it needs a triton feature
    (tensor descriptors) this install lacks. None: measure it."""
    if cap and elapsed > cap:
        return f"time cap {cap:g} s reached after {elapsed:.0f} s"
    if kind == "apply" and len(tile) > 6:
        from frugal_dist.kernels.projection_apply_v2 import tma_available
        from frugal_dist.kernels.projection_triton import tile_variant

        flags = tile_variant(tile)
        if flags and flags["tma"] and not tma_available():
            import triton

            return f"triton {triton.__version__} has no triton.tools.tensor_descriptor"
    return None


def bmm_row(gs, precision: str, reps: int) -> dict[str, Any]:
    """The ``bmm`` backend's down (stacked G), per-matrix ``mm`` down and apply per group."""
    from frugal_dist.kernels.projection import apply_projection, project_down

    row: dict[str, Any] = {"kind": "bmm apply+down", "precision": precision, "tile": ["bmm"],
                           "groups": []}  # fmt: skip
    for g in gs:
        X = project_down(g["G"], g["P"], g["side"], precision=precision, backend="bmm")
        dn = median_ms(lambda g=g: project_down(g["G"], g["P"], g["side"], precision=precision,
                                                backend="bmm"), reps)  # fmt: skip
        # one cuBLAS mm per matrix, no stacked G (down_backend "mm")
        mm = median_ms(lambda g=g: project_down(g["G"], g["P"], g["side"], precision=precision,
                                                backend="torch"), reps)  # fmt: skip
        ap_ms = median_ms(lambda g=g, X=X: apply_projection(
            g["W"], g["G"], g["P"], X, g["U"], g["side"], lr=LR, weight_decay=WD,
            precision=precision, backend="bmm"), reps)  # fmt: skip
        row["groups"].append({"shape": list(g["shape"]), "side": g["side"], "ms": dn + ap_ms,
                              "down_ms": dn, "mm_down_ms": mm, "apply_ms": ap_ms})  # fmt: skip
    row["ms"] = sum(x["ms"] for x in row["groups"])
    return row


def measure(kind: str, tile: tuple, gs, precision: str, reps: int) -> dict[str, Any]:
    """One candidate over every group: check against the oracle (a failure raises), then the
    median time of one batched launch per group."""
    from frugal_dist.kernels import projection_apply_v2 as v2
    from frugal_dist.kernels.projection_triton import fused_apply, fused_down, tile_variant

    row: dict[str, Any] = {"kind": kind, "precision": precision, "tile": list(tile), "groups": []}
    flags = tile_variant(tile) if kind == "apply" else None
    for g in gs:
        extra: dict[str, Any] = {}
        if kind == "apply":
            P, X, U = operands(g, precision)
            chk = check_apply(g, precision, tile)
            if flags and flags["tma"]:  # descriptors made (else the pointer loads ran)
                stores = v2.operand_stores(P, X, U, g["side"])
                extra["tma_ran"] = v2.descriptors(stores, *tile[:3]) is not None
            fn = lambda g=g, P=P, X=X, U=U: fused_apply(  # noqa: E731
                g["W"], g["G"], P, X, U, g["side"], decay=1 - LR * WD, c_u=-LR, c_f=-LR,
                rule="signsgd", precision=precision, tile=tile)  # fmt: skip
        else:
            P = g["P"].to(torch.bfloat16 if precision == "bf16" else torch.float32)
            (m, n), c, r = g["shape"], g["count"], g["r"]
            out = torch.empty((c, m, r) if g["side"] == "right" else (c, r, n), device=P.device)
            chk = {"rel_err": check_down(g, precision, tile)}
            fn = lambda g=g, P=P, out=out: fused_down(  # noqa: E731
                g["G"], P, g["side"], out, precision=precision, tile=tile)  # fmt: skip
        why = check_failure(chk)
        if why:
            raise ValueError(f"{g['shape']}: {why}")
        row["groups"].append({"shape": list(g["shape"]), "side": g["side"],
                              "ms": median_ms(fn, reps), **chk, **extra})  # fmt: skip
    row["ms"] = sum(x["ms"] for x in row["groups"])
    return row


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for row in res["rows"]:
        per = " / ".join(f"{x['ms']:.2f}" for x in row["groups"])
        chk = " ".join(f"{k}={v:.2g}" for x in row["groups"][:1] for k, v in x.items()
                       if k not in ("shape", "side", "ms"))  # fmt: skip
        status = row.get("error", row.get("skipped", ""))[:60]
        rows.append([row["kind"], row["precision"], "x".join(map(str, row["tile"])),
                     f"{row['ms']:.2f}" if "ms" in row else status, per, chk])  # fmt: skip
    return markdown_table(["kernel", "precision", "BMxBNxBKxwarpsxstages[xstacked[xvariant]]",
                           "ms (model)", "ms per group", "check (group 1)"], rows)  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(LLAMA_CONFIGS))
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--precisions", default="bf16,tf32")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/kernels_projection_tiles.json"))
    ap.add_argument("--write-tiles", default=None, help="projection_tiles.json to (re)write")
    ap.add_argument("--base-tiles", default=str(REPO / "frugal_dist/kernels/projection_tiles.json"),
                    help="the table --write-tiles merges into ('' = none)")  # fmt: skip
    ap.add_argument("--apply-v2", action="store_true",
                    help="the apply: the table's tiles and the APPLY_V2 variants only")  # fmt: skip
    ap.add_argument("--down-v2", action="store_true",
                    help="the down: the table's tiles and the DOWN_V2 variants only")  # fmt: skip
    ap.add_argument("--time-cap", type=float, default=0.0,
                    help="seconds after which no candidate starts (0: none)")  # fmt: skip
    ap.add_argument("--from-json", default=None,
                    help="no measuring: --write-tiles from a sweep's --out JSON")  # fmt: skip
    args = ap.parse_args(argv)
    base = json.loads(Path(args.base_tiles).read_text()) if args.base_tiles else None
    if args.from_json:
        if not args.write_tiles:
            raise SystemExit("--from-json needs --write-tiles PATH")
        write_tiles(args.write_tiles, json.loads(Path(args.from_json).read_text()), base)
        return
    if not torch.cuda.is_available():
        print("kernels_projection_tiles: no CUDA device; nothing measured")
        return
    t0 = time.monotonic()
    dev = torch.device("cuda")
    gs = groups(args.model, args.density, dev)
    bw = copy_bandwidth(dev)
    entries = sum(g["count"] * g["shape"][0] * g["shape"][1] for g in gs)
    flops = sum(4 * g["count"] * g["shape"][0] * g["shape"][1] * g["r"] for g in gs)
    res: dict[str, Any] = {"benchmark": "kernels_projection_tiles", "config": vars(args),
                           "provenance": provenance(), "copy_bandwidth_Bps": bw,
                           "entries": entries, "apply_flops": flops,
                           "apply_bytes_floor_ms": 12 * entries / bw * 1e3, "rows": []}  # fmt: skip
    print(f"apply floor: {res['apply_bytes_floor_ms']:.2f} ms of bytes at {bw / 1e12:.2f} TB/s; "
          f"{flops / 1e12:.2f} TFLOP", flush=True)  # fmt: skip
    for precision in args.precisions.split(","):
        if not (args.apply_v2 or args.down_v2):
            res["rows"].append(bmm_row(gs, precision, args.reps))
            print("bmm", precision, [(round(x["down_ms"], 3), round(x["mm_down_ms"], 3),
                                      round(x["apply_ms"], 3)) for x in res["rows"][-1]["groups"]],
                  flush=True)  # fmt: skip
        for kind, cands in candidates(precision, args.apply_v2, args.down_v2):
            for tile in cands:
                row: dict[str, Any] = {"kind": kind, "precision": precision, "tile": list(tile),
                                       "groups": []}  # fmt: skip
                t1 = time.monotonic()
                why = skip_reason(kind, tile, t1 - t0, args.time_cap)
                if why:
                    row["skipped"] = why
                else:
                    try:
                        row = measure(kind, tile, gs, precision, args.reps)
                    except Exception as exc:  # does not compile (shared memory), check failed
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    row["wall_s"] = round(time.monotonic() - t1, 1)
                res["rows"].append(row)
                write_json(args.out, res)
                if args.write_tiles:
                    write_tiles(args.write_tiles, res, base)
                print(kind, precision, tile, f"{row.get('ms', float('nan')):.3f} ms",
                      [f"{x['ms']:.3f}" for x in row["groups"]], row.get("wall_s", ""),
                      row.get("error", row.get("skipped", "")), flush=True)  # fmt: skip
    res["wall_s"] = round(time.monotonic() - t0, 1)
    write_json(args.out, res)
    md = markdown(res)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
