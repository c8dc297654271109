#!/usr/bin/env python
"""Gradient communication per step: DDP-style full all-reduce vs FRUGAL's own reduction.

    torchrun --standalone --nproc_per_node 2 benchmarks/comm_bench.py --model 1b
    torchrun --standalone --nproc_per_node 4 benchmarks/comm_bench.py --model 1b

Replicated parameters (data parallel) with LLaMA shapes (``--model``, default 1b: 1.34B
parameters) and synthetic gradients: every rank draws its own N(0, 0.01^2) gradients once from
seed ``1000 + rank`` and copies them into ``.grad`` before each step (outside the timed region),
so no forward/backward runs and only the gradient exchange + update is timed (CUDA events).

Rows:

* ``ddp_allreduce`` -- what DDP does: the gradients, in ``--bucket-mb`` buckets (concatenated
  like DDP's flat buckets), mean all-reduced. ``+ adamw`` adds torch's fused AdamW step after it,
  the full data-parallel AdamW step to compare with FRUGAL's.
* ``frugal_<subspace>_d<rho>_<exact|sign>`` -- FRUGAL with ``reduce_gradients=True``:
  ``exact`` mean all-reduces every gradient (4 B x params, same bytes as DDP); ``sign``
  all-reduces the AdamW-group gradients, the active blocks / compact state-full gradients
  (columns: m x k, projection: r x max(m, n)) and all-gathers the state-free residual as 1-bit
  signs (majority vote). Bytes are the optimizer's ``comm_stats()`` of the last timed step:
  ``payload`` (bytes this rank hands to collectives) and ``wire`` (ring estimate: all-reduce
  2(W-1)/W x payload, all-gather (W-1)/W x total). Each FRUGAL variant is also run with
  ``reduce_gradients=False`` on the same gradients (the local update alone); the difference of
  the two medians estimates the time its communication costs.
* ``frugal_<subspace>_d<rho>_hierarchical`` (``--modes ...,hierarchical``) -- exact mean inside
  each simulated node of ``--node-size`` ranks, the sign scheme across nodes
  (``optim.sign_reduce``). On one host every link is fast; force NCCL onto TCP sockets
  (``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket``, which slows every communicator
  of the job, intra included) to see the slow-link regime. ``cross_node_payload``: the bytes
  of the collectives that would cross nodes (all of them for exact / sign; hierarchical less its
  ``grad_intra`` and ``intra_gather``).
* ``two_level_allreduce`` (``--inter-backend gloo``) -- the exact mean over the same two link
  tiers as the hierarchical rows: NCCL inside each simulated node, the cross-node slices over
  gloo (TCP); ``+ adamw`` adds the fused AdamW step. With ``--inter-backend gloo`` the
  hierarchical rows' inter groups are gloo too, so NVLink carries the intra traffic and TCP the
  cross-node bytes: the slow-link regime on one host. Compare ``frugal_*_hierarchical`` with
  ``two_level_allreduce(+adamw)`` and with ``local_step_ms`` + ``two_level_allreduce``.

Link settings (``--links``), recorded in the JSON as ``links`` (``setting``, the backend of each
group, the ``NCCL_*`` environment): ``default`` (NVLink / PCIe); ``nccl-socket`` sets
``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket`` before the process group starts, so
every NCCL communicator (world, intra and inter groups) goes over TCP sockets. Each ok row has
``link_wire``: its ring wire bytes per rank by the group that carried them (``world`` for DDP /
exact / sign, ``intra`` for ``grad_intra`` / ``intra_gather``, ``inter`` for the rest of the
hierarchical and two-level rows), the input of ``benchmarks/comm_model.py``.

Tokens/s (``--batch-size B --seq-len S``, 0 = off): one forward + backward of the model on B x S
random tokens per rank is timed alone (``fwd_bwd_ms``; no communication: FRUGAL and the DDP rows
reduce after the backward), and each row with an update gets ``tokens_per_s = W B S / (fwd_bwd_ms +
step_ms)``, the sum of two measured medians (the exchange is not overlapped with the backward).

Writes ``benchmarks/results/comm_bench_ws<W>.json`` (or ``--out``), a PNG and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    REPO,
    Budget,
    fmt,
    free_memory,
    frugal_device_options,
    is_oom,
    markdown_table,
    provenance,
    try_plot,
    write_json,
)  # fmt: skip

from frugal_dist.comm.collectives import allreduce_mean_  # noqa: E402
from frugal_dist.comm.hierarchical import node_allreduce_mean_  # noqa: E402
from frugal_dist.comm.stats import CommStats  # noqa: E402
from frugal_dist.comm.topology import INTER_BACKENDS, build_node_groups  # noqa: E402
from frugal_dist.train.model import build_model  # noqa: E402
from frugal_dist.train.optimizers import build_optimizer  # noqa: E402

FRUGAL_COMMON = dict(lr=1e-3, weight_decay=0.0, state_full="adamw", state_free="signsgd",
                     update_gap=100_000)  # fmt: skip
SUBSPACES = {
    "block_d0.25": dict(density=0.25, subspace="block", block_order="descending"),
    "columns_d0.25": dict(density=0.25, subspace="coordinate", coord_choice="columns"),
    "projection_d0.25": dict(density=0.25, subspace="projection", proj_type="random"),
    "d0": dict(density=0.0, subspace="block"),
}
LINK_PRESETS = {  # --links: environment set before the process group starts
    "default": {},
    "nccl-socket": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_NET": "Socket"},
}
LINKS = ("world", "intra", "inter")  # the groups a row's bytes can go over
INTRA_KINDS = ("grad_intra", "intra_gather")  # bytes inside a node (hierarchical, two-level)


def link_wire(variant: str, wire: dict[str, float]) -> dict[str, float]:
    """Ring wire bytes per rank by the group that carried them: DDP / exact / sign rows use the
    world group; hierarchical and two-level rows the intra group (``INTRA_KINDS``) and the inter
    group (the other kinds)."""
    out = dict.fromkeys(LINKS, 0.0)
    tiered = variant.endswith("_hierarchical") or variant.startswith("two_level")
    for kind, nbytes in wire.items():
        out[("intra" if kind in INTRA_KINDS else "inter") if tiered else "world"] += nbytes
    return out


def _events() -> tuple[Any, Any]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    return _CpuEvent(), _CpuEvent()


class _CpuEvent:
    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: _CpuEvent) -> float:
        return (other.t - self.t) * 1e3


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def ddp_allreduce(grads: list[torch.Tensor], bucket_bytes: int, world: int) -> None:
    """Mean all-reduce of ``grads`` in DDP-like flat buckets (copy in, reduce, copy out)."""
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        off = 0
        for g in bucket:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()

    for g in reversed(grads):  # DDP fills buckets in reverse registration order
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            flush()
            bucket, size = [], 0
    if bucket:
        flush()


def two_level_allreduce(grads: list[torch.Tensor], groups, stats: CommStats) -> None:
    """Exact mean of ``grads`` over the same links as the hierarchical rows: all-reduce inside
    each node (``grad_intra``), then each local rank's 1/L slice across nodes (``grad_full``,
    ``intra_gather``) -- exact mode's traffic when the cross-node links are the slow ones."""
    if groups.node_size > 1:
        allreduce_mean_(grads, groups.intra, stats, "grad_intra")
    if groups.nodes > 1:
        node_allreduce_mean_(grads, groups, stats, "grad_full")


def timed(fn, load, warmup: int, steps: int, deadline: float) -> list[float]:
    """Median-able step times (ms) of ``fn``; ``load`` (untimed) refreshes the gradients.
    All ranks run the same number of steps (``deadline`` is agreed by the caller)."""
    for _ in range(warmup):
        load()
        fn()
    out = []
    for i in range(steps):
        if i > 0 and _agreed(time.monotonic() > deadline):
            break
        load()
        _sync()
        a, b = _events()
        a.record()
        fn()
        b.record()
        _sync()
        out.append(a.elapsed_time(b))
    return out


def _agreed(flag: bool) -> bool:
    """True on every rank if it is true on any (ranks stop together)."""
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def run(args, rank: int, world: int, device) -> dict[str, Any]:
    budget = Budget(args.max_seconds)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with torch.device(device):
        model = build_model(args.model, max_seq_len=max(16, args.seq_len)).to(dtype)
    params = list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    source = [torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 0.01
              for p in params]  # fmt: skip
    for p in params:
        p.grad = torch.empty_like(p)

    def load() -> None:
        for p, s in zip(params, source):
            p.grad.copy_(s)

    numel = sum(p.numel() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    rows: list[dict[str, Any]] = []
    modes = args.modes.split(",")
    groups = None
    if "hierarchical" in modes or args.inter_backend:
        groups = build_node_groups(None, node_size(args, world), inter_backend=args.inter_backend)
    two_level = ["two_level_allreduce", "two_level_allreduce+adamw"] if args.inter_backend else []
    plan = ["ddp_allreduce", "ddp_allreduce+adamw", *two_level] + [
        f"frugal_{s}_{m}" for s in args.subspaces.split(",") for m in modes
    ]
    fwd_bwd = fwd_bwd_ms(model, args, device, budget, len(plan) + 1) if args.batch_size else None
    for i, name in enumerate(plan):
        deadline = time.monotonic() + budget.share(len(plan) - i)
        row: dict[str, Any] = {"variant": name}
        try:
            if name.startswith("ddp"):
                opt = None
                if name.endswith("adamw"):
                    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0,
                                            fused=device.type == "cuda" or None)  # fmt: skip

                def step(opt=opt) -> None:
                    ddp_allreduce([p.grad for p in params], args.bucket_mb << 20, world)
                    if opt is not None:
                        opt.step()

                row["step_ms"] = timed(step, load, args.warmup, args.steps, deadline)
                row["payload_bytes"] = {"allreduce": grad_bytes}
                row["wire_bytes"] = {"allreduce": 2 * (world - 1) / world * grad_bytes}
                del opt
            elif name.startswith("two_level"):
                opt = None
                if name.endswith("adamw"):
                    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0,
                                            fused=device.type == "cuda" or None)  # fmt: skip
                stats = CommStats()

                def step(opt=opt, stats=stats) -> None:
                    stats.begin_step()
                    two_level_allreduce([p.grad for p in params], groups, stats)
                    if opt is not None:
                        opt.step()

                row["step_ms"] = timed(step, load, args.warmup, args.steps, deadline)
                row["payload_bytes"] = dict(stats.last_step)
                row["wire_bytes"] = dict(stats.last_wire)
                del opt
            else:
                sub, mode = name[len("frugal_") :].rsplit("_", 1)
                kw = {**FRUGAL_COMMON, **frugal_device_options(), **SUBSPACES[sub]}
                nodes = {"node_groups": groups} if mode == "hierarchical" else {}
                opt = build_optimizer(model, "frugal", reduce_gradients=True, residual_comm=mode,
                                      **nodes, **kw)  # fmt: skip
                row["step_ms"] = timed(opt.step, load, args.warmup, args.steps, deadline)
                stats = opt.comm_stats()
                row["payload_bytes"] = stats["last_step"]
                row["wire_bytes"] = stats["last_step_wire"]
                row["state_bytes"] = opt.state_bytes()
                del opt
                free_memory()
                local = build_optimizer(model, "frugal", **kw)  # the same update, no comm
                row["local_step_ms"] = timed(local.step, load, args.warmup, args.steps, deadline)
                del local
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded; the next variant runs
            row["status"] = "oom" if is_oom(exc) else "error"
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        free_memory()
        if row["status"] == "ok":
            row["step_ms_median"] = statistics.median(row["step_ms"])
            if "local_step_ms" in row:
                row["local_step_ms_median"] = statistics.median(row["local_step_ms"])
                row["comm_ms_est"] = row["step_ms_median"] - row["local_step_ms_median"]
            row["payload_total"] = sum(row["payload_bytes"].values())
            row["wire_total"] = sum(row["wire_bytes"].values())
            row["payload_vs_ddp"] = row["payload_total"] / grad_bytes
            row["cross_node_payload"] = sum(v for k, v in row["payload_bytes"].items()
                                            if k not in INTRA_KINDS)  # fmt: skip
            row["link_wire"] = link_wire(name, row["wire_bytes"])
            if fwd_bwd is not None and not name.endswith("allreduce"):  # rows with an update
                tokens = world * args.batch_size * args.seq_len
                row["tokens_per_s"] = tokens / ((fwd_bwd + row["step_ms_median"]) / 1e3)
        rows.append(row)
        if rank == 0:
            print(f"[{name}] {row['status']} {fmt(row.get('step_ms_median'), ',.2f')} ms, "
                  f"payload {fmt(row.get('payload_total', 0) / 2**20)} MiB "
                  f"({fmt(row.get('payload_vs_ddp'), '.3f')} x DDP) {row.get('note', '')}",
                  flush=True)  # fmt: skip
    return {"rows": rows, "numel": numel, "grad_bytes": grad_bytes, "fwd_bwd_ms": fwd_bwd,
            "node_size": groups.node_size if groups else None,
            "elapsed_s": budget.elapsed()}  # fmt: skip


def node_size(args, world: int) -> int:
    """Ranks per simulated node: ``--node-size`` or LOCAL_WORLD_SIZE; a clear error unless it
    divides the world size."""
    size = args.node_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise SystemExit(f"--node-size {size} must divide the {world} ranks (torchrun "
                         "--nproc_per_node); e.g. --node-size 1 on 2 GPUs, 2 on 4")  # fmt: skip
    return size


def fwd_bwd_ms(model, args, device, budget: Budget, pending: int) -> float:
    """Median ms of one forward + backward (mean cross-entropy of next tokens) on
    ``--batch-size`` x ``--seq-len`` random tokens; the gradients it leaves are overwritten by
    the rows' ``load``."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=gen, device=device)  # fmt: skip

    def step() -> None:
        model(ids, labels=ids)[1].backward()

    times = timed(step, lambda: None, args.warmup, args.steps,
                  time.monotonic() + budget.share(pending))  # fmt: skip
    return statistics.median(times)


def table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        ok = r["status"] == "ok"
        rows.append([r["variant"], r["status"], fmt(r.get("step_ms_median"), ",.2f"),
                     fmt(r.get("local_step_ms_median"), ",.2f"), fmt(r.get("comm_ms_est"), ",.2f"),
                     fmt(r["payload_total"] / 2**20, ",.1f") if ok else "-",
                     fmt(r["wire_total"] / 2**20, ",.1f") if ok else "-",
                     fmt(r.get("payload_vs_ddp"), ".3f"),
                     fmt(r.get("cross_node_payload", r.get("payload_total", 0)) / 2**20, ",.1f")
                     if ok else "-",
                     "/".join(fmt(r["link_wire"][k] / 2**20, ",.1f") for k in LINKS)
                     if "link_wire" in r else "-",
                     fmt(r.get("tokens_per_s"), ",.0f")])  # fmt: skip
    return markdown_table(["variant", "status", "step ms (median)", "local step ms", "comm ms est",
                           "payload MiB/rank", "wire MiB/rank", "payload / DDP",
                           "cross-node payload MiB/rank", "wire MiB world/intra/inter",
                           "tokens/s"], rows)  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return

    def draw(plt):
        fig, ax = plt.subplots(1, 2, figsize=(13, 0.4 * len(rows) + 2), sharey=True)
        y = list(range(len(rows)))
        ax[0].barh(y, [r["payload_total"] / 2**20 for r in rows])
        ax[0].set_xlabel("payload MiB per rank per step")
        ax[1].barh(y, [r["step_ms_median"] for r in rows], label="step (with comm)")
        ax[1].scatter([r.get("local_step_ms_median", float("nan")) for r in rows], y, color="k",
                      marker="|", s=200, label="same update, no comm", zorder=3)  # fmt: skip
        ax[1].set_xlabel("ms per step (median)")
        ax[1].legend(fontsize=8)
        ax[0].set_yticks(y)
        ax[0].set_yticklabels([r["variant"] for r in rows])
        ax[0].invert_yaxis()
        hw = result["provenance"]["hardware"]
        fig.suptitle(f"{result['config']['model']} gradient exchange, {result['world_size']} x "
                     f"{hw.get('gpu_name') or hw.get('cpu_model')}", fontsize=10)  # fmt: skip

    try_plot(draw, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", help="a LLAMA_CONFIGS name (350m if memory-bound)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--subspaces", default=",".join(SUBSPACES))
    ap.add_argument("--modes", default="exact,sign",
                    help="residual_comm values to run: exact,sign,hierarchical")  # fmt: skip
    ap.add_argument(
        "--node-size",
        type=int,
        default=None,
        help="hierarchical: ranks per simulated node (default LOCAL_WORLD_SIZE)",
    )
    ap.add_argument(
        "--inter-backend",
        default=None,
        choices=INTER_BACKENDS,
        help="backend of the cross-node groups (gloo: TCP, emulated slow links); adds "
        "two_level_allreduce rows (exact over the same links)",
    )
    ap.add_argument("--links", choices=tuple(LINK_PRESETS), default="default",
                    help="nccl-socket: NCCL over TCP sockets for every group "
                    "(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket)")  # fmt: skip
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda (NCCL) when available, else cpu (gloo)")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=0,
                    help="sequences per rank, fwd+bwd timing for tokens/s (0: off)")  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (tokens/s)")
    ap.add_argument("--bucket-mb", type=int, default=25, help="DDP bucket size (its default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", default=None, help="redraw the PNG/table of an existing JSON")
    args = ap.parse_args(argv)
    for s in args.subspaces.split(","):
        if s not in SUBSPACES:
            ap.error(f"--subspaces: unknown {s!r}; choose from {list(SUBSPACES)}")
    for m in args.modes.split(","):
        if m not in ("exact", "sign", "hierarchical"):
            ap.error(f"--modes: unknown {m!r}; choose from exact, sign, hierarchical")
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        plot(result, Path(args.replot).with_suffix(".png"))
        print(table(result))
        return
    if args.batch_size < 0 or args.seq_len < 1:
        ap.error("--batch-size must be >= 0 and --seq-len >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise SystemExit("comm_bench.py needs torchrun --nproc_per_node >= 2")
    rank = int(os.environ["RANK"])
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available; use --device cpu (gloo)")
    if args.links != "default" and not cuda:
        raise SystemExit(f"--links {args.links} sets NCCL variables; it needs --device cuda")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(LINK_PRESETS[args.links])  # read by NCCL when a communicator starts
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=180))  # fmt: skip
    backend = dist.get_backend()
    links = {"setting": args.links, "world": backend, "intra": backend,
             "inter": args.inter_backend or backend,
             "nccl_env": {k: v for k, v in os.environ.items() if k[:5] == "NCCL_"}}  # fmt: skip
    tag = f"{'' if args.links == 'default' else '_' + args.links}" + (
        f"_inter{args.inter_backend}" if args.inter_backend else "")  # fmt: skip
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"comm_bench_ws{world}{tag}{'' if cuda else '_cpu'}.json")  # fmt: skip
    result = {"benchmark": "comm_bench", "config": vars(args), "world_size": world,
              "links": links, "provenance": provenance(), "subspaces": SUBSPACES,
              "frugal_common": {**FRUGAL_COMMON, **frugal_device_options()}}  # fmt: skip
    result.update(run(args, rank, world, device))
    if rank == 0:
        write_json(out, result)
        md = table(result)
        out.with_suffix(".md").write_text(md + "\n")
        print(md)
        print(f"wrote {out}")
        plot(result, out.with_suffix(".png"))
    dist.barrier()
    if owned:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
