"""Functions that run inside each rank of a distributed test (see launch.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from frugal_dist import FRUGAL, build_param_groups
from tests.distributed.cases import FLAT_LOSS

SHAPES = [(12, 8), (8, 12), (10, 10), (6, 16), (16, 6)]
ADAMW_SHAPES = [(10,), (20, 4)]
REPLICATED = ("step", "proj_basis", "block_active")


def named_params(seed: int = 0) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    split = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    full = [nn.Parameter(torch.randn(s, generator=gen)) for s in ADAMW_SHAPES]
    return split, full


def groups(split, full) -> list[dict[str, Any]]:
    return [
        {"params": split, "names": [f"layers.{i}.w" for i in range(len(split))]},
        {"params": full, "names": [f"extra.{i}" for i in range(len(full))], "algorithm": "adamw"},
    ]


def rank_grads(step: int, rank: int, shapes) -> list[torch.Tensor]:
    """Rank ``rank``'s gradients at ``step``: dyadic values (multiples of 1/64, |g| < 8) so every
    sum over ranks is exact in float32 whatever the reduction order."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.round(torch.randn(s, generator=gen) * 64).clamp(-511, 511) / 64 for s in shapes]


def mean_grads(step: int, world: int, shapes) -> list[torch.Tensor]:
    per = [rank_grads(step, r, shapes) for r in range(world)]
    return [sum(gs[i] for gs in per) / world for i in range(len(shapes))]


def synthetic_setup(mode: str, opt_kw: dict) -> tuple[list, list, FRUGAL]:
    """(split params, all params, FRUGAL) of a synthetic run: ``mode`` "optimizer" -- FRUGAL
    reduces each rank's own gradients, sharded state; "ddp" -- gradients arrive averaged,
    sharded state; "single" -- one process."""
    split, full = named_params()
    dist_kw = {}
    if mode == "optimizer":
        dist_kw = dict(reduce_gradients=True, shard_state=True)
    elif mode == "ddp":
        dist_kw = dict(shard_state=True)
    return split, split + full, FRUGAL(groups(split, full), **dist_kw, **opt_kw)


def set_synthetic_grads(params: list, step: int, rank: int, world: int, mode: str) -> None:
    """Step ``step``'s gradients: this rank's own ("optimizer") or the ranks' mean (else)."""
    shapes = [tuple(p.shape) for p in params]
    grads = (
        rank_grads(step, rank, shapes) if mode == "optimizer" else mean_grads(step, world, shapes)
    )
    for p, g in zip(params, grads):
        p.grad = g.clone()


def synthetic_run(rank: int, world: int, steps: int, opt_kw: dict, mode: str) -> dict[str, Any]:
    """``mode``: "optimizer" -- each rank sets its own gradient and FRUGAL reduces;
    "ddp" -- gradients arrive averaged (as DDP hands them); "single" -- one process, mean grads."""
    split, params, opt = synthetic_setup(mode, opt_kw)
    comm = []
    for step in range(steps):
        set_synthetic_grads(params, step, rank, world, mode)
        opt.step()
        opt.observe_loss(FLAT_LOSS)  # refresh_policy="loss": the same on every rank
        comm.append(opt.comm_stats()["last_step"])
    return {
        "params": [p.detach().clone() for p in params],
        "state_bytes": opt.state_bytes(),
        # state every rank holds in full (not sharded): step counters and svd bases
        "replicated_bytes": sum(
            v.nbytes for st in opt.state.values() for k, v in st.items() if k in REPLICATED
        ),
        "comm": comm,
        "shard": opt.shard_report(),
    }


def seed_mismatch(rank: int, world: int) -> tuple[str, str]:
    """Ranks with different seeds: (the first step's agreement error, the refresh-time
    fingerprint error when the first-step check is passed over, as after a desync mid-run)."""
    messages = []
    for skip_first_step_check in (False, True):
        split, full = named_params()
        opt = FRUGAL(groups(split, full), subspace="coordinate", seed=rank, reduce_gradients=True)
        if skip_first_step_check:
            opt.mark_agreed()
        for p in split + full:
            p.grad = torch.ones_like(p)
        try:
            opt.step()
            messages.append("no error")
        except (RuntimeError, ValueError) as exc:
            messages.append(str(exc))
    return messages[0], messages[1]


def seed_broadcast(rank: int, world: int) -> int:
    split, full = named_params()
    opt = FRUGAL(groups(split, full), seed=None)
    return opt.param_groups[0]["seed"]


def tiny_llama_ddp(rank: int, world: int, steps: int, opt_kw: dict) -> list[torch.Tensor]:
    """A float64 tiny LLaMA under DDP with a sharded FRUGAL; rank r trains on its slice of the
    global batch. Returns the final parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from frugal_dist.train.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", max_seq_len=32).double()
    ddp = DDP(model) if world > 1 else model
    opt = FRUGAL(build_param_groups(model), shard_state=world > 1, **opt_kw)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        batch = torch.randint(0, 257, (6, 32), generator=gen)
        per = 6 // world
        local = batch[rank * per : (rank + 1) * per]
        _, loss = ddp(local, labels=local)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def fewer_params_than_ranks(rank: int, world: int):
    split, _ = named_params()
    opt = FRUGAL([{"params": split[:1], "names": ["only"]}], reduce_gradients=True,
                 shard_state=True, subspace="coordinate")  # fmt: skip
    for step in range(3):
        split[0].grad = rank_grads(step, rank, [tuple(split[0].shape)])[0]
        opt.step()
    return split[0].detach().clone(), opt.state_bytes()


def comm_bytes_by_mode(rank: int, world: int, kinds: dict, common: dict):
    out = {}
    for name, kw in kinds.items():
        for comm in ("exact", "sign"):
            split, full = named_params()
            opt = FRUGAL(groups(split, full), reduce_gradients=True, residual_comm=comm,
                         check_agreement=False, **{**common, **kw})  # fmt: skip
            params = split + full
            for p, g in zip(params, rank_grads(1, rank, [tuple(p.shape) for p in params])):
                p.grad = g
            opt.step()
            out[name, comm] = opt.comm_stats()["last_step"]
    return out


def train_tiny(rank: int, world: int, optimizer: dict, steps: int) -> dict:
    """The real training loop (DDP on gloo) for ``steps`` steps; returns its summary."""
    from frugal_dist.train.config import build_config
    from frugal_dist.train.loop import train

    cfg = build_config(
        {"model": "tiny", "seq_len": 64, "batch_size": 4, "max_steps": steps, "warmup_steps": 20,
         "eval_every": steps, "eval_batches": 4, "log_every": 10_000, "optimizer": optimizer,
         "data": {"source": "embedded", "max_bytes": 400_000}}
    )  # fmt: skip
    return train(cfg)


def svd_calls(rank: int, world: int) -> int:
    """How many SVDs this rank computes over 2 refreshes of 5 svd-projected matrices."""
    from tests.distributed.cases import count_svd_refreshes

    with count_svd_refreshes() as counter:
        split, full = named_params()
        opt = FRUGAL(groups(split, full), subspace="projection", proj_type="svd", update_gap=2,
                     reduce_gradients=True, shard_state=True)  # fmt: skip
        params = split + full
        for step in range(4):
            for p, g in zip(params, rank_grads(step, rank, [tuple(p.shape) for p in params])):
                p.grad = g
            opt.step()
    return counter[0]


def bind_flat_partitions(opt: Any, rank: int, world: int) -> list[tuple[torch.Tensor, int]]:
    """Bind ``opt`` to ZeRO-style flat partitions: each group's params packed into one flat
    vector, padded to ``world`` equal pieces (mid-row cuts included); rank r's piece replaces the
    group's params. Returns each group's (piece, piece size)."""
    from frugal_dist.layouts.flat import FlatEntry, FlatLayout

    entries, out = [], []
    for group in opt.param_groups:
        named = [(n, p.shape) for n, p in zip(group["names"], group["params"])]
        size, frags = partition_evenly(named, rank, world)
        whole = torch.cat([p.detach().reshape(-1) for p in group["params"]])
        whole = torch.cat([whole, whole.new_zeros(size * world - whole.numel())])
        flat = whole[rank * size : (rank + 1) * size].clone()
        for idx, ((name, shape), (_, off, start, numel)) in enumerate(zip(named, frags)):
            entries.append(FlatEntry(name, tuple(shape), idx, flat, off, start, numel))
        group["params"] = [flat]
        out.append((flat, size))
    opt.bind_layout(FlatLayout(entries))
    return out


def zero_sim_run(
    rank: int, world: int, steps: int, opt_kw: dict, comm: list | None = None
) -> list[torch.Tensor]:
    """FRUGAL on ZeRO-style flat partitions built with plain torch.distributed: each group's params
    are packed into one flat vector cut into ``world`` equal pieces (mid-row cuts included); rank r
    holds piece r and its slice of the mean gradient. Returns the reassembled full parameters
    (and appends each step's ``comm_stats()["last_step"]`` to ``comm`` if given)."""
    import torch.distributed as dist

    split, full = named_params()
    opt = FRUGAL(groups(split, full), **opt_kw)
    pieces = bind_flat_partitions(opt, rank, world)
    flats = [(flat, size, [p.shape for p in ps]) for (flat, size), ps in zip(pieces, (split, full))]
    shapes = [tuple(p.shape) for p in split + full]
    for step in range(steps):
        grads = mean_grads(step, world, shapes)
        per_group = [grads[: len(split)], grads[len(split) :]]
        for (flat, size, _), gs in zip(flats, per_group):
            g = torch.cat([x.reshape(-1) for x in gs])
            g = torch.cat([g, g.new_zeros(size * world - g.numel())])
            flat.grad = g[rank * size : (rank + 1) * size].clone()
        opt.step()
        opt.observe_loss(FLAT_LOSS)  # refresh_policy="loss": as synthetic_run's
        if comm is not None:
            comm.append(opt.comm_stats()["last_step"])
    out = []
    for flat, _size, pshapes in flats:
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        whole, pos = torch.cat(parts), 0
        for s in pshapes:
            n = int(torch.Size(s).numel())
            out.append(whole[pos : pos + n].view(s).clone())
            pos += n
    return out


def train_engine(rank: int, world: int, engine: str, ds_config: str | None, steps: int,
                 optimizer: dict | None = None) -> dict:  # fmt: skip
    """The training loop on a fixed global batch (8 sequences split over the ranks);
    ``optimizer``: options over the FRUGAL section's."""
    from frugal_dist.train.config import build_config
    from frugal_dist.train.loop import train

    raw = {"model": "tiny", "seq_len": 32, "batch_size": 8 // world, "max_steps": steps,
           "warmup_steps": 5, "eval_every": steps, "eval_batches": 2, "log_every": 1,
           "engine": engine, "grad_clip": 1.0,
           "optimizer": {"name": "frugal", "lr": 3e-3, "density": 0.25, "update_gap": 5,
                         "subspace": "coordinate"},
           "data": {"source": "embedded", "max_bytes": 200_000}}  # fmt: skip
    raw["optimizer"].update(optimizer or {})
    if ds_config:
        raw["deepspeed_config"] = ds_config
    return train(build_config(raw))


def partition_evenly(
    named: list[tuple[str, torch.Size]], rank: int, world: int
) -> tuple[int, list[tuple[str, int, int, int]]]:
    """Pack parameters in order into one flat vector padded to a multiple of ``world`` and cut it
    into equal partitions (what ZeRO-1/2 do per param group). Returns this rank's partition size
    and its fragments ``(name, offset_in_partition, start_in_param, numel)``, including empty ones.
    """
    total = sum(int(torch.Size(s).numel()) for _, s in named)
    size = -(-total // world)
    lo, hi = rank * size, (rank + 1) * size
    frags, pos = [], 0
    for name, shape in named:
        numel = int(torch.Size(shape).numel())
        a, b = max(lo, pos), min(hi, pos + numel)
        if a < b:
            frags.append((name, a - lo, a - pos, b - a))
        else:
            frags.append((name, 0, 0, 0))
        pos += numel
    return size, frags
