#!/usr/bin/env python
"""A model of the gradient exchange's time vs link bandwidth, fitted to ``comm_bench.py`` runs.

    python benchmarks/comm_model.py benchmarks/results/comm_bench_ws2*.json --subspace block_d0.25

Each ``comm_bench.py`` JSON is one *run*: one link setting (``links``: the backend of the world,
intra and inter groups, and ``setting`` -- ``nccl-socket`` when NCCL was forced onto TCP). Each
of a run's rows has a variant (its mode family ``m``: ddp, two_level, exact, sign,
hierarchical), measured medians ``step_ms`` and ``local_step_ms`` (the same update without
communication; 0 for the pure all-reduce rows ``ddp_allreduce`` / ``two_level_allreduce``; the
``+adamw`` rows have no such measurement and are left out), its ring wire bytes per rank by
group (``link_wire``: world / intra / inter) and its packed sign bytes (``sign_allgather``
payload). A group's *transport* is its backend, ``nccl-socket`` for NCCL under the socket
preset. The model, linear in its parameters and fitted by least squares over every row of
every run:

    step_ms - local_step_ms = c_m                       fixed cost of mode m (launches,
                                                        latencies, copies; per family)
                            + v x sign_bytes            pack + vote, per packed sign byte
                            + sum_t wire_t / B_t        wire bytes on transport t over its
                                                        bandwidth (parameter: 1 / B_t)

Per-collective latency is part of c_m (a mode issues the same collectives at every link
setting). The fit needs more rows than parameters and a design of full rank: every transport
must carry bytes in rows whose other terms are pinned by other runs (in practice: one run at
``--links default`` and one with ``--inter-backend gloo`` or ``--links nccl-socket``, each with
several subspaces); otherwise it stops with a message saying which parameter is not determined.

Prediction on a cluster of nodes of L ranks (L: the runs' ``node_size``) whose cross-node links
have bandwidth B: exact / sign send their world bytes across nodes (at B), hierarchical its
inter bytes at B and its intra bytes over the fastest fitted NCCL transport:

    step_ms(B) = local_step_ms + c_m + v x sign_bytes + cross_bytes / B + intra_bytes / B_fast

plotted for B = 1 .. 400 Gb/s with the crossovers of sign and hierarchical against exact.
Writes ``<out>.json`` (parameters, residuals, curves, crossovers) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, try_plot, write_json  # noqa: E402

FAMILIES = ("ddp", "two_level", "exact", "sign", "hierarchical")
GBPS_TO_MS_PER_BYTE = 8e-6  # bytes * 8 bit / (B Gb/s * 1e9) s * 1e3 ms/s = bytes * 8e-6 / B


def family(variant: str) -> str | None:
    """Mode family of a row, or None for rows the model leaves out (``+adamw``)."""
    if variant.endswith("+adamw"):
        return None
    if variant == "ddp_allreduce":
        return "ddp"
    if variant == "two_level_allreduce":
        return "two_level"
    mode = variant.rsplit("_", 1)[-1]
    return mode if mode in FAMILIES else None


def transports(run: dict[str, Any]) -> dict[str, str]:
    """The transport of each group (world / intra / inter) of a run."""
    links = run.get("links")
    if links is None:
        raise ValueError(
            f"{run.get('_path', 'a run')}: no 'links' record (written by an older comm_bench.py);"
            " rerun it with this checkout's benchmarks/comm_bench.py"
        )
    socket = links.get("setting") == "nccl-socket"
    return {g: ("nccl-socket" if socket and links[g] == "nccl" else links[g])
            for g in ("world", "intra", "inter")}  # fmt: skip


def observations(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One observation per usable row: family, y = step - local ms, bytes per transport."""
    obs = []
    for run in runs:
        tr = transports(run)
        for row in run["rows"]:
            fam = family(row["variant"])
            if row.get("status") != "ok" or fam is None or "link_wire" not in row:
                continue
            local = row.get("local_step_ms_median", 0.0 if fam in ("ddp", "two_level") else None)
            if local is None:
                continue
            wire: dict[str, float] = {}
            for group, nbytes in row["link_wire"].items():
                if nbytes:
                    wire[tr[group]] = wire.get(tr[group], 0.0) + nbytes
            obs.append({"run": run.get("_path", "?"), "variant": row["variant"], "family": fam,
                        "y": row["step_ms_median"] - local, "local": local,
                        "sign_bytes": row["payload_bytes"].get("sign_allgather", 0),
                        "wire": wire, "link_wire": row["link_wire"]})  # fmt: skip
    return obs


def fit(obs: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares parameters of the module docstring's model, or a ValueError naming what
    the observations cannot determine (too few rows, or a parameter the design leaves free)."""
    fams = sorted({o["family"] for o in obs}, key=FAMILIES.index)
    trans = sorted({t for o in obs for t in o["wire"]})
    names = [f"c[{f}]" for f in fams] + [f"1/B[{t}]" for t in trans]
    use_vote = any(o["sign_bytes"] for o in obs)
    if use_vote:
        names.append("v")
    if len(obs) <= len(names):
        raise ValueError(
            f"too few points to fit: {len(obs)} rows for {len(names)} parameters ({names}); "
            "give comm_bench.py JSONs of at least two link settings (e.g. --links default and "
            "--inter-backend gloo or --links nccl-socket), each with several --subspaces"
        )
    a = np.zeros((len(obs), len(names)))
    for i, o in enumerate(obs):
        a[i, names.index(f"c[{o['family']}]")] = 1.0
        for t, nbytes in o["wire"].items():
            a[i, names.index(f"1/B[{t}]")] = nbytes
        if use_vote:
            a[i, -1] = o["sign_bytes"]
    y = np.array([o["y"] for o in obs])
    scale = np.abs(a).max(axis=0)  # columns of bytes and of ones: solve on a common scale
    scaled = a / scale
    rank = np.linalg.matrix_rank(scaled)
    if rank < len(names):
        _, _, vt = np.linalg.svd(scaled)
        free = [names[j] for j in np.flatnonzero(np.abs(vt[-1]) > 1e-6)]
        raise ValueError(
            f"the runs do not determine every parameter (rank {rank} < {len(names)}); these "
            f"trade off against each other: {free}. Add runs where they differ: another link "
            "setting, or more --subspaces (rows of one mode with different byte counts)"
        )
    sol, *_ = np.linalg.lstsq(scaled, y, rcond=None)
    params = dict(zip(names, (sol / scale).tolist()))
    fitted = a @ np.array([params[n] for n in names])
    for o, f in zip(obs, fitted.tolist()):
        o["fitted"] = f
    resid = y - fitted
    return {"params": params, "rows": len(obs), "rms_ms": float(np.sqrt(np.mean(resid**2))),
            "max_abs_ms": float(np.abs(resid).max()),
            "bandwidth_gbps": {t: GBPS_TO_MS_PER_BYTE / params[f"1/B[{t}]"]
                               if params[f"1/B[{t}]"] > 0 else None for t in trans}}  # fmt: skip


def predict(model: dict[str, Any], obs: list[dict[str, Any]], subspace: str,
            gbps: np.ndarray) -> dict[str, list[float]]:  # fmt: skip
    """Predicted step ms vs cross-node bandwidth (Gb/s) for exact / sign / hierarchical of
    ``subspace`` (module docstring); modes without rows are left out."""
    p = model["params"]
    nccl = [p[k] for k in p if k.startswith("1/B[nccl") and p[k] > 0]
    fast = min(nccl) if nccl else 0.0  # ms per byte of the fastest NCCL transport
    out = {}
    for mode in ("exact", "sign", "hierarchical"):
        rows = [o for o in obs if o["variant"] == f"frugal_{subspace}_{mode}"]
        if not rows or f"c[{mode}]" not in p:
            continue
        o = rows[0]
        local = statistics.median(r["local"] for r in rows)
        wire = {g: o["link_wire"].get(g, 0.0) for g in ("world", "intra", "inter")}
        cross = wire["world"] + wire["inter"]
        base = local + p[f"c[{mode}]"] + p.get("v", 0.0) * o["sign_bytes"]
        base += wire["intra"] * fast
        out[mode] = (base + cross * GBPS_TO_MS_PER_BYTE / gbps).tolist()
    return out


def crossovers(curves: dict[str, list[float]], gbps: np.ndarray) -> dict[str, float | None]:
    """Bandwidth (Gb/s) where each compressed mode's curve first crosses exact's, None if they
    do not cross in range (one is faster everywhere: compare the curves)."""
    out: dict[str, float | None] = {}
    if "exact" not in curves:
        return out
    for mode in ("sign", "hierarchical"):
        if mode in curves:
            diff = np.sign(np.array(curves[mode]) - np.array(curves["exact"]))
            flips = np.flatnonzero(diff[1:] != diff[:-1])
            out[mode] = float(gbps[flips[0] + 1]) if flips.size else None
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        gbps = result["gbps"]
        for mode, ms in result["curves"].items():
            (line,) = ax.plot(gbps, ms, label=mode)
            b = result["crossover_gbps"].get(mode)
            if b is not None:
                ax.axvline(b, color=line.get_color(), ls=":", lw=1)
                ax.annotate(f"{b:.0f} Gb/s", (b, min(ms)), fontsize=8, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("cross-node bandwidth per rank (Gb/s)")
        ax.set_ylabel("predicted optimizer step incl. exchange (ms)")
        ax.set_title(f"{result['subspace']}: fitted on {len(result['runs'])} runs, rms "
                     f"{result['model']['rms_ms']:.2f} ms", fontsize=9)  # fmt: skip
        ax.legend(fontsize=8)

    try_plot(draw, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="comm_bench.py JSON files (>= 2 link settings)")
    ap.add_argument("--subspace", default="block_d0.25", help="the rows to predict")
    ap.add_argument("--out", default=None, help="default: <first run>_model.json")
    args = ap.parse_args(argv)
    runs = []
    for path in args.runs:
        run = json.loads(Path(path).read_text())
        run["_path"] = path
        runs.append(run)
    obs = observations(runs)
    try:
        model = fit(obs)
    except ValueError as exc:
        raise SystemExit(f"comm_model.py: {exc}") from None
    gbps = np.geomspace(1, 400, 200)
    curves = predict(model, obs, args.subspace, gbps)
    result = {"runs": args.runs, "subspace": args.subspace, "model": model,
              "gbps": gbps.tolist(), "curves": curves,
              "crossover_gbps": crossovers(curves, gbps),
              "observations": obs}  # fmt: skip
    out = Path(args.out or Path(args.runs[0]).with_name(Path(args.runs[0]).stem + "_model.json"))
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(markdown_table(["parameter", "value"],
                         [[k, f"{v:.4g}"] for k, v in model["params"].items()]))  # fmt: skip
    print(f"rms {model['rms_ms']:.3f} ms, max {model['max_abs_ms']:.3f} ms over {model['rows']} "
          f"rows; bandwidths (Gb/s): {model['bandwidth_gbps']}")  # fmt: skip
    print(f"crossover (compressed faster below, Gb/s): {result['crossover_gbps']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
