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
"""

# ruff: noqa: B023 -- every timed lambda runs inside the loop iteration that defines it
from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    from frugal_dist.kernels.projection import reference_projection_step
    from frugal_dist.kernels.projection_triton import fused_apply

    P, X, U = operands(grp, precision)
    w = grp["W"][0].clone()
    c = dict(decay=1 - LR * WD, c_u=-LR, c_f=-LR)
    fused_apply([w], grp["G"][:1], P[:1], X[:1], U[:1], grp["side"], rule="signsgd",
                precision=precision, tile=tile, **c)  # fmt: skip
    _, ref = reference_projection_step(grp["W"][0], grp["G"][0], grp["P"][0], grp["U"][0].float(),
                                       grp["side"], lr=LR, weight_decay=WD)  # fmt: skip
    err = (w.double() - ref).abs()
    return {"flip_frac": (err > LR).double().mean().item(),
            "max_err_smooth": err[err <= LR].max().item() / LR}  # fmt: skip


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


def write_tiles(path: str, res: dict[str, Any]) -> None:
    """The fastest measured tile per (kernel, precision), per matrix shape (``bf16.2048x5461``)
    and, for the apply, per side (``bf16.right``: the sum over that side's groups);
    ``down_backend``: the fastest down product (the Triton time with the per-precision tile)."""
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
    out: dict[str, Any] = {"measured": {"command": res["provenance"].get("command"),
                                        "date_utc": res["provenance"].get("date_utc"),
                                        "gpu": res["provenance"]["hardware"].get("gpu_name")},
                           "apply": {}, "down": {}, "down_backend": {}, "ms": {}}  # fmt: skip
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
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(LLAMA_CONFIGS))
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--precisions", default="bf16,tf32")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/kernels_projection_tiles.json"))
    ap.add_argument("--write-tiles", default=None, help="projection_tiles.json to (re)write")
    ap.add_argument("--from-json", default=None,
                    help="no measuring: --write-tiles from a sweep's --out JSON")  # fmt: skip
    args = ap.parse_args(argv)
    if args.from_json:
        if not args.write_tiles:
            raise SystemExit("--from-json needs --write-tiles PATH")
        write_tiles(args.write_tiles, json.loads(Path(args.from_json).read_text()))
        return
    if not torch.cuda.is_available():
        print("kernels_projection_tiles: no CUDA device; nothing measured")
        return
    from frugal_dist.kernels.projection_triton import fused_apply, fused_down

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
        base: dict[str, Any] = {"kind": "bmm apply+down", "precision": precision, "tile": ["bmm"],
                                "groups": []}  # fmt: skip
        for g in gs:
            from frugal_dist.kernels.projection import apply_projection, project_down

            X = project_down(g["G"], g["P"], g["side"], precision=precision, backend="bmm")
            dn = median_ms(lambda g=g: project_down(g["G"], g["P"], g["side"],
                                                    precision=precision, backend="bmm"),
                           args.reps)  # fmt: skip
            # one cuBLAS mm per matrix, no stacked G (down_backend "mm")
            mm = median_ms(lambda g=g: project_down(g["G"], g["P"], g["side"],
                                                    precision=precision, backend="torch"),
                           args.reps)  # fmt: skip
            ap_ms = median_ms(lambda g=g, X=X: apply_projection(
                g["W"], g["G"], g["P"], X, g["U"], g["side"], lr=LR, weight_decay=WD,
                precision=precision, backend="bmm"), args.reps)  # fmt: skip
            base["groups"].append({"shape": list(g["shape"]), "side": g["side"], "ms": dn + ap_ms,
                                   "down_ms": dn, "mm_down_ms": mm, "apply_ms": ap_ms})  # fmt: skip
        base["ms"] = sum(x["ms"] for x in base["groups"])
        res["rows"].append(base)
        print("bmm", precision, [(round(x["down_ms"], 3), round(x["mm_down_ms"], 3),
                                  round(x["apply_ms"], 3)) for x in base["groups"]],
              flush=True)  # fmt: skip
        for kind, cands in (("apply", APPLY[precision]), ("down", DOWN[precision])):
            for tile in cands:
                row: dict[str, Any] = {"kind": kind, "precision": precision, "tile": list(tile),
                                       "groups": []}  # fmt: skip
                try:
                    for g in gs:
                        if kind == "apply":
                            P, X, U = operands(g, precision)
                            chk = check_apply(g, precision, tile)
                            fn = lambda g=g, P=P, X=X, U=U: fused_apply(  # noqa: E731
                                g["W"], g["G"], P, X, U, g["side"], decay=1 - LR * WD,
                                c_u=-LR, c_f=-LR, rule="signsgd", precision=precision,
                                tile=tile)  # fmt: skip
                        else:
                            dt = torch.bfloat16 if precision == "bf16" else torch.float32
                            P = g["P"].to(dt)
                            m, n = g["shape"]
                            c, r = g["count"], g["r"]
                            out = torch.empty((c, m, r) if g["side"] == "right" else (c, r, n),
                                              device=dev)  # fmt: skip
                            chk = {"rel_err": check_down(g, precision, tile)}
                            fn = lambda g=g, P=P, out=out: fused_down(  # noqa: E731
                                g["G"], P, g["side"], out, precision=precision, tile=tile
                            )
                        ms = median_ms(fn, args.reps)
                        row["groups"].append({"shape": list(g["shape"]), "side": g["side"],
                                              "ms": ms, **chk})  # fmt: skip
                    row["ms"] = sum(x["ms"] for x in row["groups"])
                except Exception as exc:  # a tile that does not compile (shared memory) is skipped
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                res["rows"].append(row)
                if args.write_tiles:
                    write_tiles(args.write_tiles, res)
                print(
                    kind,
                    precision,
                    tile,
                    f"{row.get('ms', float('nan')):.3f} ms",
                    [f"{x['ms']:.3f}" for x in row["groups"]],
                    row.get("error", ""),
                    flush=True,
                )
                write_json(args.out, res)
    rows = []
    for row in res["rows"]:
        per = " / ".join(f"{x['ms']:.2f}" for x in row["groups"])
        chk = " ".join(f"{k}={v:.2g}" for x in row["groups"][:1] for k, v in x.items()
                       if k not in ("shape", "side", "ms"))  # fmt: skip
        rows.append(
            [
                row["kind"],
                row["precision"],
                "x".join(map(str, row["tile"])),
                f"{row['ms']:.2f}" if "ms" in row else row.get("error", "")[:40],
                per,
                chk,
            ]
        )
    md = markdown_table(["kernel", "precision", "BMxBNxBKxwarpsxstages", "ms (model)",
                         "ms per group", "check (group 1)"], rows)  # fmt: skip
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
