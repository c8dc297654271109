"""Optimizer presets built from this code base, so baselines are apples to apples.

``build_optimizer(model, name, **options)``:

* ``frugal``  -- FRUGAL on the split weights; embeddings / heads / norms / biases state-full with
  the ``state_full`` rule (``non_split: adamw``: AdamW whatever that rule)
* ``adamw``   -- ``torch.optim.AdamW`` (fused on CUDA, foreach on CPU)
* ``signsgd`` -- signSGD on every parameter (FRUGAL's ``algorithm="signsgd"`` groups)
* ``galore``  -- GaLore-style: svd projection, no state-free update, statistics kept (FRUGAL code)
* ``badam``   -- BAdam-style: block subspace, no state-free update (FRUGAL code)
* ``rso``     -- RSO: targeted Linears become RSO layers (frozen W + B through a random P; the
  loop applies the transform before wrapping), Adam on B for ``inner_steps`` then merge; AdamW on
  the rest. Options: ``rank`` | ``density``, ``inner_steps``, ``proj_type``, ``prox``, ``targets``,
  ``lr``, ``betas``, ``eps``, ``weight_decay``, ``seed``, ``proj_params_lr_scale`` (B's step
  only), ``reset_statistics`` (False: Adam moments carry over a merge)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from frugal_dist.optim import FRUGAL, build_param_groups, check_param_coverage, pop_group_options

PRESETS: dict[str, dict[str, Any]] = {
    "frugal": {},
    "galore": {"subspace": "projection", "proj_type": "svd", "state_free": "none",
               "reset_statistics": False},
    "badam": {"subspace": "block", "block_order": "descending", "state_free": "none"},
}  # fmt: skip
OPTIMIZERS = ("frugal", "adamw", "signsgd", "galore", "badam", "rso")


def build_optimizer(
    model: nn.Module, name: str = "frugal", **options: Any
) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model`` with FRUGAL keyword ``options`` (lr, density, ...)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {list(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        allowed = {"lr", "betas", "eps", "weight_decay"}
        extra = set(options) - allowed - {"seed"}
        if extra:
            raise ValueError(f"optimizer 'adamw' takes only {sorted(allowed)}; got {sorted(extra)}")
        kw = {k: v for k, v in options.items() if k in allowed}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        on_cuda = next(model.parameters()).is_cuda
        return torch.optim.AdamW(model.parameters(), fused=on_cuda or None, **kw)
    if name == "rso":
        from frugal_dist.optim.rso import build_rso

        return build_rso(model, **options)
    options = dict(options)
    groups = build_param_groups(model, **pop_group_options(options))
    if name == "signsgd":
        for g in groups:
            g["algorithm"] = "signsgd"
    opts = {**PRESETS.get(name, {}), **options}
    check_param_coverage(model, groups)
    return FRUGAL(groups, **opts)
