"""``density_final`` / ``density_decay_steps``: the state-full density decays linearly over
training (AdaFRUGAL, arXiv 2601.11568), so the optimizer state shrinks as training proceeds.

A project addition (issue 19), off by default (``density_final=None``: the density stays
``density``). With rho0 = ``density``, rho_F = ``density_final``, D = ``density_decay_steps``
and T = ``update_gap``, refresh k (taken at step t = k T) sizes its subspace from

    rho(k) = rho0 + (rho_F - rho0) * min(1, k T / D)

with the kinds' own rounding (``core.subspaces``: block round(rho n), coordinate
floor(rho dim), projection round(rho d)); the size holds until the next refresh. rho(k)
depends only on k and the group's options, so every rank computes the same sizes without
communicating, and a resumed run recomputes them from its saved step counters (the state holds
tensors only). rho_F <= rho0, so rho(k) never grows: refresh 0 is the largest subspace, and the
peak state memory is the rho0 run's.

What happens to the state-full moments at a refresh whose size differs from the last one:

* ``reset_statistics=True`` (the paper): they restart at the new size anyway.
* ``moment_transfer="rotate"`` (projection): C = P_new^T P_old is r_new x r_old, so the
  moments move into the smaller basis (``optim.moment_transfer``; the dropped directions'
  moments are lost).
* ``reset_statistics=False`` keeps moments slot by slot: whole tensors for ``block`` (a block
  keeps its moments while it stays active: unaffected by the count), but the compact
  coordinate / projection buffers would change shape, so that combination is refused.

Block orders: ``random`` draws each refresh's set with that refresh's count; ``ascending`` /
``descending`` move their pointer by each refresh's count (the position of refresh k is the sum
of the earlier counts, as upstream's ``next_block_start``); ``gradnorm`` takes the count of the
refresh. ``mirror``, ``strided`` and ``random_pass`` are built around one fixed count (pairs,
windows, passes) and are refused.

Sharded state (``shard_state``): the static owner plan (``optim.ownership``) weighs each
parameter by its refresh-0 (largest) state, so an owner's bytes only shrink afterwards; block
owners are balanced over each refresh's active set as before. Flat and row-sharded layouts hold
the rows of each refresh's compact state, as for a fixed density.
"""

from __future__ import annotations

import functools
from typing import Any

from frugal_dist.core.subspaces import BlockSchedule, block_count

DECAY_ORDERS = ("random", "ascending", "descending", "gradnorm")


def decays(group: dict[str, Any]) -> bool:
    """The group's density follows the linear schedule (``density_final`` set)."""
    return group.get("density_final") is not None


def density_at(group: dict[str, Any], k: int) -> float:
    """rho(k) of the module docstring: the density that sizes refresh ``k`` (``density``
    itself when the group does not decay)."""
    rho0 = group["density"]
    if not decays(group):
        return rho0
    t = int(k) * group["update_gap"]
    frac = min(1.0, t / group["density_decay_steps"])
    return rho0 + (group["density_final"] - rho0) * frac


def check_density_decay(group: dict[str, Any], where: str) -> None:
    """With the defaults filled in: refuse (``ValueError`` naming the field and the fix) a
    schedule without ``density_decay_steps``, ``density_final`` above ``density``, and the
    combinations of the module docstring that cannot follow a changing size."""
    final, steps = group.get("density_final"), group.get("density_decay_steps")
    if final is None:
        if steps is not None:
            raise ValueError(
                f"density_decay_steps={steps!r} (in {where}) is set but density_final is None: "
                "set density_final (the density reached after density_decay_steps steps) or "
                "leave density_decay_steps unset"
            )
        return
    if steps is None:
        raise ValueError(
            f"density_final={final!r} (in {where}) needs density_decay_steps (an integer >= 1: "
            "the step at which the density reaches density_final)"
        )
    if final > group["density"]:
        raise ValueError(
            f"density_final={final!r} (in {where}) must be in [0, density={group['density']!r}]: "
            "the density decays from density to density_final; lower density_final"
        )
    if group["algorithm"] != "frugal":
        return
    kind = group["subspace"]
    if kind == "block" and group["block_order"] not in DECAY_ORDERS:
        raise ValueError(
            f"density_final (in {where}) changes the number of active blocks at each refresh, "
            f"but block_order={group['block_order']!r} is built around one fixed count; use "
            f"block_order in {list(DECAY_ORDERS)} or leave density_final unset"
        )
    if kind != "block" and not group["reset_statistics"]:
        raise ValueError(
            f"density_final (in {where}) changes the size of the {kind} subspace at refreshes, "
            "but reset_statistics=False keeps the compact moments slot by slot (their shape "
            "would change); use reset_statistics=True (or moment_transfer='rotate' for "
            "projections) or leave density_final unset"
        )


def active_blocks(n: int, group: dict[str, Any], seed: int, k: int) -> frozenset[int]:
    """The active positions of a decaying block group of ``n`` tensors at refresh ``k``
    (static orders; see the module docstring)."""
    key = (n, group["density"], group["density_final"], group["density_decay_steps"],
           group["update_gap"], group["block_order"], seed)  # fmt: skip
    return _active(key, int(k))


@functools.lru_cache(maxsize=256)
def _active(key: tuple, k: int) -> frozenset[int]:
    n, rho0, final, steps, gap, order, seed = key
    group = dict(density=rho0, density_final=final, density_decay_steps=steps, update_gap=gap)
    rho = density_at(group, k)
    if order == "random":
        return BlockSchedule(n, rho, "random", seed).active(k)
    a = block_count(n, rho)
    start = _offset(key, k)  # the pointer after the earlier refreshes' counts
    if order == "ascending":
        return frozenset((start + j) % n for j in range(a))
    return frozenset((n - 1 - start - j) % n for j in range(a))  # descending


_POINTERS: dict[tuple, tuple[int, int]] = {}  # key -> (k, sum_{j < k} a_j): extended in place


def _offset(key: tuple, k: int) -> int:
    """sum_{j < k} a_j mod n, the earlier refreshes' counts summed one by one (continued from
    the last refresh asked, so a run adds one term per refresh; after the decay ends every
    term is the final count, added at once)."""
    n, rho0, final, steps, gap = key[:5]
    group = dict(density=rho0, density_final=final, density_decay_steps=steps, update_gap=gap)
    end = -(-steps // gap)  # the first refresh at rho_F
    j, total = _POINTERS.get(key, (0, 0))
    if j > k:
        j, total = 0, 0
    while j < min(k, end):
        total += block_count(n, density_at(group, j))
        j += 1
    if k > j:
        total += (k - j) * block_count(n, density_at(group, end))
        j = k
    _POINTERS[key] = (j, total)
    return total % max(n, 1)
