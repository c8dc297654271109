"""Checks and dtype restoration for ``FRUGAL.load_state_dict`` (no communication).

A checkpoint must come from the same model and the same algorithm: the parameter names of every
group, and the options that define the subspace and the rules (``STRUCTURAL_KEYS``), must equal
this optimizer's, or loading raises a ``ValueError`` naming the group, the field, both values and
the fix. Hyper-parameters (lr, betas, weight decay, ...) are restored from the checkpoint, as in
``torch.optim``; a different ``seed`` is restored too (it decides the subspaces, so the run
continues as it was), with a notice on the ``frugal_dist`` logger naming it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from frugal_dist.optim.refresh_schedule import SCHEDULE_KEYS

# step counters and the gradnorm block choice (``optim.block_gradnorm``): float32 scalars on the
# CPU, the same on every rank; the loss-driven refresh schedule (``optim.refresh_schedule``):
# float64 scalars on the CPU, the same on every rank
SCALAR_KEYS = ("step", "sf_step", "block_active", *SCHEDULE_KEYS)
STRUCTURAL_KEYS = ("algorithm", "subspace", "density", "density_final", "density_decay_steps",
                   "block_order", "coord_choice", "proj_type", "proj_side", "state_full",
                   "state_free", "refresh_policy")  # fmt: skip
log = logging.getLogger("frugal_dist")


def check_checkpoint_groups(saved_groups: list[dict], groups: list[dict]) -> None:
    """Refuse a checkpoint of another model or algorithm (see the module docstring)."""
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} param groups, this optimizer {len(groups)}: it "
            "comes from another model or param-group layout"
        )
    for gi, (saved, cur) in enumerate(zip(saved_groups, groups)):
        if "names" in saved and list(saved["names"]) != list(cur["names"]):
            diff = next(
                (i for i, (a, b) in enumerate(zip(saved["names"], cur["names"])) if a != b),
                min(len(saved["names"]), len(cur["names"])),
            )
            raise ValueError(
                f"checkpoint param group {gi} does not match this model: parameter {diff} is "
                f"{_at(saved['names'], diff)!r} in the checkpoint but {_at(cur['names'], diff)!r} "
                "here. Load a checkpoint of the same model and param-group rules."
            )
        for key in STRUCTURAL_KEYS:
            if key in saved and key in cur and saved[key] != cur[key]:
                raise ValueError(
                    f"checkpoint param group {gi} ({cur.get('name', 'unnamed')}) has "
                    f"{key}={saved[key]!r}, this optimizer {key}={cur[key]!r}: it is another "
                    f"algorithm. Build the optimizer with {key}={saved[key]!r} to resume, or "
                    "start from fresh state."
                )
        if "seed" in saved and saved["seed"] != cur.get("seed"):
            log.info(
                "load_state_dict: param group %d takes the checkpoint's seed=%r (this optimizer "
                "was built with seed=%r); the subspaces continue as in the saved run",
                gi, saved["seed"], cur.get("seed"),
            )  # fmt: skip


def saved_state_dtypes(state_dict: dict[str, Any]) -> dict[Any, dict[str, torch.dtype]]:
    """The dtype of every saved state tensor, before torch's loading casts them."""
    return {
        pid: {k: v.dtype for k, v in st.items() if isinstance(v, Tensor)}
        for pid, st in state_dict["state"].items()
    }


def restore_state_dtypes(
    state: Any, state_dict: dict[str, Any], saved: dict[Any, dict[str, torch.dtype]],
    groups: list[dict],
) -> None:  # fmt: skip
    """Give loaded state tensors their saved dtype (torch's default would cast float32 moments to
    a bf16 parameter's dtype); step counters stay float32 on the CPU (no device syncs)."""
    id_map = {
        pid: p
        for pid, p in zip(
            (i for g in state_dict["param_groups"] for i in g["params"]),
            (p for g in groups for p in g["params"]),
        )
    }
    for pid, dtypes in saved.items():
        p = id_map.get(pid)
        if p is None:
            continue
        st = state[p]
        for key, dtype in dtypes.items():
            if key in SCALAR_KEYS:
                kept = torch.float64 if key in SCHEDULE_KEYS else torch.float32
                st[key] = state_dict["state"][pid][key].detach().to("cpu", kept).clone()
            elif key in st and st[key].dtype != dtype:
                st[key] = state_dict["state"][pid][key].to(device=st[key].device, dtype=dtype)


def finish_load(
    state: Any, state_dict: dict[str, Any], saved: dict[Any, dict[str, torch.dtype]],
    groups: list[dict], defaults: dict[str, Any],
) -> None:  # fmt: skip
    """After torch's loading: options added since the checkpoint take their defaults, and the
    state tensors their saved dtypes (``restore_state_dtypes``)."""
    for group in groups:
        for key, value in defaults.items():
            group.setdefault(key, value)
    restore_state_dtypes(state, state_dict, saved, groups)


def _at(seq: list[str], i: int) -> str | None:
    return seq[i] if i < len(seq) else None
