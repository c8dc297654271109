"""First-step agreement of ``FRUGAL``'s ranks (the schedule's "first step only" rows).

Once, and again after a new group, a bound layout or loaded state (``StepCache.invalidate``),
before the step's first collective:

* ``check_agreement=True``: every rank compares the optimizer's options, the groups'
  hyper-parameters and parameter names (+ shapes): one all-gather of an int64 digest when they
  agree, the full descriptions only when they differ, and a mismatch raises on every rank naming
  the field (``comm.preflight.check_optimizer_agreement``);
* ``check_agreement=False``: an optimizer whose steps communicate (``issues_collectives``)
  probes (all-reduce of 4 B) that every rank of its group is here (``comm.participants.probe``).

Both are bounded in time (``comm.participants``) and counted under ``agreement_check``; nothing
at world size 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from frugal_dist.comm.participants import probe
from frugal_dist.comm.preflight import check_optimizer_agreement
from frugal_dist.optim.engine_hooks import logical_shape
from frugal_dist.optim.kinds import kind_for

if TYPE_CHECKING:
    from frugal_dist.optim.phases import StepContext


def check_once(ctx: StepContext) -> None:
    """The agreement check of the module docstring, unless ``ctx.cache.agreed``; sets it."""
    if ctx.agreement_world == 1 or ctx.cache.agreed:
        return
    if ctx.check_agreement:
        check_optimizer_agreement(ctx.optimizer, ctx.agreement_pg, ctx.comm,
                                  shape_of=logical_shape)  # fmt: skip
    elif issues_collectives(ctx):
        probe(ctx.agreement_pg, "first step (check_agreement=False)", ctx.comm)
    ctx.cache.agreed = True


def issues_collectives(ctx: StepContext) -> bool:
    """Whether steps communicate at world size > 1 beyond the agreement checks: a layout,
    FRUGAL's own reduction or state sharding, or a kind handing data over between ranks (svd
    bases computed by their owner)."""
    return (
        ctx.layout is not None
        or ctx.reduce_gradients
        or ctx.shard_state
        or any(kind_for(g).hands_over(g) for g in ctx.param_groups)
    )
