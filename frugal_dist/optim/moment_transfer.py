"""``moment_transfer``: what happens to a projection's state-full moments at a subspace refresh.

A project addition, beyond the FRUGAL paper (off by default; the paper-faithful presets keep
``"none"``):

* ``"none"``   -- no change of basis: the moments are zeroed and bias correction restarts
                  (``reset_statistics=True``, the paper), or kept as they are
                  (``reset_statistics=False``).
* ``"rotate"`` -- the moments are carried into the new basis (as LDAdam / GaLore 2 do). With the
                  global bases P_old, P_new (dim x r, orthonormal columns) and the r x r change
                  of basis C = P_new^T P_old:

                      left  (state (r, n), G_sf = P^T G):  m' = C m        v' = (C o C) v
                      right (state (m, r), G_sf = G P):    m' = m C^T      v' = v (C o C)^T

                  The first moment (AdamW ``exp_avg``, SGDM / Lion ``momentum_buffer``) is a
                  running mean of compact gradients; the compact gradient in the new basis of
                  the old span's part is C times the old one (left), so m' is the exact change of
                  basis of that running mean (what lies outside the old span was never
                  accumulated and stays 0). The second moment is a running mean of squares:
                  for x' = C x with independent coordinates, E[x'_i^2] = sum_j C_ij^2 E[x_j^2],
                  hence v' = (C o C) v (o: entrywise product); it is >= 0 and equals v when
                  C is a permutation. ``sf_step`` (bias correction) keeps counting: the moments
                  are not restarted. Needs ``reset_statistics=True`` (rotation replaces the
                  reset; ``reset_statistics=False`` keeps the moments unrotated, a different
                  rule) and ``subspace="projection"`` (blocks and coordinates have no basis to
                  rotate); both combinations are refused (``check_moment_transfer``).

Engines: C depends only on the global bases, which every rank holds (random bases are drawn
everywhere, svd bases are broadcast), so the rotation is local everywhere: replicated / DDP
(``shard_state``: on the owner, the only rank with moments), flat fragments and FSDP2 row shards
(a right projection's (rows, r) moments rotate row by row; a left projection's (r, n) moments are
replicated and every rank rotates its copy alike). Communication: none.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from frugal_dist.core.rules import state_full_keys

MOMENT_TRANSFERS = ("none", "rotate")
SQUARED_KEYS = ("exp_avg_sq",)  # second moments: rotated with C o C


def check_moment_transfer(group: Mapping[str, Any], where: str, has_basis: bool) -> None:
    """Refuse ``moment_transfer="rotate"`` where it has no meaning (module docstring);
    ``has_basis``: the group's subspace kind keeps its state in a basis
    (``SubspaceKind.has_basis``)."""
    if group.get("moment_transfer", "none") != "rotate" or group.get("algorithm") != "frugal":
        return
    if not has_basis:
        raise ValueError(
            f"moment_transfer='rotate' in {where} rotates projection moments into the new basis, "
            f"but the group has subspace={group.get('subspace')!r} (no basis to rotate); use "
            "subspace='projection' or moment_transfer='none'"
        )
    if not group.get("reset_statistics", True):
        raise ValueError(
            f"moment_transfer='rotate' in {where} replaces the reset at a refresh by a change of "
            "basis, but reset_statistics=False asks to keep the moments unrotated; use "
            "reset_statistics=True with moment_transfer='rotate', or moment_transfer='none'"
        )


def basis_change(p_new: Tensor, p_old: Tensor) -> Tensor:
    """C = P_new^T P_old (r_new x r_old), computed in float64, returned in float32."""
    return (p_new.double().T @ p_old.double().to(p_new.device)).float()


def rotate_moments(st: MutableMapping[str, Tensor], rule: str, side: str, c: Tensor) -> None:
    """Carry the rule's buffers in ``st`` into the new basis, in place (module docstring):
    left m <- C m, v <- (C o C) v; right m <- m C^T, v <- v (C o C)^T."""
    for key in state_full_keys(rule):
        buf = st[key]
        if buf.numel() == 0:
            continue
        op = c * c if key in SQUARED_KEYS else c
        op = op.to(buf.device, torch.float32)
        new = op @ buf if side == "left" else buf @ op.T
        if new.shape == buf.shape:
            buf.copy_(new)  # in place: cached references to the buffer stay valid
        else:  # the rank changed with the group's density
            st[key] = new
