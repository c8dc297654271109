"""Non-finite gradient handling for ``FRUGAL`` (option ``nonfinite``).

Before a step touches any state, every local gradient (whole tensors, or this rank's fragments
under a layout) is checked for inf/nan, then one scalar flag is read (the host sync):

* Triton (``kernels`` "auto" on CUDA, "triton"; ``kernels.finite.NonfiniteTest``): one launch
  per gradient dtype sets an int32 device flag, reading each gradient byte once (4 B per float32
  element) plus an 8 B-per-tensor pointer table; ``FiniteCheck`` keeps its tile maps. A step
  plan's check launches over the plan's own table (``FiniteCheck.bound``: the pointers are part
  of the plan's one upload per step, ``optim.plan_launches``), so it does no per-tensor Python.
* torch (the CPU, ``kernels="torch"``, other dtypes, strided gradients): one
  ``torch._foreach_norm(grads, inf)`` per (device, dtype) (the max-abs norm never overflows and
  propagates nan), then the norms compared with inf.

Both decide alike: a step is non-finite when any element is inf or nan. Distributed: where
gradients differ per rank (an engine layout's fragments, or
``reduce_gradients=True``) the flag is all-reduced (MAX) over the optimizer's process group, so
every rank takes the same decision even when only one rank's fragment holds the bad value;
replicated gradients (DDP-reduced, or an optimizer on one rank) are checked locally, with no
collective (the caller passes ``world=1``).

* ``"skip"`` (default): a non-finite step is skipped entirely (parameters, buffers and step
  counters untouched) and ``skipped_steps`` is incremented.
* ``"raise"``: ``FloatingPointError`` naming the first offending parameter (in model order; on
  another rank: said so).
* ``"ignore"``: no check at all (no sync, no collective).

Cost: one device->host sync per step (reading the flag) plus, for per-rank gradients at world
size > 1, one all-reduce of 4 B per rank (counted in ``comm_stats()`` under ``nonfinite_flag``:
payload 4 B, wire 2 (W-1)/W x 4 B; nothing at world size 1 or for replicated gradients).
``"raise"`` finds the parameter's name with the torch path (one more sync), only on the failing
step.

The verdict from the caller's norm (``FRUGAL.step(grad_norm=...)``, ``check_grad_norm``): a
training loop that clips first already holds the total norm of the gradients
(``torch.nn.utils.clip_grad_norm_``, FSDP's ``clip_grad_norm_``, ``OSS.clip_grad_norm``), and
that norm is inf/nan whenever any element is. Given it, no gradient is read and no flag is
all-reduced: the verdict is ``isfinite(grad_norm)``, one 4 B device->host read (none for a
Python float). A step is then non-finite exactly when its norm is, so:

* an all-finite gradient whose norm overflows float32 (elements around 1e19: their squares sum
  past 3.4e38) counts as non-finite: "skip" skips it, "raise" raises (without ``grad_norm``
  such a step is taken);
* the norm must be the TOTAL norm over the same gradients the step reads, global over the
  ranks whose gradients differ (every engine's clip returns it so; not a norm of the local,
  unreduced gradients under ``reduce_gradients=True``). A norm of other gradients is the
  caller's error: the step cannot detect it, and ranks given different verdicts diverge.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from frugal_dist.comm.collectives import any_rank_flag
from frugal_dist.comm.stats import CommStats
from frugal_dist.kernels.finite import NonfiniteTest

NONFINITE_MODES = ("skip", "raise", "ignore")
FLAG_KEY = "nonfinite_flag"  # the flag all-reduce's key in ``comm_stats()``


def validate_nonfinite(mode: Any) -> str:
    if mode not in NONFINITE_MODES:
        raise ValueError(
            f"nonfinite must be one of {list(NONFINITE_MODES)}, got {mode!r}: 'skip' skips a step "
            "whose gradients hold inf/nan, 'raise' raises, 'ignore' does not check"
        )
    return str(mode)


def check_grad_norm(
    grad_norm: Any, closure: Any = None, mode: str = "skip"
) -> Tensor | float | None:
    """``FRUGAL.step``'s ``grad_norm`` checked: None, a Python float (an int is taken as one),
    or a 0-d floating-point tensor on any device (a DTensor must be replicated: its local
    tensor is returned). Host-only checks, no sync. TypeError / ValueError name the argument.
    Returns None under ``mode="ignore"`` (no verdict is taken; the argument is still checked)."""
    if grad_norm is None:
        return None
    checked = _checked_norm(grad_norm, closure)
    return None if mode == "ignore" else checked


def _checked_norm(grad_norm: Any, closure: Any) -> Tensor | float:
    if closure is not None:
        raise ValueError(
            "FRUGAL.step: grad_norm with a closure: the closure recomputes the gradients, so a "
            "norm computed before the step is not theirs; clip inside the closure and step "
            "without grad_norm, or compute the gradients and their norm before step()"
        )
    if isinstance(grad_norm, numbers.Real) and not isinstance(grad_norm, bool):
        return float(grad_norm)
    if not isinstance(grad_norm, Tensor):
        raise TypeError(
            "FRUGAL.step: grad_norm must be the total gradient norm as a 0-d tensor or a Python "
            f"float (what clip_grad_norm_ returns), got {type(grad_norm).__name__}"
        )
    placements = getattr(grad_norm, "placements", None)
    if placements is not None:  # a DTensor (FSDP2's clip_grad_norm_ returns one)
        if not all(p.is_replicate() for p in placements):
            raise ValueError(
                f"FRUGAL.step: grad_norm is a DTensor with placements {tuple(placements)}: its "
                "local value is not the total norm; pass grad_norm.full_tensor()"
            )
        grad_norm = grad_norm.to_local()
    if grad_norm.dim() != 0 or not grad_norm.is_floating_point():
        raise ValueError(
            "FRUGAL.step: grad_norm must be a 0-d floating-point tensor (the total norm), got "
            f"shape {tuple(grad_norm.shape)} dtype {grad_norm.dtype}"
        )
    return grad_norm


def norm_is_finite(grad_norm: Tensor | float) -> bool:
    """The step's verdict from a checked ``grad_norm``: one 4 B device->host read for a tensor
    (the host sync), none for a float. No collective: the norm is already global."""
    if isinstance(grad_norm, float):
        return math.isfinite(grad_norm)
    return bool(torch.isfinite(grad_norm).item())


def first_bad_local(names: list[str], grads: list[Tensor | None]) -> str | None:
    """The first local name holding inf/nan (torch path, one sync per bucket; None: none
    here). For ``"raise"`` with ``grad_norm``, on the failing step only."""
    return _first_bad(names, grads, max_abs_norms(grads, grad_buckets(grads)))  # type: ignore[arg-type]


def _flag_device(pg: Any, first: Tensor | None) -> torch.device:
    if dist.is_available() and dist.is_initialized():
        if "nccl" in str(dist.get_backend(pg)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return first.device if first is not None else torch.device("cpu")


def grad_buckets(grads: list[Tensor | None]) -> list[list[int]]:
    """Positions in ``grads`` of the non-empty gradients, one list per (device, dtype) in order
    of first appearance (a step plan caches it: ``optim.step_plan``)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        if g is not None and g.numel():
            buckets.setdefault((g.device, g.dtype), []).append(i)
    return list(buckets.values())


def max_abs_norms(grads: list[Tensor], buckets: list[list[int]]) -> list[tuple[list[int], Tensor]]:
    """Per bucket: its positions in ``grads`` and the stacked inf-norms."""
    out = []
    for idx in buckets:
        norms = torch._foreach_norm([grads[i] for i in idx], float("inf"))
        out.append((idx, torch.stack(list(norms))))
    return out


class FiniteCheck:
    """The check's fixed arguments for gradients of given sizes, dtypes and devices: the
    positions of the non-empty ones per (device, dtype) (``grad_buckets``, the torch path's
    buckets) and the Triton test where ``kernels`` selects it (``kernels.finite``). Built on
    each full step; a step plan keeps its own until the next refresh."""

    def __init__(self, grads: list[Tensor | None], kernels: str = "auto") -> None:
        self.buckets = grad_buckets(grads)
        self.kernel: NonfiniteTest | BoundTest = NonfiniteTest(grads, kernels)

    def bound(self, run: Callable[[], Tensor]) -> FiniteCheck:
        """This check with its Triton test launched by ``run()`` (a step plan's launch over its
        own, already uploaded table: ``NonfiniteTest.bind``) instead of uploading a table per
        call; the torch path's buckets stay."""
        out = copy.copy(self)
        out.kernel = BoundTest(run)
        return out


class BoundTest:
    """A ``NonfiniteTest`` stand-in (``FiniteCheck.bound``): calling it runs the caller's
    launch and returns its int32 flag."""

    fast = True

    def __init__(self, run: Callable[[], Tensor]) -> None:
        self._run = run

    def __call__(self, grads: list[Tensor | None]) -> Tensor:
        return self._run()


def grads_are_finite(
    names: list[str], grads: list[Tensor | None], pg: Any, world: int,
    check: FiniteCheck | None = None, kernels: str = "auto", stats: CommStats | None = None,
) -> tuple[bool, str | None]:  # fmt: skip
    """(all finite on every rank, first local offending name or None). One host sync.
    ``check``: ``FiniteCheck(grads, kernels)``, when the caller has it cached. ``world`` > 1:
    the flag is all-reduced over ``pg`` (4 B, counted in ``stats`` under ``nonfinite_flag``;
    required then)."""
    if world > 1 and stats is None:
        raise ValueError(
            "grads_are_finite: world > 1 all-reduces the flag; pass the step's CommStats as "
            "stats (its 4 B are counted under 'nonfinite_flag')"
        )
    if check is None:
        check = FiniteCheck(grads, kernels)
    flag = check.kernel(grads) if check.kernel.fast else None
    if flag is not None:
        if world > 1:
            device = _flag_device(pg, flag)
            flag = any_rank_flag(flag.to(device=device, dtype=torch.float32), pg, stats, FLAG_KEY)
        if not flag.item():  # the one host sync of the check
            return True, None
        return False, _first_bad(names, grads, max_abs_norms(grads, check.buckets))
    buckets = check.buckets
    first_grad = grads[buckets[0][0]] if buckets else None
    device = _flag_device(pg, first_grad)
    norms = max_abs_norms(grads, buckets)  # type: ignore[arg-type]
    # Max-abs norms are >= 0 or nan, so "finite" is "< inf" (nan compares False): one op.
    if len(norms) == 1 and norms[0][1].device == device:
        all_norms = norms[0][1]
    elif norms:
        all_norms = torch.cat([s.to(device=device, dtype=torch.float32) for _, s in norms])
    else:
        all_norms = torch.zeros(0, dtype=torch.float32, device=device)
    ok = (all_norms < float("inf")).all()
    if world > 1:
        ok = any_rank_flag((~ok).to(torch.float32), pg, stats, FLAG_KEY) == 0.0
    if ok.item():  # the one host sync of the check
        return True, None
    return False, _first_bad(names, grads, norms)


def _first_bad(
    names: list[str], grads: list[Tensor | None], norms: list[tuple[list[int], Tensor]]
) -> str | None:
    """The first (model-order) name whose inf-norm is not finite; None: none here (another
    rank's). Failing steps only: one sync per bucket."""
    first = None
    for idx, stacked in norms:
        finite = torch.isfinite(stacked).tolist()
        for pos, ok in zip(idx, finite):
            if not ok and (first is None or pos < first):
                first = pos
    return None if first is None else names[first]
