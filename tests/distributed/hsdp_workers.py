"""Per-rank functions for the HSDP tests: FSDP2 on a (replicate, shard) mesh against the
single-process run on the same global batches (every rank trains on its own slice)."""

from __future__ import annotations

from typing import Any

import torch

from frugal_dist import FRUGAL, build_param_groups
from tests.distributed import fsdp_workers as fw


def _hsdp_model(replicas: int) -> torch.nn.Module:
    from frugal_dist.engines.fsdp2 import default_mesh, shard_model

    return shard_model(fw.make_model(), mesh=default_mesh(replicas=replicas))


def placements(model: torch.nn.Module) -> set[str]:
    return {str(tuple(p.placements)) for p in model.parameters()}


def hsdp(rank: int, world: int, replicas: int, steps: int, opt_kw: dict) -> dict[str, Any]:
    model = _hsdp_model(replicas)
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    losses = fw._train(model, opt, steps, rank, world)
    state_placements = {
        str(tuple(v.placements))
        for st in opt.state.values()
        for v in st.values()
        if hasattr(v, "placements")
    }
    return {
        "losses": losses,
        "params": fw._full_params(model),
        "state": fw._full_state(model, opt),
        "param_placements": placements(model),
        "state_placements": state_placements,
        "state_bytes": opt.state_bytes(),
    }


def hsdp_many(
    rank: int, world: int, replicas: int, steps: int, kws: dict[str, dict]
) -> dict[str, dict[str, Any]]:
    """``hsdp`` for every option set of ``kws`` in one launch (one process start for all)."""
    return {name: hsdp(rank, world, replicas, steps, kw) for name, kw in kws.items()}


def hsdp_save_many(
    rank: int, world: int, replicas: int, steps: int, kws: dict[str, dict], root: str
) -> None:
    for name, kw in kws.items():
        hsdp_save(rank, world, replicas, steps, kw, f"{root}/{name}")


def hsdp_resume_many(
    rank: int, world: int, replicas: int, start: int, steps: int, kws: dict[str, dict], root: str
) -> dict[str, dict[str, Any]]:
    return {
        name: hsdp_resume(rank, world, replicas, start, steps, kw, f"{root}/{name}")
        for name, kw in kws.items()
    }


def hsdp_save(rank: int, world: int, replicas: int, steps: int, opt_kw: dict, path: str) -> None:
    from frugal_dist.engines import fsdp2_checkpoint

    model = _hsdp_model(replicas)
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    fw._train(model, opt, steps, rank, world)
    fsdp2_checkpoint.save(path, model, opt)


def hsdp_resume(
    rank: int, world: int, replicas: int, start: int, steps: int, opt_kw: dict, path: str
) -> dict[str, Any]:
    from frugal_dist.engines import fsdp2_checkpoint

    model = _hsdp_model(replicas)
    opt = FRUGAL(build_param_groups(model), **{**opt_kw, "seed": 12345})  # the saved seed wins
    fsdp2_checkpoint.load(path, model, opt)
    losses = fw._train(model, opt, steps, rank, world, start=start)
    return {"losses": losses, "params": fw._full_params(model)}


def tensor_parallel_step(rank: int, world: int) -> str:
    """FSDP2 + tensor parallelism on a (dp, tp) mesh: the row-parallel Linear's weight is
    ``Shard(1)`` on the tp dim. FRUGAL's first step must refuse it; returns the error text."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)).double()
    parallelize_module(model, mesh["tp"], {"0": RowwiseParallel(input_layouts=Replicate())})
    fully_shard(model, mesh=mesh["dp"])
    names = [n for n, _ in model.named_parameters()]
    opt = FRUGAL([{"params": list(model.parameters()), "names": names}], density=0.25)
    x = torch.randn(4, 8, dtype=torch.float64)
    model(x).square().sum().backward()
    try:
        opt.step()
    except ValueError as err:
        return str(err)
    return "no error"


def mesh_of(rank: int, world: int, replicas: int) -> Any:
    """``default_mesh(replicas)``'s (shape, dim names), or its error text."""
    from frugal_dist.engines.fsdp2 import default_mesh

    try:
        mesh = default_mesh(replicas=replicas)
    except ValueError as err:
        return str(err)
    return tuple(mesh.shape), mesh.mesh_dim_names


def train_loop(rank: int, world: int, replicas: int, steps: int) -> list[float]:
    """The real training loop (``engine=fsdp2``, ``fsdp2_replicas``) on a fixed global batch of
    8 sequences split over the ranks; the loss curve."""
    from frugal_dist.train.config import build_config
    from frugal_dist.train.loop import train

    raw = {"model": "tiny", "seq_len": 32, "batch_size": 8 // world, "max_steps": steps,
           "warmup_steps": 5, "eval_every": steps, "eval_batches": 2, "log_every": 1,
           "engine": "fsdp2", "fsdp2_replicas": replicas, "grad_clip": 1.0,
           "optimizer": {"name": "frugal", "lr": 3e-3, "density": 0.25, "update_gap": 5,
                         "subspace": "coordinate"},
           "data": {"source": "embedded", "max_bytes": 200_000}}  # fmt: skip
    return train(build_config(raw))["losses"]


def first_step_error(rank: int, world: int, replicas: int, opt_kw: dict) -> str:
    """One HSDP step with ``opt_kw``: the ValueError it raises, or "no error"."""
    model = _hsdp_model(replicas)
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    try:
        fw._train(model, opt, 1, rank, world)
    except ValueError as err:
        return str(err)
    return "no error"


def svd_calls(rank: int, world: int, replicas: int) -> int:
    """SVDs computed on this rank during 2 refreshes of every split matrix under HSDP."""
    from tests.distributed.cases import count_svd_refreshes

    with count_svd_refreshes() as counter:
        model = _hsdp_model(replicas)
        opt = FRUGAL(build_param_groups(model), subspace="projection", proj_type="svd",
                     update_gap=2, lr=1e-3)  # fmt: skip
        fw._train(model, opt, 4, rank, world)
    return counter[0]


def all_on_four(
    rank: int, world: int, steps: int, kws: dict[str, dict], dcp_kws: dict[str, dict],
    root: str, first: int, rest: int, refused: dict[str, dict],
) -> dict[str, Any]:  # fmt: skip
    """Everything ``test_hsdp`` runs on 4 ranks, in one launch (each piece builds its own model
    and mesh): the 2 x 2 runs, the DCP save at 2 x 2 (``root``) and its resume at 4 x 1, the
    default mesh, the refused options' first steps, the svd count, the training loop at 2 x 2
    and, last, the tensor-parallel refusal (a (dp, tp) mesh)."""
    out: dict[str, Any] = {"hsdp": hsdp_many(rank, world, 2, steps, kws)}
    hsdp_save_many(rank, world, 2, first, dcp_kws, root)
    out["resumed"] = hsdp_resume_many(rank, world, 4, first, rest, dcp_kws, root)
    out["mesh"] = {replicas: mesh_of(rank, world, replicas) for replicas in (2, 3)}
    out["refused"] = {k: first_step_error(rank, world, 2, kw) for k, kw in refused.items()}
    out["svd_calls"] = svd_calls(rank, world, 2)
    out["train_loop"] = train_loop(rank, world, 2, 12)
    out["tensor_parallel"] = tensor_parallel_step(rank, world)
    return out


def all_on_one(
    rank: int, world: int, dcp_kws: dict[str, dict], root: str, first: int, rest: int
) -> dict[str, Any]:
    """``test_hsdp``'s one-process runs, in one launch: the DCP resume and the training loop."""
    return {"resumed": hsdp_resume_many(rank, world, 1, first, rest, dcp_kws, root),
            "train_loop": train_loop(rank, world, 1, 12)}  # fmt: skip
