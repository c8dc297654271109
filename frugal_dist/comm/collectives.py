"""The collectives FRUGAL issues. Every function returns immediately at world size 1.

Tensors travel on their own device (CPU for gloo, CUDA for NCCL). Byte counts go to ``CommStats``
(see ``stats.py`` for payload vs wire bytes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from frugal_dist.comm.participants import (
    agree_on_seed_bounded,
    all_gather_bounded,
    broadcast_bounded,
)
from frugal_dist.comm.stats import CommStats
from frugal_dist.kernels.sign_bits import pack_signs

ProcessGroup = dist.ProcessGroup | None


def rank_and_world(pg: ProcessGroup = None) -> tuple[int, int]:
    """(rank, world size) in ``pg``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(pg), dist.get_world_size(pg)


def global_rank(pg: ProcessGroup, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``pg`` (identity for the default group)."""
    return group_rank if pg is None else dist.get_global_rank(pg, group_rank)


def _small_device(pg: ProcessGroup) -> torch.device:
    backend = dist.get_backend(pg)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_mean_(tensors: list[Tensor], pg: ProcessGroup, stats: CommStats, kind: str) -> None:
    """In place: each tensor becomes its mean over ranks (one coalesced float32 all-reduce)."""
    _, world = rank_and_world(pg)
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, group=pg)
    flat.div_(world)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))
        offset += n
    stats.add(kind, flat.nbytes, 2 * (world - 1) / world * flat.nbytes)


def allreduce_sum_(flat: Tensor, pg: ProcessGroup, stats: CommStats, kind: str) -> None:
    """In place: ``flat`` becomes its sum over ranks (one all-reduce of ``flat.nbytes``)."""
    _, world = rank_and_world(pg)
    if world == 1:
        return
    dist.all_reduce(flat, group=pg)
    stats.add(kind, flat.nbytes, 2 * (world - 1) / world * flat.nbytes)


def reduce_to_owners(
    owned: list[list[Tensor]], pg: ProcessGroup, stats: CommStats, kind: str
) -> None:
    """``owned[r]``: tensors to be summed onto rank r (every rank passes the same shapes and
    dtypes). After the call rank r's ``owned[r]`` hold the sums over all ranks (other ranks'
    tensors are unspecified). One ``reduce`` per (owner, dtype) of the concatenated tensors:
    payload = wire = the bytes of all of them (counted once per rank)."""
    rank, world = rank_and_world(pg)
    if world == 1:
        return
    total = 0
    for dst, tensors in enumerate(owned):
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.reduce(flat, dst=global_rank(pg, dst), group=pg)
            total += flat.nbytes
            if dst == rank:
                offset = 0
                for t in ts:
                    t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                    offset += t.numel()
    stats.add(kind, total, total)


def any_rank_flag(flag: Tensor, pg: ProcessGroup, stats: CommStats, kind: str) -> Tensor:
    """In place: ``flag`` (a float32 scalar, nonzero = raised) becomes its max over ranks: one
    4-byte all-reduce, counted under ``kind`` (payload 4 B, wire 2 (W-1)/W x 4 B); nothing at
    world size 1."""
    _, world = rank_and_world(pg)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        stats.add(kind, flag.nbytes, 2 * (world - 1) / world * flag.nbytes)
    return flag


def all_gather_objects(obj: object, pg: ProcessGroup = None) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` at world size 1. Host-side
    metadata only (fragment tables, checkpoint pieces): pickled size x world, not in
    ``CommStats``."""
    _, world = rank_and_world(pg)
    if world == 1:
        return [obj]
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, obj, group=pg)
    return gathered


def all_gather_rows_(out: Tensor, inp: Tensor, pg: ProcessGroup) -> None:
    """``out[r]`` <- rank r's ``inp`` (``out``: (W, *inp.shape), contiguous). NCCL: one
    ``all_gather_into_tensor``; gloo: ``all_gather`` into the rows (no stacking copy). Not
    counted: the caller knows what the bytes are."""
    if "nccl" in str(dist.get_backend(pg)).lower():
        dist.all_gather_into_tensor(out, inp, group=pg)
    else:
        dist.all_gather(list(out.unbind(0)), inp, group=pg)


def sign_gather(
    tensors: list[Tensor], pg: ProcessGroup, stats: CommStats, kernels: str = "auto"
) -> Tensor:
    """Every rank's packed signs of ``tensors`` (world > 1): one fused pack
    (``kernels.sign_bits``, 1 bit per entry, tensor t at byte ``packed_offsets``[t]) and one
    all-gather into a (W, B) uint8 buffer (payload B = sum ceil(n/8) bytes; wire (W-1) x B),
    counted under ``sign_allgather``. The majority vote sign(2 ones - W) (+1 / -1 / 0 on a tie;
    ``comm.bits`` is the format and the oracle) is the caller's: ``sign_bits.majority_vote``
    to float32, or ``kernels.vote_apply.vote_apply_`` straight into the update."""
    _, world = rank_and_world(pg)
    if world == 1:
        raise ValueError("sign_gather needs world > 1 (one rank's vote is torch.sign)")
    flat = pack_signs(tensors, impl=kernels)
    gathered = torch.empty((world, flat.numel()), dtype=torch.uint8, device=flat.device)
    all_gather_rows_(gathered, flat, pg)
    stats.add("sign_allgather", flat.nbytes, (world - 1) * flat.nbytes)
    return gathered


def broadcast_from_owners(
    owned: list[list[Tensor]], pg: ProcessGroup, stats: CommStats, kind: str,
    bounded: bool = False,
) -> None:  # fmt: skip
    """``owned[r]``: tensors rank r computed (pre-allocated with the right shapes elsewhere).
    After the call every rank holds rank r's values in ``owned[r]`` (one broadcast per rank).
    ``bounded``: each broadcast waits at most the participants timeout (``comm.participants``;
    a host sync, so only for rare hand-overs such as svd bases)."""
    rank, world = rank_and_world(pg)
    if world == 1:
        return
    total = mine = 0
    for src, tensors in enumerate(owned):
        if not tensors:
            continue
        if src == rank:
            flat = torch.cat([t.reshape(-1).float() for t in tensors])
        else:
            n = sum(t.numel() for t in tensors)
            flat = torch.empty(n, dtype=torch.float32, device=tensors[0].device)
        if bounded:
            broadcast_bounded(flat, global_rank(pg, src), pg, f"{kind} from rank {src}")
        else:
            dist.broadcast(flat, src=global_rank(pg, src), group=pg)
        total += flat.nbytes
        if src == rank:
            mine = flat.nbytes
        else:
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
    stats.add(kind, mine, (world - 1) / world * total)


def agree_on_seed(seed: int | None, pg: ProcessGroup = None) -> int:
    """Rank 0's seed on every rank (rank 0 draws one when ``seed`` is None); bounded in time
    (``comm.participants``: ``ParticipantsError`` when a rank of ``pg`` does not take part)."""
    return agree_on_seed_bounded(seed, pg)


def check_agreement(
    names: list[str], fingerprints: list[int], pg: ProcessGroup, stats: CommStats, what: str
) -> None:
    """All-gather per-parameter fingerprints and raise if any rank disagrees (never diverge
    silently). Two small all-gathers: the count, then the values; each waits at most the
    participants timeout (``comm.participants``)."""
    rank, world = rank_and_world(pg)
    if world == 1:
        return
    dev = _small_device(pg)
    count = torch.tensor([len(fingerprints)], dtype=torch.int64, device=dev)
    counts = [torch.empty_like(count) for _ in range(world)]
    all_gather_bounded(counts, count, pg, f"{what} fingerprint check")
    if len({int(c.item()) for c in counts}) != 1:
        raise RuntimeError(
            f"FRUGAL ranks disagree on {what}: ranks refresh "
            f"{[int(c.item()) for c in counts]} parameters at this step. All ranks must run the "
            "same model, param groups and optimizer settings."
        )
    if not fingerprints:
        return
    mine = torch.tensor(fingerprints, dtype=torch.int64, device=dev)
    allv = [torch.empty_like(mine) for _ in range(world)]
    all_gather_bounded(allv, mine, pg, f"{what} fingerprint check")
    stats.add("agreement_check", mine.nbytes + count.nbytes, (world - 1) * mine.nbytes)
    table = torch.stack(allv).cpu()
    bad = (table != table[0]).any(dim=0).nonzero().reshape(-1)
    if bad.numel():
        i = int(bad[0])
        values = {r: int(table[r, i]) for r in range(world)}
        raise RuntimeError(
            f"FRUGAL ranks disagree on the {what} of parameter {names[i]!r} "
            f"(fingerprint by rank: {values}; this is rank {rank}). Ranks were started with "
            "different seeds or optimizer settings: pass the same seed= on every rank, or "
            "seed=None to use rank 0's."
        )
