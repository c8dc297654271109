#!/usr/bin/env python
"""The 1-bit sign kernels (``frugal_dist.kernels.sign_bits``) against the read-once bound,
LLaMA-1B shapes, one CUDA GPU.

Gradients: float32 (and a bfloat16 copy), the 1.34 B entries of LLaMA-1B in its real shapes
(``optimizer_step_setup.llama_param_specs``, 291 tensors), fixed seed; also one flat float32
buffer of the same size (what a flat-buffer engine hands over). Gathered bytes for world W = 2
and 4 are W different packed buffers stacked (random bytes, fixed seed: the vote's cost does not
depend on the values), as ``all_gather_into_tensor`` leaves them.

Rows (``impl``: triton = the fused kernels, torch = ``impl="torch"`` chunked torch code on the
GPU, legacy = the per-tensor ``comm.bits`` oracle, ``pack_signs`` / ``majority_from_packed`` per
tensor, which the vote ran before these kernels):

* ``pack_<dtype>_<impl>``: every gradient -> one uint8 buffer (``pack_signs``);
* ``pack_flat_fp32_triton``: the same bytes from one flat buffer;
* ``pack_views_fp32_triton``: the same bytes from the per-tensor views of that flat buffer (what
  a flat gradient buffer hands over: runs of adjacent tensors pack as one row);
* ``vote_w<W>_<impl>``: (W, B) bytes -> float32 votes (``majority_vote``; W/8 + 4 B per entry);
* ``vote_bits_w<W>_<impl>``: (W, B) bytes -> the packed vote (``majority_bits``: [F = +1] and,
  W even, [F = 0] bits; (W + P)/8 B per entry);
* ``pack+vote_bits_w<W>_<impl>``: fp32 pack (per tensor) + packed vote, the figure of the target
  (<= 3 x the bound; ``target`` in the JSON says whether W = 2 and 4 meet it);
* ``pack+vote_w<W>_<impl>``: fp32 pack + float32 vote (what a float32 consumer of the vote needs);
* ``vote_apply_w<W>_<impl>``: (W, B) bytes -> the state-free update of float32 params in place,
  p <- p (1 - lr wd) - lr s F with no float32 vote (``kernels.vote_apply.vote_apply_``; reads
  W/8 + 4 B, writes 4 B per entry: ``x_own_bound`` is its time over those bytes at the copy
  bandwidth);
* ``vote+free_apply_w<W>_<impl>``: the two-kernel alternative, ``majority_vote`` then
  ``free_apply_`` of the float32 votes (rule signsgd: sign(F) = F), 16 + W/8 B per entry;
* ``pack+vote_apply_w<W>_<impl>`` / ``pack+vote+free_apply_w<W>_<impl>``: with the fp32 pack,
  the reduce-and-apply cost of a voted state-free entry.

Bound: one read of the float32 gradient (4 B x 1.34 B) at the measured copy bandwidth
(``bench_common.copy_bandwidth``, read + write bytes per second); ``x_own_bound`` is a row's time
over its own bytes moved at that bandwidth. Timing: CUDA events, median of ``--reps`` after
``--warmup`` calls, each call alone on an idle GPU (``ms``: host launch work included); Triton
rows also give ``queued_ms``, ``--reps`` calls back to back over their count (the host work
overlapped, as in a step where earlier kernels keep the GPU busy). Check: Triton bytes and votes
equal to ``comm.bits`` on the first tensors. ``--sweep`` times the Triton kernels' block x warps
(``PACK_*``, ``VOTE_*``, ``VOTE_BITS_*``, ``VOTE_APPLY_*`` of ``sign_bits_triton``).

Usage::

    python benchmarks/kernels_sign.py [--reps 20] [--sweep] [--no-legacy] [--no-torch] [--out PATH]
    python benchmarks/kernels_sign.py --replot RESULT.json
    TRITON_INTERPRET=1 python benchmarks/kernels_sign.py --device cpu --model tiny   # smoke

Writes JSON (default ``benchmarks/results/kernels_sign_cuda.json``) and a PNG next to it; prints
a table. Without CUDA (and not ``--device cpu``) it prints why and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
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
    is_oom,
    markdown_table,
    provenance,
    try_plot,
    write_json,
)
from optimizer_step_setup import llama_param_specs  # noqa: E402

from frugal_dist.comm import bits  # noqa: E402
from frugal_dist.kernels import sign_bits as sb  # noqa: E402
from frugal_dist.kernels.elementwise import free_apply_, triton_available  # noqa: E402
from frugal_dist.kernels.vote_apply import vote_apply_  # noqa: E402

MODELS = {
    "1b": dict(vocab=32000, dim=2048, layers=24, heads=32, intermediate=5461),
    "tiny": dict(vocab=512, dim=64, layers=2, heads=2, intermediate=172),  # smoke runs only
}
WORLDS = (2, 4)
TARGET = 3.0  # issue 18: pack + vote <= 3 x the read-once bound
SEED = 0
CHECK_TENSORS = 8
LR, DECAY = 1e-6, 1e-7  # vote-apply rows: alpha = lr, decay = lr wd (params drift negligibly)
DEVICE = torch.device("cuda")  # set by main()


def timed(fn: Callable[[], Any], warmup: int, reps: int) -> dict[str, float]:
    """Median / min ms of ``fn`` (CUDA events; ``perf_counter`` on the CPU)."""
    cuda = DEVICE.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ms.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=statistics.median(ms), min_ms=min(ms))


def queued(fn: Callable[[], Any], reps: int) -> float:
    """ms per call of ``reps`` calls back to back (CUDA events around all of them)."""
    if DEVICE.type != "cuda":
        return timed(fn, 0, reps)["ms"]
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def _legacy_pack(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([bits.pack_signs(g) for g in grads])


def _legacy_vote(gathered: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
    offsets, _ = sb.packed_offsets(numels)
    return [bits.majority_from_packed(gathered[:, o : o + (n + 7) // 8], n)
            for o, n in zip(offsets, numels)]  # fmt: skip


def _row(rows: dict, name: str, fn: Callable[[], Any], args, bound_ms: float,
         own_ms: float | None = None) -> None:  # fmt: skip
    """Time ``fn`` into ``rows[name]``: ms, min_ms, x_bound; ``queued_ms`` for Triton rows;
    ``x_own_bound`` given the row's own bytes at the copy bandwidth (``own_ms``)."""
    try:
        t = timed(fn, args.warmup, args.reps)
        t["x_bound"] = t["ms"] / bound_ms
        if "triton" in name:
            t["queued_ms"] = queued(fn, args.reps)
        if own_ms is not None:
            t["x_own_bound"] = t["ms"] / own_ms
        rows[name] = t
        extra = f"  queued {t['queued_ms']:8.3f} ms" if "queued_ms" in t else ""
        print(f"{name:30s} {t['ms']:9.3f} ms  {t['x_bound']:6.2f} x bound{extra}", flush=True)
    except Exception as exc:  # noqa: BLE001 - an OOM of a legacy row is a result, not a crash
        if not is_oom(exc):
            raise
        rows[name] = {"ms": "oom"}
        print(f"{name:30s} oom", flush=True)
    free_memory()


def _check(grads: list[torch.Tensor]) -> dict[str, bool]:
    """Triton bytes / votes equal to ``comm.bits`` on the first tensors."""
    few = grads[:CHECK_TENSORS]
    impl = "triton"
    packed = sb.pack_signs(few, impl=impl)
    ok_pack = torch.equal(packed, _legacy_pack(few))
    flip = sb.pack_signs([-g for g in few], impl=impl)
    out = {"pack_equal": bool(ok_pack)}
    for w in WORLDS:
        gathered = torch.stack([packed, flip] * (w // 2))
        gathered[0, ::3] ^= 0x5A  # some disagreement beyond the ties
        votes = sb.vote_views(sb.majority_vote(gathered, impl=impl), few)
        ref = _legacy_vote(gathered, [g.numel() for g in few])
        out[f"vote_w{w}_equal"] = all(torch.equal(a.reshape(-1), b) for a, b in zip(votes, ref))
        out[f"vote_bits_w{w}_equal"] = torch.equal(
            sb.majority_bits(gathered, impl=impl), sb.majority_bits(gathered, impl="torch")
        )
        params = [torch.randn_like(g) for g in few]
        want = [p.clone() for p in params]
        for p, v in zip(want, ref):
            p.add_(v.view(p.shape), alpha=-LR)
        offsets = sb.packed_offsets([g.numel() for g in few])[0]
        vote_apply_(params, gathered, offsets, LR, impl=impl)  # no decay: exact
        out[f"vote_apply_w{w}_equal"] = all(torch.equal(a, b) for a, b in zip(params, want))
    return out


SWEEP = {  # kernel prefix in sign_bits_triton: (blocks, warps); bytes (pack) or units (votes)
    "PACK": ((512, 1024), (4, 8)),
    "VOTE": ((64, 128, 256), (4, 8)),
    "VOTE_BITS": ((512, 1024, 2048), (4, 8)),
    "VOTE_APPLY": ((64, 128, 256), (4, 8)),
}


def sweep(grads, params, args, bound_ms: float) -> list[dict]:
    """Block x warps of each Triton kernel (fp32 pack; votes and vote-apply at W = 4)."""
    from frugal_dist.kernels import sign_bits_triton as tk

    offsets, total = sb.packed_offsets([g.numel() for g in grads])
    gathered = torch.randint(0, 256, (4, total), dtype=torch.uint8, device=DEVICE)
    calls = {
        "PACK": lambda: sb.pack_signs(grads, impl="triton"),
        "VOTE": lambda: sb.majority_vote(gathered, impl="triton"),
        "VOTE_BITS": lambda: sb.majority_bits(gathered, impl="triton"),
        "VOTE_APPLY": lambda: vote_apply_(params, gathered, offsets, LR, decay=DECAY,
                                          impl="triton"),
    }  # fmt: skip
    out = []
    for kernel, (blocks, warps_list) in SWEEP.items():
        saved = getattr(tk, f"{kernel}_BLOCK"), getattr(tk, f"{kernel}_WARPS")
        try:
            for block in blocks:
                for warps in warps_list:
                    setattr(tk, f"{kernel}_BLOCK", block)
                    setattr(tk, f"{kernel}_WARPS", warps)
                    t = timed(calls[kernel], args.warmup, args.reps)
                    q = queued(calls[kernel], args.reps)
                    out.append(dict(kernel=kernel.lower(), block=block, warps=warps, ms=t["ms"],
                                    queued_ms=q, x_bound=t["ms"] / bound_ms))  # fmt: skip
                    print(f"sweep {kernel.lower():10s} block {block:5d} warps {warps}: "
                          f"{t['ms']:.3f} ms (queued {q:.3f})", flush=True)  # fmt: skip
        finally:
            setattr(tk, f"{kernel}_BLOCK", saved[0])
            setattr(tk, f"{kernel}_WARPS", saved[1])
    return out


def targets(rows: dict, bound_ms: float) -> dict[str, dict]:
    """Issue 18's figure per W: per-tensor fp32 pack + packed vote (and + float32 vote), x the
    read-once bound (``queued_x_bound``: of the queued times), and whether <= ``TARGET``."""
    out = {}
    for w in WORLDS:
        for vote in (f"vote_bits_w{w}_triton", f"vote_w{w}_triton"):
            p, v = rows.get("pack_fp32_triton", {}), rows.get(vote, {})
            if not (isinstance(p.get("ms"), float) and isinstance(v.get("ms"), float)):
                continue
            item: dict[str, Any] = {}
            for key in ("ms", "queued_ms"):
                if key in p and key in v:
                    item[key] = p[key] + v[key]
                    item[key.replace("ms", "x_bound")] = item[key] / bound_ms
            item["meets_target"] = item["x_bound"] <= TARGET
            out["pack+" + vote] = item
    return out


def measure(args) -> dict[str, Any]:
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    specs = llama_param_specs(MODELS[args.model])
    grads = [torch.randn(shape, device=DEVICE, generator=gen) for _, shape, _ in specs]
    numels = [g.numel() for g in grads]
    n = sum(numels)
    bw = copy_bandwidth(DEVICE)
    bound_ms = 4 * n / bw * 1e3
    print(f"{n:,} entries, copy bandwidth {bw / 1e12:.3f} TB/s, read-once bound {bound_ms:.3f} ms")
    rows: dict[str, dict] = {}
    interpret = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    triton = sb.use_triton("auto", DEVICE) or interpret
    impls = [i for i in ("triton", "torch") if (i == "torch" and not args.no_torch) or
             (i == "triton" and triton)]  # fmt: skip
    pack_ms = (4 + 1 / 8) * n / bw * 1e3
    for impl in impls:
        _row(
            rows,
            f"pack_fp32_{impl}",
            lambda impl=impl: sb.pack_signs(grads, impl=impl),
            args,
            bound_ms,
            pack_ms,
        )
    if triton:
        half = [g.to(torch.bfloat16) for g in grads]
        _row(rows, "pack_bf16_triton", lambda: sb.pack_signs(half, impl="triton"), args, bound_ms)
        del half
        free_memory()
        flat = torch.cat([g.reshape(-1) for g in grads])
        _row(rows, "pack_flat_fp32_triton", lambda: sb.pack_signs([flat], impl="triton"), args,
             bound_ms, pack_ms)  # fmt: skip
        views = [v.view(g.shape) for v, g in zip(torch.split(flat, numels), grads)]
        _row(rows, "pack_views_fp32_triton", lambda: sb.pack_signs(views, impl="triton"), args,
             bound_ms, pack_ms)  # fmt: skip
        del flat, views
        free_memory()
    if not args.no_legacy:
        _row(rows, "pack_fp32_legacy", lambda: _legacy_pack(grads), args, bound_ms)
    total = sb.packed_offsets(numels)[1]
    g8 = torch.Generator(device=DEVICE).manual_seed(SEED + 1)
    for w in WORLDS:
        gathered = torch.randint(0, 256, (w, total), dtype=torch.uint8, device=DEVICE, generator=g8)
        for impl in impls:
            vote = lambda g=gathered, impl=impl: sb.majority_vote(g, impl=impl)  # noqa: E731
            _row(rows, f"vote_w{w}_{impl}", vote, args, bound_ms, (w / 8 + 4) * n / bw * 1e3)
            packed = lambda g=gathered, impl=impl: sb.majority_bits(g, impl=impl)  # noqa: E731
            planes = 2 - w % 2
            _row(rows, f"vote_bits_w{w}_{impl}", packed, args, bound_ms,
                 (w + planes) / 8 * n / bw * 1e3)  # fmt: skip
        if not args.no_legacy:
            _row(
                rows,
                f"vote_w{w}_legacy",
                lambda g=gathered: _legacy_vote(g, numels),
                args,
                bound_ms,
            )
        del gathered
        free_memory()
    params = [torch.randn(g.shape, device=DEVICE, generator=gen) for g in grads]
    offsets = sb.packed_offsets(numels)[0]
    for w in WORLDS:
        gathered = torch.randint(0, 256, (w, total), dtype=torch.uint8, device=DEVICE, generator=g8)
        own_ms = (8 + w / 8) * n / bw * 1e3
        for impl in impls:
            fused = lambda g=gathered, impl=impl, ps=params: vote_apply_(  # noqa: E731
                ps, g, offsets, LR, decay=DECAY, impl=impl
            )
            _row(rows, f"vote_apply_w{w}_{impl}", fused, args, bound_ms, own_ms)

            def two(g=gathered, impl=impl, ps=params) -> None:
                votes = sb.vote_views(sb.majority_vote(g, impl=impl), grads)
                free_apply_(ps, votes, LR, rule="signsgd", decay=DECAY, impl=impl)

            _row(rows, f"vote+free_apply_w{w}_{impl}", two, args, bound_ms)
        del gathered
        free_memory()
    swept = sweep(grads, params, args, bound_ms) if args.sweep and triton else None
    del params
    free_memory()
    for w in WORLDS:
        for impl in impls:
            p = rows.get(f"pack_fp32_{impl}", {})
            for name in (f"vote_apply_w{w}_{impl}", f"vote+free_apply_w{w}_{impl}"):
                v = rows.get(name, {})
                if isinstance(p.get("ms"), float) and isinstance(v.get("ms"), float):
                    ms = p["ms"] + v["ms"]
                    rows["pack+" + name] = dict(ms=ms, x_bound=ms / bound_ms)
    for w in WORLDS:
        for impl in [*impls, *([] if args.no_legacy else ["legacy"])]:
            for vote in (f"vote_w{w}", f"vote_bits_w{w}"):
                p, v = rows.get(f"pack_fp32_{impl}", {}), rows.get(f"{vote}_{impl}", {})
                if isinstance(p.get("ms"), float) and isinstance(v.get("ms"), float):
                    ms = p["ms"] + v["ms"]
                    rows[f"pack+{vote}_{impl}"] = dict(ms=ms, x_bound=ms / bound_ms)
    result = dict(
        provenance=provenance(), model=args.model, entries=n, tensors=len(grads),
        copy_bandwidth_Bps=bw, bound_ms=bound_ms, target_x_bound=TARGET, rows=rows,
        target=targets(rows, bound_ms), check=_check(grads) if triton else None, sweep=swept,
    )  # fmt: skip
    return result


def table(result: dict[str, Any]) -> str:
    rows = [[name, fmt(r.get("ms"), ".3f"), fmt(r.get("x_bound"), ".2f"),
             fmt(r.get("queued_ms"), ".3f"), fmt(r.get("x_own_bound"), ".2f")]
            for name, r in result["rows"].items()]  # fmt: skip
    head = (f"{result['entries']:,} entries; read-once bound {result['bound_ms']:.3f} ms; "
            f"target pack+vote <= {result['target_x_bound']} x bound; "
            f"check {result['check']}")  # fmt: skip
    text = head + "\n" + markdown_table(["row", "ms", "x bound", "queued ms", "x own bound"], rows)
    for name, t in (result.get("target") or {}).items():
        text += (f"\ntarget {name}: {t['ms']:.3f} ms = {t['x_bound']:.2f} x bound"
                 f" (queued {fmt(t.get('queued_x_bound'), '.2f')} x); meets "
                 f"<= {result['target_x_bound']}: {t['meets_target']}")  # fmt: skip
    return text


def plot(result: dict[str, Any], path: Path) -> None:
    names = [k for k, r in result["rows"].items() if isinstance(r.get("x_bound"), float)]

    def draw(plt) -> None:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
        ax.barh(names, [result["rows"][k]["x_bound"] for k in names])
        ax.axvline(1.0, color="k", lw=1, label="read-once bound")
        ax.axvline(result["target_x_bound"], color="r", ls="--", lw=1, label="target (pack+vote)")
        ax.set_xscale("log")
        ax.set_xlabel(f"time / read-once bound ({result['bound_ms']:.2f} ms)")
        ax.invert_yaxis()
        ax.legend()
        ax.set_title(f"1-bit sign kernels, {result['entries'] / 1e9:.2f} B entries")

    try_plot(draw, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time block x warps of both kernels")
    ap.add_argument("--no-legacy", action="store_true", help="skip the pre-kernel comm.bits rows")
    ap.add_argument("--no-torch", action="store_true", help="skip the impl='torch' rows")
    ap.add_argument(
        "--out", default=None, help="default benchmarks/results/kernels_sign_<dev>.json"
    )
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke run (Triton rows need TRITON_INTERPRET=1)")  # fmt: skip
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
        print("kernels_sign: needs a CUDA GPU; nothing measured, nothing written")
        return 0
    if DEVICE.type == "cuda" and not triton_available():
        print("kernels_sign: needs triton; nothing measured, nothing written")
        return 0
    out = args.out or str(HERE / "results" / f"kernels_sign_{DEVICE.type}.json")
    result = measure(args)
    write_json(out, result)
    print(f"wrote {out}")
    print(table(result))
    plot(result, Path(out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
