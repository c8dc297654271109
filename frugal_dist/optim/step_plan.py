"""The cached step plan: what a FRUGAL step does between two refreshes, built once.

Between refreshes every step does the same work with the same tensors: the same items (one per
parameter), the same kinds' routes into the same ``ApplyBatches``, the same selections and
state-full batches. Only the gradients (``zero_grad(set_to_none=True)`` makes new ones every
step), the step counters and the groups' lr / betas / eps / weight decay (schedulers change lr
every step) differ. ``StepPlan`` keeps the items of a full step and replays the phases on them:

    still valid?   same groups, parameters and hyper-parameters (except lr, betas, eps,
                   weight_decay), every parameter has a gradient of the planned dtype (C-level
                   maps, no per-parameter Python), the gradients the prepared launches read
                   still contiguous, no item refreshes this step (counted down from the build)
    gather         the current gradients, one ``map`` over the parameters in plan order; only
                   the items left to the generic phases (``rest``) get ``g`` and ``sf_t``
    stage          (Triton) the prepared launches' table (``optim.plan_launches``): one
                   ``data_ptr`` gather, the step's bias corrections, ONE pinned non-blocking
                   host-to-device copy of 8 B per table entry (64 B per AdamW / coordinate
                   tensor, 24 B per state-free tensor, 8 B per gradient for the inf/nan test)
    check          (nonfinite != "ignore") the fused inf/nan test (Triton: launched over the
                   staged table, no upload of its own), its one host sync -- after all
                   host-side planning, so the update kernels launch right after it; with
                   ``step(grad_norm=...)`` no test, the sync reads isfinite(grad_norm)
    counters       ``step`` / ``sf_step`` advanced without reads: at the build they become
                   0-dim views of one CPU buffer (``_share_counters``), one ``add_`` per step
    launch         the prepared launches (whole-tensor AdamW, columns / rows coordinates,
                   state-free updates): one Triton call each, no per-tensor work
    down / state / apply   the phases' cached batches for what is not prepared
                   (``phases.down_lists``, ``state_batches``, the residual of ``route_apply``;
                   projection batches hand over (B, ...) results, ``projection_batch.DIRECT``)
                   with the groups' current lr and decay

Host-to-device bytes per plan step: the one table copy (e.g. a LLaMA-1B block rho = 0.25 step,
219 tensors: at most 64 B x 219 + 8 B x 220 = 15.8 KB), plus what the generic phases upload for
the parts left to them; device-to-host: the 4 B inf/nan flag (its sync). The CPU torch path
(``kernels="auto"`` on the CPU) prepares nothing and runs the phases as before.

A skipped step (inf/nan) changes nothing: counters, state, parameters and the count of steps to
the next refresh stay as they were. Only replicated parameters are planned (no bound layout, no
``reduce_gradients`` / ``shard_state`` at world size > 1: such steps communicate per step) and
only when every parameter of every group has a gradient; the rest always takes the full path.
The plan lives in the ``StepCache`` (any ``invalidate()`` drops it) and keeps no gradient.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from frugal_dist.optim import phases
from frugal_dist.optim.clipping import COMPACT, FULL, PendingClip, clip_mode, scale_
from frugal_dist.optim.fast_apply import local_matrix
from frugal_dist.optim.nonfinite import FiniteCheck
from frugal_dist.optim.plan_launches import prepare
from frugal_dist.optim.projection_batch import STASH
from frugal_dist.optim.refresh_schedule import steps_until_refresh
from frugal_dist.optim.step_items import EXACT_COUNT, Item

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_PARAMS = operator.itemgetter("params")
PER_STEP_KEYS = frozenset({"params", "names", "lr", "betas", "eps", "weight_decay", "initial_lr"})
DONE, SKIPPED, STALE = "done", "skipped", "stale"


def _route_keys(group: dict[str, Any]) -> dict[str, Any]:
    """The group's options that decide items and routes (everything but the per-step ones)."""
    return {k: v for k, v in group.items() if k not in PER_STEP_KEYS}


def _options(ctx: phases.StepContext) -> tuple:
    return (ctx.rank, ctx.world, ctx.layout is None, ctx.reduced_here, ctx.sharded, ctx.fused,
            ctx.kernels, ctx.proj_qr_device, ctx.residual_comm)  # fmt: skip


class StepPlan:
    """A full step's items, batches and counters, replayed until the next refresh (module
    docstring). Build with ``StepPlan.build`` after a full step; ``run`` each later step."""

    def __init__(
        self, ctx: phases.StepContext, items: list[Item], routed: list[phases.GroupApply],
        left: int,
    ) -> None:  # fmt: skip
        self.left = left  # steady steps this plan may still take
        self.taken = 0  # steps taken since the build step
        self.options = _options(ctx)
        self.groups = list(ctx.param_groups)
        self.keys = [_route_keys(g) for g in self.groups]
        self.items = items
        self.params = [it.view.data for it in items]  # == the groups' params, in order
        self.names = [it.name for it in items]
        grads = [it.view.grad for it in items]
        self.grad_dtypes = [g.dtype for g in grads]
        preps = [_prep(it) for it in items]
        self.finite = FiniteCheck(grads, ctx.kernels)
        owned = [it for it in items if it.active and it.owner == ctx.rank]
        self.counter_buffer = _share_counters(items, owned)
        self.step_counters = [it.st["step"] for it in items]
        self.step_base = [int(t.item()) for t in self.step_counters]
        self.sf_counters = [it.st["sf_step"] for it in owned]
        self.sf_base = [it.sf_t for it in owned]
        self.counters_first = any(p.device.type == "cpu" for p in self.params)
        self.downs = phases.down_lists(ctx)
        self.states = phases.state_batches(ctx, items)
        busy = {id(it) for _, its in self.downs for it in its}
        busy.update(id(it) for its in self.states for it in its)
        # the Triton launches prepared once (tables uploaded once per step, before the sync)
        self.launches, self.routed, rest = prepare(
            items, routed, grads, [prep is None for prep in preps], self.finite, ctx.kernels,
            lambda it: id(it) in busy,
        )  # fmt: skip
        bound = None if self.launches is None else self.launches.finite_check
        self.check = self.finite if bound is None else bound
        # the items the generic phases still see: their g and sf_t are set per step
        position = {id(it): i for i, it in enumerate(items)}
        self.rest = rest
        self.pick_rest = _picker([position[id(it)] for it in rest], len(items))
        self.preps = [preps[position[id(it)]] for it in rest]
        self.plain = all(prep is None for prep in self.preps)
        rest_ids = {id(it) for it in rest}
        self.rest_owned = [(it, base) for it, base in zip(owned, self.sf_base)
                           if id(it) in rest_ids]  # fmt: skip
        launched = [] if self.launches is None else sorted(set(self.launches.grad_src.tolist()))
        self.pick_launched = _picker(launched, len(items)) if launched else None
        # the items whose temporaries the generic apply may leave (kernel_projs: released by
        # ``projection_batch.apply_batched``, or never set on its direct steps)
        batched = {id(it) for ga in self.routed for it in ga.batches.kernel_projs}
        self.temporaries = [it for it in rest if not it.fused and id(it) not in batched]
        # a pending clip (``optim.clipping``): the launches scale in registers; of the items
        # left to the generic phases, FULL ones get their gradient multiplied, COMPACT ones
        # their state phase's input
        modes = [clip_mode(it) for it in rest]
        full = [position[id(it)] for it, mode in zip(rest, modes) if mode == FULL]
        self.pick_clip = _picker(full, len(items)) if full else None
        self.clip_compact = COMPACT in modes
        self.batch_memo: dict = {}  # kernel batches of the lists above (``batches``)
        for it in items:  # the plan keeps no gradient (nor any temporary)
            it.view.grad = None
            it.g = None  # type: ignore[assignment]
            it.release()

    @staticmethod
    def build(
        ctx: phases.StepContext, items: list[Item], routed: list[phases.GroupApply]
    ) -> StepPlan | None:
        """A plan from the items of the full step that just ran and its routes (``routed``, as
        ``phases.route_apply`` made them in that step's apply phase), or None when its steps must
        take the full path (module docstring: layouts, per-step communication, parameters
        without a gradient, a refresh in this step or the next)."""
        if ctx.layout is not None or ctx.reduced_here or ctx.sharded or not items:
            return None
        if any(it.refresh or it.free_done for it in items):
            return None
        if len(items) != sum(len(g["params"]) for g in ctx.param_groups):
            return None
        left = None
        for it in items:
            done = int(it.st["step"].item())  # steps taken, this one included
            until = steps_until_refresh(it.group, it.st, done)  # steady steps before its refresh
            if done + max(until, it.group["update_gap"]) >= EXACT_COUNT:
                return None
            left = until if left is None else min(left, until)
        if not left:
            return None
        return StepPlan(ctx, items, routed, left)

    def valid(self, ctx: phases.StepContext) -> bool:
        """The groups, parameters, options and route-deciding hyper-parameters are the plan's,
        and the next step does not refresh."""
        if self.left <= 0 or _options(ctx) != self.options:
            return False
        groups = ctx.param_groups
        if len(groups) != len(self.groups) or not all(map(operator.is_, groups, self.groups)):
            return False
        if not all(_route_keys(g) == k for g, k in zip(groups, self.keys)):
            return False
        now = list(chain.from_iterable(map(_PARAMS, groups)))  # no Python frame per parameter
        return len(now) == len(self.params) and all(map(operator.is_, now, self.params))

    def run(
        self, ctx: phases.StepContext, nonfinite: str, grad_norm: Tensor | float | None = None,
        clip: PendingClip | None = None,
    ) -> str:  # fmt: skip
        """One steady step: ``DONE``, ``SKIPPED`` (inf/nan, nothing changed) or ``STALE``
        (nothing done; take the full path, which rebuilds the plan). ``grad_norm``: the
        verdict is its finiteness (the check kernel is not launched). ``clip``: the pending
        clip, applied where a scale-dependent rule reads the gradient (``optim.clipping``; on
        ``STALE`` the caller's full step applies it)."""
        if not self.valid(ctx):
            return STALE
        grads = list(map(_GRAD, self.params))
        try:
            if list(map(_DTYPE, grads)) != self.grad_dtypes:
                return STALE
        except AttributeError:  # a parameter without gradient
            return STALE
        launches = self.launches
        if self.pick_launched is not None and not all(
            map(Tensor.is_contiguous, self.pick_launched(grads))
        ):  # a gradient layout the prepared tables cannot read
            return STALE
        coef = None if clip is None else clip.coef
        if coef is not None and self.pick_clip is not None:  # before the float32 copies
            scale_(self.pick_clip(grads), coef)
        ctx.clip_compact = coef if self.clip_compact else None
        rest = self.pick_rest(grads)
        if self.plain:  # every item's g is its gradient
            for it, g in zip(self.rest, rest):
                it.g = g
        else:
            for it, g, prep in zip(self.rest, rest, self.preps):
                it.g = g if prep is None else prep(g)
        n = self.taken + 1
        ctx.batch_memo = self.batch_memo
        for it, base in self.rest_owned:
            it.sf_t = base + n
        if launches is not None:  # this step's pointers and counts: one table upload
            launches.stage(grads, n)
        # All host-side planning is done and nothing has changed yet: now the check and its
        # one sync; the update kernels launch right after it.
        if nonfinite != "ignore":
            try:
                ok = phases.check_finite(ctx, self.names, grads, nonfinite, self.check,
                                         grad_norm)  # fmt: skip
            except FloatingPointError:
                self._drop_gradients()
                raise
            if not ok:
                self._drop_gradients()
                return SKIPPED
        if self.counters_first:  # CPU fused AdamW reads the sf_step tensors
            self._advance(n)
        if launches is not None:
            launches.launch(coef)
        for kind, its in self.downs:
            kind.down(its, ctx)
        phases.run_state(ctx, self.states)
        phases.run_apply(ctx, self.routed)
        if not self.counters_first:  # CUDA kernels take host counts: write them while they run
            self._advance(n)
        self.taken = n
        self.left -= 1
        self._drop_gradients()
        return DONE

    def _advance(self, n: int) -> None:
        """``step`` and ``sf_step`` counters to their values after plan step ``n`` (the same
        float32 values as ``+= 1`` each step: integers below 2**24 are exact)."""
        if self.counter_buffer is not None:  # every counter is a view of it: one add
            self.counter_buffer.add_(1.0)  # holds the values after step n - 1 (none skipped)
            return
        for t, base in zip(self.step_counters, self.step_base):
            t.fill_(base + n)
        for t, base in zip(self.sf_counters, self.sf_base):
            t.fill_(base + n)

    def _drop_gradients(self) -> None:
        self.batch_memo.pop(STASH, None)  # any batch results a phase left (none normally)
        for it in self.rest:
            it.g = None  # type: ignore[assignment]
        for it in self.temporaries:
            it.release()


def _share_counters(items: list[Item], owned: list[Item]) -> torch.Tensor | None:
    """Rebind every item's ``step`` and every owned item's ``sf_step`` counter to a 0-dim view
    of one float32 CPU buffer holding their current values (the state then holds views of one
    buffer, as the fp32 projection bases do), so that ``_advance`` is one ``add_``; returns the
    buffer, or None (counters left as they are) unless every counter is a 0-dim float32 CPU
    tensor in a plain state dict."""
    slots = [(it.st, "step") for it in items] + [(it.st, "sf_step") for it in owned]
    for st, key in slots:
        t = st[key]
        if type(st) is not dict or t.dim() or t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    buf = torch.stack([st[key] for st, key in slots])  # exact: the same float32 values
    for (st, key), view in zip(slots, buf.unbind(0)):
        st[key] = view
    return buf


def _picker(positions: list[int], n: int) -> Callable[[list], list]:
    """``xs -> [xs[i] for i in positions]`` as one C-level call (``xs`` itself when
    ``positions`` is every index in order)."""
    if positions == list(range(n)):
        return lambda xs: xs
    if not positions:
        return lambda xs: []
    if len(positions) == 1:
        i = positions[0]
        return lambda xs: [xs[i]]
    return operator.itemgetter(*positions)


def _prep(it: Item):
    """How the item's ``g`` is made from the parameter's gradient (None: the gradient itself),
    as the plan phase made it: float32 copy of a 16-bit gradient, the (m, n) matrix view."""
    grad = it.view.grad
    if it.g is grad:
        return None
    view = it.view
    to_float = it.g.dtype != grad.dtype
    if it.kind.matrix_grad:
        return lambda g: local_matrix(view, g.float() if to_float else g)
    return lambda g: g.float()
