#!/usr/bin/env python
"""Host-side cost of one ``optimizer.step()`` between refreshes: a CPU proxy for a launch-bound GPU.

On an H200 a FRUGAL step on LLaMA-130M-shaped parameters takes 4-11 ms against a 0.6 ms
memory-bandwidth bound, and barely changed from H100 to H200: the step is bound by host work
(Python per parameter, one kernel launch per ATen op), not by memory traffic. This script measures
that host work on the CPU, where it can be iterated on without a GPU:

* ``aten_ops``: ATen operators dispatched by one ``step()`` (a ``TorchDispatchMode`` counts every
  call that reaches the dispatcher; on CUDA each is about one kernel launch or more). Per-op
  counts are kept in the JSON (``ops``). ``counter_ops`` are the ones whose every input is one
  of the optimizer's 0-dim CPU step counters (``step``, ``sf_step``): on CUDA they stay on the
  host (no launch, ~1 us each); ``tensor_ops`` are the rest -- on CUDA, kernel launches or
  host-side view / metadata ops.
* ``host_ms``: wall time of ``step()`` with the *same parameter count and group structure* as
  LLaMA-130M (86 + 27 tensors) but every dimension divided by ``--scale`` (default 16: 48-wide
  layers, a 2000-token vocabulary), so the kernels themselves cost next to nothing and what is
  left is Python, dispatch and allocation overhead -- what a launch-bound GPU step pays.
  Median (and min) over ``--steps`` timed steps after ``--warmup`` ones, one intra-op thread.
* ``syncs``: ops that would block the host on CUDA: ``.item()`` / ``bool()`` of a tensor that is
  not one of the optimizer's CPU step counters, ``nonzero``, ``masked_select`` and friends. With
  ``nonfinite="skip"`` (the default, used here) exactly one is expected: reading the inf/nan flag.

FRUGAL runs with ``fused=True`` so the CPU takes the code path a CUDA step takes (``fused=None``
means fused on CUDA only); ``update_gap`` exceeds the run, so no timed step refreshes. Parameters
and gradients come from fixed seeds; the gradients are set once.

``--kernels triton --stub-launches`` (under ``TRITON_INTERPRET=1`` with Triton importable) times the
*Triton* path's host work on the CPU: FRUGAL runs with ``kernels="triton"`` and every Triton kernel
is replaced by a no-op launch, so ``host_ms`` is the Python, table building and uploads around the
launches (what a CUDA step pays before and after its nonfinite sync), without the interpreter's
kernel execution and without Triton's own launcher (``JITFunction.run``, ~0.05-0.1 ms per launch
on CUDA; not counted here). Uploads are CPU tensors there (no pinning, no copy). The numbers of
such a run are host cost only: its parameters are not updated.

``--check-steps N --save-params PATH`` instead runs every variant N steps with a fresh gradient per
step and ``update_gap=7`` (so refreshes happen too), with ``fused=True`` and ``fused=None``,
with default and with non-trivial ``weight_decay`` / ``inactive_lr_scale`` /
``proj_params_lr_scale``, and saves the final parameters and optimizer state tensors: the same
file from two code versions must compare bit-equal.

Usage::

    python benchmarks/step_host_overhead.py [--scale 16] [--steps 50] [--nonfinite skip|ignore]
                                            [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from optimizer_step_report import code_version  # noqa: E402
from optimizer_step_setup import LLAMA_130M, llama_param_specs  # noqa: E402

from frugal_dist import FRUGAL  # noqa: E402

LR = 1e-3
SYNC_OPS = {"aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2",
            "aten::repeat_interleave", "aten::equal", "aten::is_nonzero"}  # fmt: skip
SCALAR_OPS = {"aten::_local_scalar_dense", "aten::item"}


def variants() -> list[dict[str, Any]]:
    block = dict(subspace="block", block_order="descending")
    return [
        dict(name="torch_adamw_foreach", kind="torch", opts=dict(foreach=True)),
        dict(name="torch_adamw_fused", kind="torch", opts=dict(fused=True)),
        dict(name="frugal_all_adamw", kind="frugal", all_adamw=True, opts={}),
        dict(name="frugal_block_d0.25", kind="frugal", opts=dict(density=0.25, **block)),
        dict(name="frugal_block_d0", kind="frugal", opts=dict(density=0.0, **block)),
        dict(name="frugal_coordinate_d0.25", kind="frugal",
             opts=dict(subspace="coordinate", coord_choice="columns", density=0.25)),
        dict(name="frugal_projection_d0.25", kind="frugal",
             opts=dict(subspace="projection", proj_type="random", density=0.25)),
        dict(name="frugal_projection_svd_d0.25", kind="frugal",
             opts=dict(subspace="projection", proj_type="svd", density=0.25)),
    ]  # fmt: skip


def scaled_specs(scale: int) -> list[tuple[str, tuple[int, ...], str]]:
    keep = ("layers", "heads")
    cfg = {k: (v if k in keep else max(1, v // scale)) for k, v in LLAMA_130M.items()}
    return llama_param_specs(cfg)


def make(
    v: dict[str, Any], specs, params, gap: int, fused: bool | None, extra: dict | None = None
) -> torch.optim.Optimizer:
    extra = extra or {}
    if v["kind"] == "torch":
        wd = extra.get("weight_decay", 0.0)
        return torch.optim.AdamW(params, lr=LR, weight_decay=wd, **v["opts"])
    fr = [(n, p) for (n, _, g), p in zip(specs, params) if g == "frugal" and not v.get("all_adamw")]
    ad = [(n, p) for (n, _, g), p in zip(specs, params) if g == "adamw" or v.get("all_adamw")]
    groups = [{"params": [p for _, p in ad], "names": [n for n, _ in ad], "algorithm": "adamw"}]
    if fr:
        groups.insert(0, {"params": [p for _, p in fr], "names": [n for n, _ in fr]})
    return FRUGAL(groups, lr=LR, update_gap=gap, seed=0, fused=fused, **v["opts"], **extra)


def make_params(specs, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for _, s, _ in specs]


def set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.01


class OpCounter(TorchDispatchMode):
    """Counts ATen ops; remembers the inputs of scalar reads to classify them afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.calls: list[tuple[str, tuple[int, ...]]] = []  # (op, storage addresses of inputs)
        self.scalar_reads: list[torch.Tensor] = []
        self.sync_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops[name] += 1
        leaves = tree_flatten((args, kwargs or {}))[0]
        ptrs = tuple(t.data_ptr() for t in leaves if isinstance(t, torch.Tensor))
        self.calls.append((name, ptrs))
        if name in SCALAR_OPS:
            self.scalar_reads.append(args[0])
        elif name in SYNC_OPS:
            self.sync_ops[name] += 1
        return func(*args, **(kwargs or {}))


def counters(opt: torch.optim.Optimizer) -> set[int]:
    """Storage addresses of the CPU step counters (reading them never syncs a GPU)."""
    return {t.data_ptr() for st in opt.state.values() for t in st.values()
            if isinstance(t, torch.Tensor) and t.dim() == 0}  # fmt: skip


def stub_launches() -> int:
    """Replace every Triton kernel of ``frugal_dist.kernels`` by a no-op launch (host-cost
    runs, ``--stub-launches``); returns how many were replaced."""
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface

    import frugal_dist.kernels as kernels

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    count = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        if not info.name.endswith("_triton") and info.name != "projection_state":
            continue
        mod = importlib.import_module(f"frugal_dist.kernels.{info.name}")
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, KernelInterface) and name.endswith("_kernel"):
                setattr(mod, name, Stub())
                count += 1
    return count


def measure(v, specs, steps: int, warmup: int, nonfinite: str = "skip",
            kernels: str = "auto") -> dict[str, Any]:  # fmt: skip
    params = make_params(specs)
    set_grads(params, 1)
    extra = {} if v["kind"] == "torch" else dict(nonfinite=nonfinite, kernels=kernels)
    opt = make(v, specs, params, gap=10_000, fused=True, extra=extra)
    for _ in range(1 + warmup):
        opt.step()
    counter = OpCounter()
    with counter:
        opt.step()
    ptrs = counters(opt)
    dev_reads = sum(1 for t in counter.scalar_reads if t.data_ptr() not in ptrs)
    on_counters = sum(1 for _, p in counter.calls if p and all(x in ptrs for x in p))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    total = sum(counter.ops.values())
    return dict(name=v["name"], aten_ops=total, tensor_ops=total - on_counters,
                counter_ops=on_counters,
                counter_reads=len(counter.scalar_reads) - dev_reads,
                syncs=dev_reads + sum(counter.sync_ops.values()),
                host_ms=statistics.median(times), host_min_ms=min(times),
                ops=dict(counter.ops.most_common()))  # fmt: skip


def check_run(specs, steps: int, path: Path) -> None:
    out: dict[str, list[torch.Tensor]] = {}
    scaled = dict(weight_decay=0.1, inactive_lr_scale=0.1, proj_params_lr_scale=0.5)
    runs = [(v, fused, extra) for v in variants() for extra in ({}, scaled)
            for fused in ((None,) if v["kind"] == "torch" else (True, None))]  # fmt: skip
    for v, fused, extra in runs:
        if v["kind"] == "torch" and extra:
            extra = dict(weight_decay=0.1)
        params = make_params(specs)
        opt = make(v, specs, params, gap=7, fused=fused, extra=extra)
        for s in range(steps):
            set_grads(params, 100 + s)
            opt.step()
        state = opt.state_dict()["state"]
        buffers = [state[i][k] for i in sorted(state) for k in sorted(state[i])]
        label = f"{v['name']}/fused={fused}" + ("/wd,s_i,s_p" if extra else "")
        out[label] = [p.detach().clone() for p in params] + buffers
    torch.save(out, path)
    print(f"saved final params of {len(out)} runs ({steps} steps each) to {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=16, help="divide every LLaMA-130M dim by this")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--out", default=str(HERE / "results" / "step_host_overhead_cpu.json"))
    ap.add_argument(
        "--nonfinite",
        default="skip",
        choices=("skip", "raise", "ignore"),
        help="FRUGAL's nonfinite option (ignore: no inf/nan check, no sync)",
    )
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "torch", "triton"),
        help="FRUGAL's kernels option (triton on the CPU: TRITON_INTERPRET=1)",
    )
    ap.add_argument(
        "--stub-launches",
        action="store_true",
        help="Triton kernels replaced by no-op launches: host work only",
    )
    ap.add_argument("--check-steps", type=int, default=0)
    ap.add_argument("--save-params", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = scaled_specs(args.scale)
    stubbed = stub_launches() if args.stub_launches else 0
    if args.stub_launches:
        print(f"{stubbed} Triton kernels replaced by no-op launches (host work only)")
    if args.check_steps:
        if not args.save_params:
            raise ValueError("--check-steps needs --save-params PATH")
        check_run(specs, args.check_steps, Path(args.save_params))
        return
    n = sum(torch.Size(s).numel() for _, s, _ in specs)
    print(f"{len(specs)} tensors, {n:,} params (LLaMA-130M dims / {args.scale}), CPU")
    print(f"  {'variant':<26} {'aten ops':>9} {'tensor':>7} {'counter':>8} {'syncs':>6} "
          f"{'host ms':>9} {'min ms':>8}")  # fmt: skip
    keep = set(filter(None, args.only.split(",")))
    rows = []
    for v in variants():
        if keep and v["name"] not in keep:
            continue
        r = measure(v, specs, args.steps, args.warmup, args.nonfinite, args.kernels)
        rows.append(r)
        line = f"  {r['name']:<26} {r['aten_ops']:9d} {r['tensor_ops']:7d} {r['counter_ops']:8d} "
        print(line + f"{r['syncs']:6d} {r['host_ms']:9.2f} {r['host_min_ms']:8.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(benchmark="step_host_overhead",
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                  command=[sys.executable, *sys.argv], torch=torch.__version__,
                  threads=args.threads, scale=args.scale, nonfinite=args.nonfinite,
                  kernels=args.kernels, stubbed_kernels=stubbed,
                  n_tensors=len(specs), n_params=n,
                  steps=args.steps, warmup=args.warmup, code=code_version(), rows=rows)  # fmt: skip
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
