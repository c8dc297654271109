#!/usr/bin/env python
"""The fused projection state kernel (``kernels.projection_state.adamw_state``) at LLaMA-1B's
compact shapes, with the moments' 16-byte vector hints (``ALIGNED``, as the host decides:
``vector_moments``) against the scalar path (``vector_moments`` forced off: the kernel before
the hints), one launch per (shape, side) batch as the optimizer's step runs it.

    python benchmarks/kernels_projection_state.py                       # CUDA, LLaMA-1B
    python benchmarks/kernels_projection_state.py --precisions bf16 --clip
    TRITON_INTERPRET=1 python benchmarks/kernels_projection_state.py --model tiny --allow-cpu \
        --reps 1 --warmup 0 --rounds 1                                  # CPU smoke

Per batch: X float32 as the down kernel leaves it ((B, a, c), a ``left`` batch stored (B, c, a)),
one contiguous float32 m and v per matrix (the optimizer's state tensors), U in the apply's
dtype and layout (bf16: bfloat16 plus X's bfloat16 copy; tf32: float32). Timed with CUDA events
(median of ``--reps`` after ``--warmup``; the two paths alternate over ``--rounds`` and the
median round is kept). ``gbps``: the kernel's bytes (4 X + 16 m, v + U and copy bytes per entry)
over its time. ``identical``: m, v, U (and the copy) of one call on the same inputs are
torch.equal on both paths. Writes ``benchmarks/results/kernels_projection_state_cuda.json``
(``_cpu`` for a smoke run); without CUDA (and without ``--allow-cpu``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, markdown_table, provenance, write_json  # noqa: E402
from kernels_projection import median_ms  # noqa: E402
from optimizer_step_setup import llama_param_specs  # noqa: E402

from frugal_dist.core.subspaces import projection_rank, resolve_side  # noqa: E402
from frugal_dist.train.model import LLAMA_CONFIGS  # noqa: E402

BETAS, EPS, STEP = (0.9, 0.999), 1e-8, 10


def batches(model: str, density: float) -> dict[tuple, int]:
    """(a, c, side) of each compact batch -> its matrix count."""
    c = LLAMA_CONFIGS[model]
    specs = llama_param_specs(dict(vocab=c.vocab_size, dim=c.dim, intermediate=c.intermediate_size,
                                   layers=c.n_layers))  # fmt: skip
    out: dict[tuple, int] = {}
    for _, shape, kind in specs:
        if kind == "frugal":
            side, r = resolve_side("auto", shape), projection_rank(shape, density)
            key = ((shape[0], r) if side == "right" else (r, shape[1])) + (side,)
            out[key] = out.get(key, 0) + 1
    return out


def operands(B: int, a: int, c: int, side: str, precision: str, seed: int, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)

    def stored(dtype):
        if side == "left":
            return torch.empty(B, c, a, device=device, dtype=dtype).mT
        return torch.empty(B, a, c, device=device, dtype=dtype)

    x = stored(torch.float32).copy_(torch.randn(B, a, c, device=device, generator=gen))
    ms = [1e-3 * torch.randn(a, c, device=device, generator=gen) for _ in range(B)]
    vs = [1e-6 * torch.rand(a, c, device=device, generator=gen) for _ in range(B)]
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    return dict(x=x, ms=ms, vs=vs, u=stored(dt), copy=stored(dt) if precision == "bf16" else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(LLAMA_CONFIGS))
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--precisions", default="bf16,tf32")
    ap.add_argument("--clip", action="store_true", help="a pending clip's coefficient (0.5)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--allow-cpu", action="store_true", help="CPU smoke (TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("kernels_projection_state: no CUDA device; nothing measured (--allow-cpu: smoke)")
        return
    from frugal_dist.kernels import projection_state as ps

    device = torch.device("cuda" if cuda else "cpu")
    decide = ps.vector_moments
    clip = torch.tensor(0.5, device=device) if args.clip else None
    rows = []
    for precision in args.precisions.split(","):
        total = {"vector": 0.0, "scalar": 0.0}
        for i, ((a, c, side), B) in enumerate(batches(args.model, args.density).items()):
            ops = operands(B, a, c, side, precision, i, device)
            aligned = decide(ops["ms"], ops["vs"], c)

            def call(o=ops, B=B):
                ps.adamw_state(o["x"], o["ms"], o["vs"], [STEP] * B, BETAS, EPS, o["u"],
                               o["copy"], clip=clip)  # fmt: skip

            outs = {}
            for path in ("vector", "scalar"):  # the same inputs through both paths, once
                o = {**ops, "ms": [m.clone() for m in ops["ms"]],
                     "vs": [v.clone() for v in ops["vs"]]}  # fmt: skip
                ps.vector_moments = decide if path == "vector" else (lambda *_: False)
                call(o)
                outs[path] = [*o["ms"], *o["vs"], o["u"].clone()] + (
                    [] if o["copy"] is None else [o["copy"].clone()]
                )
            identical = all(torch.equal(p, q) for p, q in zip(outs["vector"], outs["scalar"]))
            per_round: dict[str, list[float]] = {"vector": [], "scalar": []}
            for _ in range(args.rounds):
                for path in per_round:
                    ps.vector_moments = decide if path == "vector" else (lambda *_: False)
                    per_round[path].append(median_ms(call, device, args.reps, args.warmup))
            ps.vector_moments = decide
            ms = {p: statistics.median(v) for p, v in per_round.items()}
            entries = B * a * c
            nbytes = entries * (20 + ops["u"].element_size() * (1 + (ops["copy"] is not None)))
            for p in ms:
                total[p] += ms[p]
            rows.append({"precision": precision, "batch": f"{B}x{a}x{c}", "side": side,
                         "aligned": aligned, "entries": entries, "bytes": nbytes,
                         "vector_ms": ms["vector"], "scalar_ms": ms["scalar"],
                         "vector_gbps": nbytes / ms["vector"] / 1e6,
                         "scalar_gbps": nbytes / ms["scalar"] / 1e6, "identical": identical,
                         "rounds": per_round})  # fmt: skip
        rows.append({"precision": precision, "batch": "all", "vector_ms": total["vector"],
                     "scalar_ms": total["scalar"]})  # fmt: skip
    table = markdown_table(
        ["precision", "batch", "side", "ALIGNED", "vector ms", "scalar ms", "GB/s", "identical"],
        [[r["precision"], r["batch"], r.get("side", ""), r.get("aligned", ""),
          f"{r['vector_ms']:.3f}", f"{r['scalar_ms']:.3f}",
          f"{r['vector_gbps']:.0f} / {r['scalar_gbps']:.0f}" if "bytes" in r else "",
          r.get("identical", "")] for r in rows],
    )  # fmt: skip
    print(table)
    name = f"kernels_projection_state_{'cuda' if cuda else 'cpu'}.json"
    out = Path(args.out or REPO / "benchmarks" / "results" / name)
    write_json(out, {"benchmark": "kernels_projection_state", "config": vars(args),
                     "provenance": provenance(), "tile": [ps.TILE_A, ps.TILE_C, ps.NUM_WARPS],
                     "rows": rows})  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
