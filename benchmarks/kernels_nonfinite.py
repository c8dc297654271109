#!/usr/bin/env python
"""FRUGAL's inf/nan check (``optim.nonfinite``, option ``nonfinite="skip"``): today's
``torch._foreach_norm`` check against the one-launch Triton kernel (``kernels.finite``) at
LLaMA-1B sizes, one CUDA GPU, with the read-once bound.

Gradients: every LLaMA-1B parameter's (``llama_param_specs``: 1.34 B elements, 219 tensors),
normal values from a fixed seed, float32 (5.4 GB) and bfloat16 (2.7 GB); no model.

Rows, per dtype:

* ``foreach_norm``: the torch path (``FiniteCheck(grads, "torch")``): one ``_foreach_norm(inf)``
  per (device, dtype), the norms compared with inf.
* ``triton``: the kernel (``FiniteCheck(grads, "auto")``, built once as a step plan keeps it):
  one pointer upload and one launch.

Columns: ``flag_ms`` -- CUDA-event time of producing the device flag, no sync (median of
``--reps`` after ``--warmup``); ``host_ms`` -- ``perf_counter`` submission time of the same;
``check_ms`` -- wall time of the whole check as the step runs it (``grads_are_finite``: flag and
its one host sync); ``bound_ms`` -- one read of every gradient byte at the measured copy
bandwidth (``bench_common.copy_bandwidth``, read + write counted). Each row is verified: clean
gradients pass, and an inf / nan in the last element of the last tensor and in the first
element of the first tensor fail. A ``FINITE_BLOCK`` x ``FINITE_WARPS`` x ``FINITE_REDUCE``
sweep of the kernel follows (float32).

Usage::

    python benchmarks/kernels_nonfinite.py [--reps 20] [--out PATH] [--no-sweep]
    TRITON_INTERPRET=1 python benchmarks/kernels_nonfinite.py --device cpu --model tiny  # smoke

Writes JSON (default ``benchmarks/results/kernels_nonfinite_<device>.json``) and prints a table.
Without CUDA (and not ``--device cpu``) it prints why and exits 0 without writing anything.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import copy_bandwidth, free_memory, markdown_table, provenance, write_json  # noqa: E402
from optimizer_step_setup import llama_param_specs  # noqa: E402

from frugal_dist.kernels.elementwise import triton_available  # noqa: E402
from frugal_dist.optim.nonfinite import FiniteCheck, grads_are_finite, max_abs_norms  # noqa: E402

MODELS = {
    "1b": dict(vocab=32000, dim=2048, layers=24, heads=32, intermediate=5461),
    "tiny": dict(vocab=512, dim=64, layers=2, heads=2, intermediate=172),  # smoke runs only
}
SWEEP = [(4096, 4), (4096, 8), (8192, 4), (8192, 8), (16384, 8), (16384, 16), (32768, 16)]


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict:
    """Median CUDA-event ms (CPU: ``perf_counter``) and median host submission ms."""
    cuda = device.type == "cuda"
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
    return dict(flag_ms=statistics.median(dev_ms), host_ms=statistics.median(host_ms))


def wall(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall ms of ``fn`` (which syncs itself)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def _flag_fn(check: FiniteCheck, names, grads):
    if check.kernel.fast:
        return lambda: check.kernel(grads)
    return lambda: max_abs_norms(grads, check.buckets)  # the torch path's device work


def _check_fn(check: FiniteCheck, names, grads):
    return lambda: grads_are_finite(names, grads, None, 1, check)


def verify(check: FiniteCheck, names: list[str], grads: list[torch.Tensor]) -> bool:
    """Clean passes; inf at the last element of the last tensor, nan at the first of the
    first, fail (and are put back)."""
    ok = grads_are_finite(names, grads, None, 1, check)[0]
    for t, pos, bad in ((grads[-1], -1, float("inf")), (grads[0], 0, float("nan"))):
        flat = t.view(-1)
        keep = flat[pos].clone()
        flat[pos] = bad
        ok = ok and not grads_are_finite(names, grads, None, 1, check)[0]
        flat[pos] = keep
    return ok and grads_are_finite(names, grads, None, 1, check)[0]


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    specs = llama_param_specs(MODELS[args.model])
    names = [n for n, _, _ in specs]
    bw = copy_bandwidth(device)
    total = 0
    rows, sweep = [], []
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        grads = []
        for _, shape, _ in specs:
            g = torch.empty(shape, device=device, dtype=dtype)
            grads.append(g.normal_(0.0, 1e-2, generator=gen))
        total = sum(g.numel() for g in grads)
        nbytes = total * grads[0].element_size()
        for impl, kernels in (("foreach_norm", "torch"), ("triton", "auto")):
            if kernels == "auto" and device.type != "cuda":
                kernels = "triton"  # the CPU smoke run: the interpreter
            check = FiniteCheck(grads, kernels)
            r = timed(_flag_fn(check, names, grads), device, args.warmup, args.reps)
            run = _check_fn(check, names, grads)
            r["check_ms"] = wall(run, device, args.warmup, args.reps)
            r.update(dtype=str(dtype).replace("torch.", ""), impl=impl, bytes=nbytes,
                     bound_ms=nbytes / bw * 1e3, kernel=check.kernel.fast,
                     verified=verify(check, names, grads))  # fmt: skip
            r["x_bound"] = r["flag_ms"] / r["bound_ms"]
            rows.append(r)
        if dtype is torch.float32 and not args.no_sweep:
            from frugal_dist.kernels import finite_triton as ft

            saved = (ft.FINITE_BLOCK, ft.FINITE_WARPS, ft.FINITE_REDUCE)
            for (block, warps), reduce in itertools.product(SWEEP, (True, False)):
                ft.FINITE_BLOCK, ft.FINITE_WARPS, ft.FINITE_REDUCE = block, warps, reduce
                check = FiniteCheck(grads, "auto" if device.type == "cuda" else "triton")
                r = timed(_flag_fn(check, names, grads), device, 2, args.reps)
                sweep.append(dict(block=block, num_warps=warps, reduce=reduce,
                                  flag_ms=r["flag_ms"], x_bound=r["flag_ms"] / (nbytes / bw * 1e3),
                                  verified=verify(check, names, grads)))  # fmt: skip
            ft.FINITE_BLOCK, ft.FINITE_WARPS, ft.FINITE_REDUCE = saved
        del grads
        free_memory()
    return dict(benchmark="kernels_nonfinite", provenance=provenance(),
                model=f"llama_{args.model}", device=str(device), elements=total,
                tensors=len(specs), copy_bandwidth_bytes_per_s=bw, warmup=args.warmup,
                reps=args.reps, rows=rows, sweep=sweep)  # fmt: skip


def table(result: dict[str, Any]) -> str:
    head = ["dtype", "impl", "flag ms", "x bound", "bound ms", "host ms", "check ms (+sync)",
            "verified"]  # fmt: skip
    body = [[r["dtype"], r["impl"], f"{r['flag_ms']:.3f}", f"{r['x_bound']:.2f}",
             f"{r['bound_ms']:.3f}", f"{r['host_ms']:.3f}", f"{r['check_ms']:.3f}",
             r["verified"]] for r in result["rows"]]  # fmt: skip
    out = markdown_table(head, body)
    if result["sweep"]:
        sw = [[e["block"], e["num_warps"], e["reduce"], f"{e['flag_ms']:.3f}",
               f"{e['x_bound']:.2f}", e["verified"]] for e in result["sweep"]]  # fmt: skip
        head = ["FINITE_BLOCK", "warps", "FINITE_REDUCE", "flag ms", "x bound", "ok"]
        out += "\n\n" + markdown_table(head, sw)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile x warps sweep")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/kernels_nonfinite_<device>.json")  # fmt: skip
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke run of this script (needs TRITON_INTERPRET=1)")  # fmt: skip
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kernels_nonfinite: needs a CUDA GPU; nothing measured, nothing written")
        return 0
    if not triton_available():
        print("kernels_nonfinite: needs triton; nothing measured, nothing written")
        return 0
    out = args.out or str(HERE / "results" / f"kernels_nonfinite_{device.type}.json")
    result = measure(args, device)
    write_json(out, result)
    print(f"wrote {out}")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
