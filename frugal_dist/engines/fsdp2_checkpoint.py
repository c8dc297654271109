"""FSDP2 checkpoints with torch.distributed.checkpoint (DCP) that reshard to any world size.

``save(path, model, optimizer)`` / ``load(path, model, optimizer)``, called on every rank. The
same holds for HSDP (a (replicate, shard) mesh): state is sharded over the shard dim and
replicated over the other, so a checkpoint saved at R x S loads at any R' x S' (1 process too).

Why not plain ``get_state_dict`` + ``dcp.load``: DCP loads exactly the state keys the *new*
optimizer holds. FRUGAL's key set depends on where the run was -- with ``subspace="block"`` only the
tensors active at the saved step have moments -- so ``load`` first reads the checkpoint's metadata,
makes the optimizer hold exactly the saved keys (zero tensors of the saved shapes, sharded like
the parameter), and only then lets DCP fill them in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

PREFIX = "optim.state."


def save(path: str, model: nn.Module, optimizer: Any) -> None:
    """Save model and optimizer state (sharded, one file per rank plus metadata)."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _saved_state_keys(path: str) -> dict[str, dict[str, Any]]:
    meta = dcp.FileSystemReader(path).read_metadata()
    out: dict[str, dict[str, Any]] = {}
    for flat_key, md in meta.state_dict_metadata.items():
        if not flat_key.startswith(PREFIX):
            continue
        fqn, key = flat_key[len(PREFIX) :].rsplit(".", 1)
        out.setdefault(fqn, {})[key] = md
    return out


def _reconcile(path: str, optimizer: Any) -> None:
    """Give ``optimizer`` exactly the state keys (and shapes) stored in the checkpoint."""
    saved = _saved_state_keys(path)
    views = {}
    for group in optimizer.param_groups:
        for view in optimizer._views(group):
            views[view.name] = view
    for fqn, keys in saved.items():
        view = views.get(fqn)
        if view is None:
            continue
        st = view.state
        for key in [k for k in st if k not in keys]:
            del st[key]
        for key, md in keys.items():
            shape = _local_shape(md, st, key)
            if key in st and tuple(st[key].shape) == shape:
                continue
            device = "cpu" if not shape else view.data.device  # counters live on the CPU
            st[key] = torch.zeros(shape, dtype=md.properties.dtype, device=device)


def _local_shape(md: Any, st: Any, key: str) -> tuple[int, ...]:
    """This rank's local shape of saved state ``key`` (``st`` is a ``DTensorState``: sharded
    over the shard dim like its parameter, replicated over every other mesh dim)."""
    size = tuple(md.size)
    if len(size) == 0:
        return ()
    return st.local_shape(key, size)


def load(path: str, model: nn.Module, optimizer: Any) -> None:
    """Load a checkpoint written by ``save`` at any world size into ``model`` / ``optimizer``
    (both already built, sharded and with no gradients pending)."""
    get_state_dict(model, optimizer)  # materialises the optimizer state (DCP's zero-grad step)
    _reconcile(path, optimizer)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
