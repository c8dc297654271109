"""Start-of-run agreement: every rank must run the same code, settings and model.

A *descriptor* is a flat ``{field: value}`` mapping of things that must be equal on every rank
(package and torch versions, config, seed, optimizer hyper-parameters, parameter names and
shapes). ``check_ranks_agree`` compares the descriptors of all ranks of a group:

    1. every rank hashes its descriptor (SHA-256 of canonical JSON, 63 bits) and the ranks
       all-gather the hashes: one int64 per rank;
    2. only if the hashes differ, the ranks all-gather the descriptors themselves
       (``all_gather_object``) and every rank raises the same ``RankMismatchError`` naming each
       differing field and which ranks hold which value.

Every rank takes the same branch (they all see the same hashes), so the check never leaves some
ranks waiting in a collective. Nothing is communicated at world size 1.

For library users of FRUGAL without the training loop, ``check_optimizer_agreement(optimizer)``
compares the optimizer's options, every param group's hyper-parameters and its parameter names
and shapes (one int64 all-gather when the ranks agree).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from frugal_dist.comm.collectives import ProcessGroup, _small_device, global_rank, rank_and_world
from frugal_dist.comm.participants import all_gather_bounded
from frugal_dist.comm.stats import CommStats

MAX_FIELDS_SHOWN = 8
MAX_VALUE_CHARS = 160
OPTIMIZER_OPTIONS = ("shard_state", "reduce_gradients", "residual_comm", "check_agreement",
                     "nonfinite", "fused", "proj_qr_device", "kernels", "node_size")  # fmt: skip
ABSENT = "<absent>"


class RankMismatchError(ValueError):
    """Ranks were started with different code, settings or models (raised on every rank)."""


def canonical(value: Any) -> str:
    """The JSON text two ranks compare: tuples equal lists, keys sorted, other objects by repr."""
    return json.dumps(value, sort_keys=True, default=repr)


def descriptor_digest(descriptor: Mapping[str, Any]) -> int:
    """A 63-bit hash of a descriptor (stable across processes, unlike ``hash()``)."""
    text = canonical({str(k): canonical(v) for k, v in descriptor.items()})
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1}}`` -> ``{"optimizer.lr": 1}`` (nested mappings only)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def mismatch_report(per_rank: list[Mapping[str, str]], ranks: list[int]) -> list[str]:
    """One line per differing field: ``"optimizer.lr: rank 0 has 0.003, rank 1 has 0.002"``.
    ``per_rank[i]`` is rank ``ranks[i]``'s canonical descriptor."""
    keys = sorted({k for d in per_rank for k in d})
    lines = []
    for key in keys:
        values = [d.get(key, ABSENT) for d in per_rank]
        if len(set(values)) == 1:
            continue
        holders: dict[str, list[int]] = {}
        for r, v in zip(ranks, values):
            holders.setdefault(v, []).append(r)
        parts = [f"{_ranks_text(rs)} {'has' if len(rs) == 1 else 'have'} {_short(v)}"
                 for v, rs in holders.items()]  # fmt: skip
        lines.append(f"{key}: " + ", ".join(parts))
    return lines


def check_ranks_agree(
    descriptor: Mapping[str, Any],
    pg: ProcessGroup = None,
    what: str = "the run",
    stats: CommStats | None = None,
    bounded: bool = False,
) -> None:
    """Raise ``RankMismatchError`` on every rank of ``pg`` unless all ranks passed equal
    descriptors (see the module docstring for what is communicated). ``bounded``: the digest
    all-gather waits at most the participants timeout (``comm.participants``)."""
    rank, world = rank_and_world(pg)
    if world == 1:
        return
    mine = {str(k): canonical(v) for k, v in descriptor.items()}
    digest = torch.tensor([descriptor_digest(mine)], dtype=torch.int64, device=_small_device(pg))
    gathered = [torch.empty_like(digest) for _ in range(world)]
    if bounded:
        all_gather_bounded(gathered, digest, pg, f"agreement on {what}")
    else:
        dist.all_gather(gathered, digest, group=pg)
    if stats is not None:
        stats.add("agreement_check", digest.nbytes, (world - 1) * digest.nbytes)
    if len({int(t.item()) for t in gathered}) == 1:
        return
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, mine, group=pg)
    ranks = [global_rank(pg, r) for r in range(world)]
    lines = mismatch_report(per_rank, ranks) or ["(descriptors differ only in hashing)"]
    shown = lines[:MAX_FIELDS_SHOWN]
    if len(lines) > MAX_FIELDS_SHOWN:
        shown.append(f"... and {len(lines) - MAX_FIELDS_SHOWN} more differing fields")
    raise RankMismatchError(
        f"ranks disagree on {what} ({len(lines)} field(s) differ; this is rank "
        f"{global_rank(pg, rank)}):\n  " + "\n  ".join(shown) + "\nStart every rank with the "
        "same frugal_dist and torch versions, the same config and seed, and the same model."
    )


# --------------------------------------------------------------------------- descriptors
def environment_descriptor() -> dict[str, Any]:
    """Versions every rank must share: frugal_dist (``__version__``, installed metadata and a
    hash of its source files) and torch."""
    import frugal_dist

    return {
        "frugal_dist.__version__": frugal_dist.__version__,
        "frugal_dist.installed_version": _installed_version("frugal-dist"),
        "frugal_dist.source_sha256": _source_hash(str(Path(frugal_dist.__file__).parent)),
        "torch.__version__": torch.__version__,
    }


def parameters_descriptor(
    named: Iterable[tuple[str, torch.Tensor]],
    prefix: str = "model",
    shape_of: Callable[[torch.Tensor], tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """``{prefix}.num_parameters`` and the shape of every named parameter: ``shape_of(p)``
    (the caller's logical shape, e.g. ``optim.engine_hooks.logical_shape`` for ZeRO-3 / FSDP1
    shards), else ``p.shape`` (a DTensor's is already the full shape)."""
    out: dict[str, Any] = {}
    count = 0
    for name, p in named:
        out[f"{prefix}.param.{name}"] = list(shape_of(p) if shape_of is not None else p.shape)
        count += 1
    out[f"{prefix}.num_parameters"] = count
    return out


def optimizer_descriptor(
    optimizer: torch.optim.Optimizer,
    shape_of: Callable[[torch.Tensor], tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """The optimizer's class and options, each param group's hyper-parameters and its parameter
    names (positions when the group has no ``names``) and shapes.

    Once an engine has bound a layout (``FRUGAL.bind_layout``: DeepSpeed ZeRO), a group's
    ``params`` may be this rank's flat partition, whose size differs between ranks: then only
    the names are compared (the engine owns the shapes).
    """
    out: dict[str, Any] = {"optimizer.class": type(optimizer).__name__}
    for attr in OPTIMIZER_OPTIONS:
        if hasattr(optimizer, attr):
            out[f"optimizer.{attr}"] = getattr(optimizer, attr)
    with_shapes = getattr(optimizer, "layout", None) is None
    for gi, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key not in ("params", "names"):
                out[f"optimizer.group{gi}.{key}"] = value
        names = group.get("names") or [str(i) for i in range(len(group["params"]))]
        prefix = f"optimizer.group{gi}"
        if with_shapes:
            out.update(parameters_descriptor(zip(names, group["params"]), prefix, shape_of))
        else:
            out.update({f"{prefix}.param.{name}": "shaped by the engine" for name in names})
            out[f"{prefix}.num_parameters"] = len(names)
    return out


def check_optimizer_agreement(
    optimizer: torch.optim.Optimizer,
    pg: ProcessGroup = None,
    stats: CommStats | None = None,
    shape_of: Callable[[torch.Tensor], tuple[int, ...]] | None = None,
) -> None:
    """``check_ranks_agree`` on ``optimizer_descriptor(optimizer)`` (nothing at world size 1).
    Call it once, on every rank of ``pg``, before the first step."""
    if rank_and_world(pg)[1] == 1:
        return
    check_ranks_agree(
        optimizer_descriptor(optimizer, shape_of),
        pg,
        "the optimizer's settings and parameters",
        stats,
        bounded=True,
    )


# --------------------------------------------------------------------------- helpers
def _installed_version(dist_name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=4)
def _source_hash(package_dir: str) -> str:
    h = hashlib.sha256()
    root = Path(package_dir)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\x00")
        h.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\x00")
    return h.hexdigest()[:16]


def _short(value: str) -> str:
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 3] + "..."


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ",".join(str(r) for r in ranks)
