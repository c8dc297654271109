"""Export an RSO-trained model in the model's own format (``nn.Linear`` weights, no RSO keys).

An ``RSOLinear`` computes ``y = x W^T + (x P_k) B^T (+ bias)``, so the function it has learnt is
the linear layer with weight

    W_merged = W + B P_k^T            (k: the layer's current outer iteration ``rso_outer``)

``model.state_dict()`` keeps W, B and ``rso_outer`` apart (what a resume needs). A file meant for
the model's own loader must hold ``W_merged`` under the layer's ``weight`` key and no ``B`` /
``rso_outer`` keys, or the loader drops B ("unexpected keys") and serves another function:

* ``merged_state_dict(model)``: ``model.state_dict()`` with every RSO layer merged (the module is
  not changed; training can go on);
* ``install_merged_save(model)`` (called by ``apply_rso`` / ``build_rso``): a Hugging Face model's
  ``save_pretrained(d)`` then writes ``merged_state_dict(model)``, so ``from_pretrained(d)`` of
  the original class computes the trained function.

A layer whose merge is pending (lazy engines: ``target_outer > rso_outer``) is merged with the B it
holds and its current P_k, exactly what its next forward would do. FSDP2 (DTensor rows): each
rank merges its own rows (W and B are sharded alike) and the entry stays a DTensor. ZeRO-3
partitions W: gather the parameters first (``deepspeed.zero.GatheredParameters``). No
communication; one (m x r)(r x n) product per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from frugal_dist.core.rso import merge_delta
from frugal_dist.optim.rso_layers import RSOLinear

RSO_ONLY_KEYS = ("B", "rso_outer")


@torch.no_grad()
def merged_weight(layer: RSOLinear) -> Tensor:
    """``W + B P_k^T`` of one layer, in W's dtype (a DTensor under FSDP2, row-sharded like W)."""
    w, b = layer.weight, layer.B
    if hasattr(w, "ds_tensor"):
        raise ValueError(
            f"RSO layer {layer.rso_name}: its weight is a ZeRO-3 partition; export inside "
            "deepspeed.zero.GatheredParameters(list(model.parameters())) so W and B are whole"
        )
    if hasattr(w, "to_local"):  # FSDP2: Shard(0) rows of W and B are the same rows
        from torch.distributed.tensor import DTensor

        local = w.to_local()
        local = local + merge_delta(b.to_local(), layer.projection(torch.float32, local.device),
                                    local.dtype)  # fmt: skip
        return DTensor.from_local(local, w.device_mesh, w.placements, shape=w.shape,
                                  stride=w.stride())  # fmt: skip
    return w.detach() + merge_delta(b.detach(), layer.projection(torch.float32, w.device), w.dtype)


def merged_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` in the format of the model before ``apply_rso``: each RSO layer's
    ``weight`` is ``W + B P_k^T`` and its ``B`` / ``rso_outer`` entries are left out."""
    state = model.state_dict()
    found = 0
    for prefix, module in model.named_modules():
        if not isinstance(module, RSOLinear):
            continue
        found += 1
        dot = f"{prefix}." if prefix else ""
        if f"{dot}weight" not in state:
            raise ValueError(f"state_dict of the model has no {dot}weight for RSO layer {prefix}")
        state[f"{dot}weight"] = merged_weight(module)
        for key in RSO_ONLY_KEYS:
            state.pop(f"{dot}{key}", None)
    if not found:
        raise ValueError("merged_state_dict: the model has no RSO layers (apply_rso was not run)")
    return state


def install_merged_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained(d, ...)`` (Hugging Face models) write
    ``merged_state_dict(model)`` unless the caller passes its own ``state_dict=``. Models without
    ``save_pretrained`` are left as they are (use ``merged_state_dict``)."""
    original = getattr(model, "save_pretrained", None)
    if original is None or getattr(original, "_frugal_rso_merged", False):
        return

    @functools.wraps(original)
    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = merged_state_dict(model)
        return original(*args, **kwargs)

    save_pretrained._frugal_rso_merged = True  # type: ignore[attr-defined]
    model.save_pretrained = save_pretrained  # type: ignore[method-assign]
