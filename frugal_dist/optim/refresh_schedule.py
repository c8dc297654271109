"""``refresh_policy``: when a FRUGAL group re-chooses its subspaces (the refresh interval T).

``"fixed"`` (the default; the paper): refresh k is taken at the step t = k T0 of each parameter,
T0 = ``update_gap``.

``"loss"``: T is driven by the training loss (issue 19; AdaFRUGAL, arXiv 2601.11568, proposes
"a loss-aware schedule for T", but its rule could not be found in any public text this project
could read -- only the abstract -- so the rule below is THIS PROJECT'S OWN, not the paper's).
The caller reports the loss of every step with ``FRUGAL.observe_loss(loss)``. With
T0 = ``update_gap``, T_max = ``update_gap_max`` (None: 8 T0) and tau = ``refresh_threshold``
(None: 0.01), every parameter keeps, since its last refresh at step t_j (T_j = t_{j+1} - t_j):

    S_j = sum of the finite losses observed,  n_j = how many
    refresh j+1 is taken at t_{j+1} = t_j + T_j (T_0 = T0); there, with the interval's mean
    loss L_j = S_j / n_j and the previous interval's L_{j-1} (none after refresh 0):

        gain = (L_{j-1} - L_j) / max(|L_{j-1}|, 1e-12) * T0 / ((T_{j-1} + T_j) / 2)
        T_{j+1} = min(2 T_j, T_max)   if gain < tau   (progress slowed: refresh less often)
                  T_j                 otherwise

i.e. the relative improvement of the mean loss between two consecutive intervals, per T0 steps,
against tau; T never shrinks (T0, 2 T0, 4 T0, ... up to T_max). The refresh index k counts the
refreshes taken (0, 1, 2, ...), so the subspace of refresh k is still a pure function of
(seed, name, k) (and of the gradient for ``svd``); only the steps at which refreshes happen
depend on the loss. A refresh due with no loss observed since the last one (``n_j = 0``: the
caller never calls ``observe_loss``) raises a ``ValueError`` instead of silently keeping T.
Non-finite losses are not counted (a skipped inf/nan step).

Every rank must take the same decisions. The value observed must be the same on every rank:
the train loop passes the loss it already all-reduces for its log (the global mean over ranks
and micro-batches), so the policy adds no collective and 0 bytes per step; the decision at a
refresh is folded into that refresh's subspace fingerprint (``fold_fingerprint``), which the
ranks compare anyway (``check_agreement``: the all-gather of 8 B per refreshing parameter), so
ranks fed different losses fail at the refresh where they decide differently, before they could
wait for each other at different steps. Across world sizes the global mean loss agrees up to
floating-point reduction order; a decision flips only if the gain lies within that rounding of
tau.

State: per parameter, float64 scalars on the CPU (``SCHEDULE_KEYS``, 56 B; the same on every
rank that holds the parameter, checkpointed and resharded like the step counters): ``refresh_k``
(index of the current refresh), ``refresh_next`` (the step count of the next refresh),
``refresh_gap`` (T_j), ``loss_sum`` / ``loss_count`` (S_j, n_j), ``loss_prev`` /
``loss_prev_gap`` (L_{j-1}, T_{j-1}; NaN / 0 before the first decision). A parameter that has
steps but no schedule state (a checkpoint of a fixed run) starts from the fixed schedule's
position. ``observe_loss`` adds to every held parameter's S and n (two ``_foreach_add_`` over
CPU scalars); nothing else runs between refreshes.

Not combinable (``check_refresh_policy``): ``density_final`` (the decay sizes refresh k from
its step k T0, which a loss-driven T no longer gives).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

REFRESH_POLICIES = ("fixed", "loss")
DEFAULT_GAP_FACTOR = 8  # update_gap_max=None: T_max = 8 T0
DEFAULT_THRESHOLD = 0.01  # refresh_threshold=None
GROWTH = 2  # T_{j+1} = GROWTH T_j when the gain is below the threshold
SCHEDULE_KEYS = ("refresh_k", "refresh_next", "refresh_gap", "loss_sum", "loss_count",
                 "loss_prev", "loss_prev_gap")  # fmt: skip


def follows_loss(group: dict[str, Any]) -> bool:
    """The group's refreshes follow the loss (``refresh_policy="loss"``, FRUGAL groups)."""
    return group.get("refresh_policy", "fixed") == "loss" and group["algorithm"] == "frugal"


def gap_max(group: dict[str, Any]) -> int:
    """T_max: ``update_gap_max``, or 8 T0."""
    cap = group.get("update_gap_max")
    return DEFAULT_GAP_FACTOR * group["update_gap"] if cap is None else int(cap)


def threshold(group: dict[str, Any]) -> float:
    """tau: ``refresh_threshold``, or 0.01."""
    tau = group.get("refresh_threshold")
    return DEFAULT_THRESHOLD if tau is None else float(tau)


def check_refresh_policy(group: dict[str, Any], where: str) -> None:
    """With the defaults filled in: refuse (``ValueError`` naming the field and the fix) the
    loss policy's options under the fixed policy, ``update_gap_max`` below ``update_gap``, and
    the combination with ``density_final``."""
    policy = group.get("refresh_policy", "fixed")
    if policy == "fixed":
        for key in ("update_gap_max", "refresh_threshold"):
            if group.get(key) is not None:
                raise ValueError(
                    f"{key}={group[key]!r} (in {where}) is an option of refresh_policy='loss', "
                    "but this group has refresh_policy='fixed' (refreshes every update_gap "
                    f"steps); set refresh_policy='loss' or leave {key} unset"
                )
        return
    cap = group.get("update_gap_max")
    if cap is not None and cap < group["update_gap"]:
        raise ValueError(
            f"update_gap_max={cap!r} (in {where}) must be >= update_gap="
            f"{group['update_gap']!r}: the loss-driven interval grows from update_gap up to "
            "update_gap_max; raise update_gap_max or leave it unset (8 x update_gap)"
        )
    if group["algorithm"] == "frugal" and group.get("density_final") is not None:
        raise ValueError(
            f"refresh_policy='loss' (in {where}) cannot be combined with density_final: the "
            "decaying density sizes refresh k from its step k x update_gap, which a "
            "loss-driven interval does not give; leave density_final unset or use "
            "refresh_policy='fixed'"
        )


# ------------------------------------------------------------------------------ the step
def _init(st: Any, s: int, t0: int) -> None:
    """Schedule state of a parameter that took ``s`` steps without one: the fixed schedule's
    position (s = 0: refresh 0 is due now)."""
    k = (s - 1) // t0  # -1 at s = 0
    values = {"refresh_k": k, "refresh_next": (k + 1) * t0, "refresh_gap": t0, "loss_sum": 0.0,
              "loss_count": 0.0, "loss_prev": math.nan, "loss_prev_gap": 0.0}  # fmt: skip
    for key, v in values.items():
        st[key] = torch.tensor(float(v), dtype=torch.float64)


def check_observed(group: dict[str, Any], states: list[Any], names: list[str]) -> None:
    """Before the step counters move: a refresh due at this step needs a loss observed since
    the last one (``ValueError`` naming the parameter and the fix otherwise)."""
    for st, name in zip(states, names):
        if "refresh_next" not in st:
            continue
        s = int(st["step"].item()) if "step" in st else 0
        due = s == int(st["refresh_next"].item()) and int(st["refresh_k"].item()) >= 0
        if due and st["loss_count"].item() == 0:
            raise ValueError(
                f"refresh_policy='loss' (param group {group.get('name', 'unnamed')!r}): "
                f"parameter {name!r} is due to refresh at step {s} but no loss was observed "
                "since its last refresh. Call FRUGAL.observe_loss(loss) after every step with "
                "the loss averaged over all ranks (launchers/train.py does), or use "
                "refresh_policy='fixed'"
            )


def clocks(
    group: dict[str, Any], states: list[Any], steps: list[int]
) -> tuple[list[tuple[int, bool]], bool]:
    """(refresh index k, refresh now) of each state's step (``steps``: the steps each took
    before this one), and whether schedule state was created (the ``observe_loss`` slots must
    then be gathered again). ``"loss"``: takes the decisions of the module docstring at the
    refreshes (the schedule state updated in place)."""
    t0 = group["update_gap"]
    if not follows_loss(group):
        return [(s // t0, s % t0 == 0) for s in steps], False
    out = []
    created = False
    for st, s in zip(states, steps):
        if "refresh_next" not in st:
            _init(st, s, t0)
            created = True
        nxt = int(st["refresh_next"].item())
        k = int(st["refresh_k"].item())
        if s != nxt:
            out.append((k, False))
            continue
        gap = int(st["refresh_gap"].item())
        if k >= 0 and st["loss_count"].item() > 0:  # an interval ended: T for the next one
            gap = _decide(st, group, gap)  # (no count: state just made from a fixed run's)
        _put(st, "refresh_k", k + 1)
        _put(st, "refresh_next", s + gap)
        _put(st, "refresh_gap", gap)
        out.append((k + 1, True))
    return out, created


def _decide(st: Any, group: dict[str, Any], gap: int) -> int:
    """T_{j+1} from the interval that just ended (module docstring); moves L_j into L_{j-1}
    and restarts S, n."""
    t0 = group["update_gap"]
    mean = st["loss_sum"].item() / st["loss_count"].item()
    prev, prev_gap = st["loss_prev"].item(), st["loss_prev_gap"].item()
    new = gap
    if not math.isnan(prev):
        gain = (prev - mean) / max(abs(prev), 1e-12) * t0 / ((prev_gap + gap) / 2)
        if gain < threshold(group):
            new = min(GROWTH * gap, gap_max(group))
    _put(st, "loss_prev", mean)
    _put(st, "loss_prev_gap", gap)
    _put(st, "loss_sum", 0.0)
    _put(st, "loss_count", 0.0)
    return new


def _put(st: Any, key: str, value: float) -> None:
    """``st[key] = value`` in place (the ``observe_loss`` slots keep the same tensors); a
    layout's state view (not a plain dict) gets the tensor stored back, as ``+=`` does."""
    t = st[key]
    t.fill_(value)
    if type(st) is not dict:
        st[key] = t


def refresh_of_last_step(group: dict[str, Any], st: Any) -> int:
    """The refresh index the state refers to (that of the parameter's last step)."""
    if follows_loss(group) and "refresh_k" in st:
        return max(int(st["refresh_k"].item()), 0)
    done = int(st["step"].item()) if "step" in st else 0
    return max(done - 1, 0) // group["update_gap"]


def steps_until_refresh(group: dict[str, Any], st: Any, done: int) -> int:
    """Steps after this one (``done`` steps taken, this one included) before the next refresh:
    0 when the next step refreshes."""
    if follows_loss(group) and "refresh_next" in st:
        return int(st["refresh_next"].item()) - done
    gap = group["update_gap"]
    return (gap - done % gap) % gap


def fold_fingerprint(group: dict[str, Any], st: Any, fp: int | None) -> int | None:
    """A refresh's subspace fingerprint with the loss policy's decision (the next refresh
    step) folded in, so ranks that decided differently fail the refresh-time comparison."""
    if fp is None or not follows_loss(group) or "refresh_next" not in st:
        return fp
    mixed = (fp * 0x9E3779B97F4A7C15 + int(st["refresh_next"].item())) & 0xFFFFFFFFFFFFFFFF
    return mixed - (1 << 64) if mixed >= 1 << 63 else mixed


# ------------------------------------------------------------------------------ observe_loss
def loss_slots(states: Iterable[Any]) -> tuple[list[Tensor], list[Tensor]]:
    """The (S, n) tensors of every state that has schedule state."""
    sums, counts = [], []
    for st in states:
        if "loss_sum" in st:
            sums.append(st["loss_sum"])
            counts.append(st["loss_count"])
    return sums, counts


def observe(slots: tuple[list[Tensor], list[Tensor]], loss: float) -> None:
    """S += loss, n += 1 on every slot; a non-finite loss is not counted."""
    if not math.isfinite(loss) or not slots[0]:
        return
    torch._foreach_add_(slots[0], loss)
    torch._foreach_add_(slots[1], 1.0)
