"""State-free rules of the whole matrix (``core.rules.MATRIX_FREE_RULES``: ``state_free="swan"``):
where they apply, and what is refused (each a ``ValueError`` naming ``state_free``, the setting
and the fix; nothing falls back to another rule).

``swan`` (``core.swan``) normalises the rows of the residual R and whitens it with the inverse
square root of its Gram matrix: every entry of F(R) depends on the whole matrix, so

* where R is defined: ``subspace="block"`` (inactive tensors: R = G, the whole tensor; at
  ``density=0`` every split tensor) and ``"projection"`` (R = G - up(down(G)), dense; at rho = 0
  R = G). ``"coordinate"`` is refused (``check_group_rule``): R has exact zeros at the state-full
  coordinates, and the whitened F would move them too (sign leaves them at 0), so the state-full
  and state-free parts would no longer be disjoint;
* orientation: GradNorm standardises each row (an ``nn.Linear`` weight's output unit, over its
  inputs), so weights stored (in, out) (``param_groups.IN_OUT_ATTR``: HF Conv1D) are refused;
* communication: ``residual_comm="sign"`` / ``"hierarchical"`` vote on 1-bit signs of R, from
  which no whitening can be computed: refused (``check_optimizer_groups``). With
  ``reduce_gradients`` and ``residual_comm="exact"`` each rank whitens the exact mean gradient:
  the single-process result on every rank, no extra bytes;
* engines: the whole matrix must be on the rank. Single process, DDP (replicated parameters,
  ``reduce_gradients`` False or True, ``shard_state``) hold it. A bound layout over more than one
  rank (ZeRO-1/2/3 flat partitions, FSDP1 slices, FSDP2 / HSDP row shards) gives each rank a
  fragment: refused when the layout is bound (``check_layout``; a gather of each matrix, m n x 4
  bytes per rank and step, is not implemented), unless the layout says it keeps whole tensors
  (``whole_params``). Any item whose fragment is not the whole matrix raises at the step
  (``whole_matrix``) as a last guard.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from frugal_dist.core.rules import MATRIX_FREE_RULES
from frugal_dist.optim.param_groups import refuse_in_out
from frugal_dist.optim.step_items import Item


def uses_matrix_rule(group: dict[str, Any]) -> bool:
    """The group's split parameters take a whole-matrix state-free rule."""
    return group.get("algorithm") == "frugal" and group.get("state_free") in MATRIX_FREE_RULES


def check_group_rule(group: dict[str, Any], where: str) -> None:
    """Refuse ``state_free="swan"`` with ``subspace="coordinate"`` and on (in, out)-stored
    weights (module docstring)."""
    if not uses_matrix_rule(group):
        return
    rule = group["state_free"]
    if group["subspace"] == "coordinate":
        raise ValueError(
            f"state_free={rule!r} (in {where}) whitens the whole residual matrix, but with "
            "subspace='coordinate' the residual is zero at the state-full coordinates and the "
            "whitened step would move them too. Use subspace='projection' or 'block' (or "
            "density=0), or state_free='signsgd'"
        )
    refuse_in_out(group, where, f"state_free={rule!r} (row-wise GradNorm)",
                  fix="Put it in a group with state_free='signsgd'")  # fmt: skip


def refuse_sign_comm(group: dict[str, Any], residual_comm: str) -> None:
    """``residual_comm`` other than ``"exact"`` sends only the signs of R (module docstring)."""
    if residual_comm != "exact" and uses_matrix_rule(group):
        raise ValueError(
            f"residual_comm={residual_comm!r} sends 1-bit signs of the state-free residual, "
            f"which state_free={group['state_free']!r} cannot use: it whitens the residual "
            f"itself (group {group.get('name')!r}); use residual_comm='exact' or "
            "state_free='signsgd'"
        )


def check_layout(groups: list[dict[str, Any]], layout: Any, world: int, label: Any) -> None:
    """Refuse a whole-matrix rule under a layout that shards parameters over ``world`` > 1
    ranks (module docstring). ``label(group, index)`` names a group."""
    if world <= 1 or getattr(layout, "whole_params", False):
        return
    for idx, g in enumerate(groups):
        if uses_matrix_rule(g):
            raise ValueError(
                f"{label(g, idx)}: state_free={g['state_free']!r} needs each split matrix whole "
                f"on a rank, but this engine layout ({type(layout).__name__}: ZeRO / FSDP) "
                f"gives each of the {world} ranks a fragment. Run it single-process or under "
                "DDP (torchrun, no sharding engine), or use state_free='signsgd' here"
            )


def whole_matrix(it: Item, local: Tensor) -> Tensor:
    """``local`` (the item's gradient or residual on this rank) as the (m, n) matrix, which a
    whole-matrix rule needs; a ``ValueError`` naming ``state_free`` if the rank holds only a
    fragment of it."""
    span = it.span
    if not span.is_full or local.numel() != span.m * span.n:
        raise ValueError(
            f"state_free={it.group['state_free']!r}: parameter {it.name!r} is a fragment on "
            f"this rank (an engine layout shards it), but the rule whitens the whole "
            f"({span.m}, {span.n}) matrix. Run without a sharding engine or use "
            "state_free='signsgd'"
        )
    return local.reshape(span.m, span.n)
