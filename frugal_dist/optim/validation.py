"""Argument validation: bad values raise ``ValueError`` naming the argument and the allowed ones."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping
from typing import Any

from frugal_dist.core.rules import STATE_FREE_RULES, STATE_FULL_RULES
from frugal_dist.core.subspaces import BLOCK_ORDERS, COORD_CHOICES, PROJ_SIDES, PROJ_TYPES
from frugal_dist.kernels.elementwise import triton_available
from frugal_dist.kernels.projection import PRECISIONS
from frugal_dist.kernels.refresh import METHODS as SVD_METHODS
from frugal_dist.optim.fast_apply import KERNELS
from frugal_dist.optim.free_scale import FREE_SCALES
from frugal_dist.optim.moment_transfer import MOMENT_TRANSFERS
from frugal_dist.optim.refresh_schedule import REFRESH_POLICIES

# "state_full": the group's ``state_full`` rule (AdamW, SGDM or Lion) on whole tensors.
ALGORITHMS = ("frugal", "adamw", "state_full", "signsgd", "sgd")
SUBSPACES = ("block", "coordinate", "projection")
RESIDUAL_COMM = ("exact", "sign", "hierarchical")
PROJ_QR_DEVICES = ("auto", "cpu", "param")
PROJ_PRECISIONS = ("auto", *PRECISIONS)  # auto: bf16 on CUDA, fp32 elsewhere

CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": ALGORITHMS,
    "subspace": SUBSPACES,
    "block_order": BLOCK_ORDERS,
    "coord_choice": COORD_CHOICES,
    "proj_type": PROJ_TYPES,
    "proj_side": PROJ_SIDES,
    "state_full": STATE_FULL_RULES,
    "state_free": STATE_FREE_RULES,
    "proj_precision": PROJ_PRECISIONS,
    "svd_method": SVD_METHODS,
    "moment_transfer": MOMENT_TRANSFERS,
    "free_scale": FREE_SCALES,
    "refresh_policy": REFRESH_POLICIES,
}


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_real(name: str, x: Any, lo: float, hi: float | None, lo_open: bool = False) -> None:
    """``x`` must be a finite real (not bool) in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    ok = (
        _is_real(x)
        and math.isfinite(x)
        and (x > lo if lo_open else x >= lo)
        and (hi is None or x <= hi)
    )
    if not ok:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        rng = f"a finite number {lo_s}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"{name} must be {rng}, got {x!r}")


def validate_options(opts: Mapping[str, Any], where: str = "") -> None:
    """Check every known option present in ``opts`` (a defaults dict or a param group)."""
    at = f" (in {where})" if where else ""
    for key, choices in CHOICES.items():
        if key in opts and opts[key] not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {opts[key]!r}{at}")
    if "lr" in opts:
        _check_real(f"lr{at}", opts["lr"], 0.0, None)
    if "density" in opts:
        _check_real(f"density{at}", opts["density"], 0.0, 1.0)
    if opts.get("density_final") is not None:  # None: no decay (optim.density_schedule)
        _check_real(f"density_final{at}", opts["density_final"], 0.0, 1.0)
    steps = opts.get("density_decay_steps")
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool)
                                  and steps >= 1):  # fmt: skip
        raise ValueError(
            f"density_decay_steps must be an integer >= 1 (or None with density_final=None), "
            f"got {steps!r}{at}"
        )
    if "update_gap" in opts:
        gap = opts["update_gap"]
        if not (isinstance(gap, int) and not isinstance(gap, bool) and gap >= 1):
            raise ValueError(f"update_gap must be an integer >= 1, got {gap!r}{at}")
    cap = opts.get("update_gap_max")  # None: 8 x update_gap (optim.refresh_schedule)
    if cap is not None and not (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1):
        raise ValueError(
            f"update_gap_max must be an integer >= update_gap (or None: 8 x update_gap), got "
            f"{cap!r}{at}"
        )
    if opts.get("refresh_threshold") is not None:  # None: 0.01
        _check_real(f"refresh_threshold{at}", opts["refresh_threshold"], 0.0, None)
    for key in ("inactive_lr_scale", "proj_params_lr_scale", "weight_decay"):
        if key in opts:
            _check_real(f"{key}{at}", opts[key], 0.0, None)
    if "eps" in opts:  # eps = 0 divides 0 by 0 wherever a gradient is exactly zero
        _check_real(f"eps{at}", opts["eps"], 0.0, None, lo_open=True)
    if "betas" in opts:
        b = opts["betas"]
        if not (
            isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_real(x) for x in b)
        ) or not all(0.0 <= x < 1.0 for x in b):
            raise ValueError(f"betas must be two numbers in [0, 1), got {b!r}{at}")
    if "reset_statistics" in opts and not isinstance(opts["reset_statistics"], bool):
        raise ValueError(
            f"reset_statistics must be True or False, got {opts['reset_statistics']!r}{at}"
        )
    if "seed" in opts and not (
        isinstance(opts["seed"], int) and not isinstance(opts["seed"], bool)
    ):
        raise ValueError(f"seed must be an integer, got {opts['seed']!r}{at}")


def check_known_keys(
    opts: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str
) -> None:
    """Unknown keys are errors (a typo must never be silently ignored), with a suggestion."""
    for key in opts:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown option {key!r} in {where}{hint} Allowed options: {sorted(allowed)}"
            )


TYPO_CUTOFF = 0.85  # difflib ratio: one wrong letter in a name of 6+ letters ("densty")


def check_group_keys(
    group: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str
) -> None:
    """torch.optim's convention: keys a param group does not use (``lr_mult``, ``layer_id``,
    tags that schedulers and tools add) are kept and ignored. A key within one typo of an
    option name (``densty``, ``updte_gap``) is an error with a suggestion, so a misspelt option
    never silently falls back to its default."""
    for key in group:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise ValueError(
                f"unknown option {key!r} in {where}; did you mean {close[0]!r}? (keys that are "
                "not near an option name are kept and ignored, as in torch.optim)"
            )


def check_step_options(
    *, residual_comm: str, shard_state: Any, reduce_gradients: Any, check_agreement: Any,
    fused: Any, proj_qr_device: str, kernels: str,
) -> None:  # fmt: skip
    """The optimizer-wide options of ``FRUGAL(...)`` (not group options): each one's allowed
    values, or a ``ValueError`` naming it."""
    if residual_comm not in RESIDUAL_COMM:
        raise ValueError(
            f"residual_comm must be one of {list(RESIDUAL_COMM)}, got {residual_comm!r}"
        )
    for flag, value in (("shard_state", shard_state), ("reduce_gradients", reduce_gradients),
                        ("check_agreement", check_agreement)):  # fmt: skip
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None (auto: CUDA), True or False, got {fused!r}")
    if proj_qr_device not in PROJ_QR_DEVICES:
        raise ValueError(
            f"proj_qr_device must be one of {list(PROJ_QR_DEVICES)}, got {proj_qr_device!r}"
        )
    if kernels not in KERNELS:
        raise ValueError(
            f"kernels must be one of {list(KERNELS)} (auto: Triton on CUDA, plain torch on "
            f"the CPU), got {kernels!r}"
        )
    if kernels == "triton" and not triton_available():
        raise ValueError("kernels='triton' needs the triton package; use kernels='auto'")
