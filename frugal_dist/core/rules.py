"""State-full and state-free update rules, on lists of tensors (``torch._foreach_*`` kernels).

All rules return an update *direction* D; the caller applies ``W -= lr * scale * D``.

State-full rules (state lives only for the state-full coordinates; ``t`` counts state-full steps
since the last reset, starting at 1):

* ``adamw``: m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
             D = (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)          (torch.optim.AdamW)
* ``sgdm``:  m <- b1 m + g  (m starts at zero, so the first step gives m = g, as torch.optim.SGD
             with dampening 0 -- never initialised from the weights);  D = m
* ``lion``:  D = sign(b1 m + (1-b1) g);  m <- b2 m + (1-b2) g

State-free rules act on the residual R = G - up(down(G)): ``signsgd`` D = sign(R), ``sgd`` D = R,
``none`` D = 0, ``swan`` D = SWAN's normalised and whitened R at unit RMS (``core.swan``; a project
addition beyond the FRUGAL paper). ``swan`` is a matrix rule (``MATRIX_FREE_RULES``): R must be
the whole (m, n) matrix, not a fragment or a flattened view.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from frugal_dist.core.swan import swan_direction

STATE_FULL_RULES = ("adamw", "sgdm", "lion")
STATE_FREE_RULES = ("signsgd", "sgd", "none", "swan")
MATRIX_FREE_RULES = ("swan",)  # need the whole (m, n) residual matrix

STATE_KEYS: dict[str, tuple[str, ...]] = {
    "adamw": ("exp_avg", "exp_avg_sq"),
    "sgdm": ("momentum_buffer",),
    "lion": ("exp_avg",),
}


def state_full_keys(rule: str) -> tuple[str, ...]:
    """Names of the tensors a state-full rule keeps (each shaped like the compact gradient)."""
    try:
        return STATE_KEYS[rule]
    except KeyError:
        raise ValueError(f"state_full must be one of {STATE_FULL_RULES}, got {rule!r}") from None


def state_full_directions(
    rule: str,
    grads: list[Tensor],
    buffers: list[dict[str, Tensor]],
    steps: list[int],
    betas: tuple[float, float],
    eps: float,
) -> list[Tensor]:
    """Advance the state of each tensor by one step of ``rule`` and return the directions D.

    ``grads[i]`` and every tensor in ``buffers[i]`` have the same shape and dtype (float32).
    ``steps[i]`` is the state-full step count *after* this step (>= 1), used for bias correction.
    """
    if not grads:
        return []
    b1, b2 = betas
    if rule == "adamw":
        m = [b["exp_avg"] for b in buffers]
        v = [b["exp_avg_sq"] for b in buffers]
        torch._foreach_lerp_(m, grads, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1.0 - b2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(m, denom)
        torch._foreach_div_(out, [1.0 - b1**t for t in steps])
        return list(out)
    if rule == "sgdm":
        m = [b["momentum_buffer"] for b in buffers]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads)
        return [x.clone() for x in m]
    if rule == "lion":
        m = [b["exp_avg"] for b in buffers]
        c = torch._foreach_lerp(m, grads, 1.0 - b1)
        torch._foreach_sign_(c)
        torch._foreach_lerp_(m, grads, 1.0 - b2)
        return list(c)
    raise ValueError(f"state_full must be one of {STATE_FULL_RULES}, got {rule!r}")


def state_free_direction(rule: str, residual: Tensor) -> Tensor | None:
    """D for the state-free part (a new tensor), or None for ``none``. ``swan``: ``residual`` is
    the (m, n) matrix; D is float32."""
    if rule == "signsgd":
        return torch.sign(residual)
    if rule == "sgd":
        return residual.clone()
    if rule == "swan":
        return swan_direction(residual)
    if rule == "none":
        return None
    raise ValueError(f"state_free must be one of {STATE_FREE_RULES}, got {rule!r}")


def state_free_direction_(rule: str, residual: Tensor) -> Tensor | None:
    """``state_free_direction`` computed in place in ``residual`` (a temporary the caller owns);
    ``swan`` returns a new tensor (whitening is not an elementwise map)."""
    if rule == "signsgd":
        return residual.sign_()
    if rule == "sgd":
        return residual
    if rule == "swan":
        return swan_direction(residual)
    if rule == "none":
        return None
    raise ValueError(f"state_free must be one of {STATE_FREE_RULES}, got {rule!r}")
