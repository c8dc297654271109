"""The interface every subspace kind implements, and the defaults most kinds share.

A kind is a stateless object (one instance per kind); everything per parameter is in the step's
``Item``, everything cached between steps in the optimizer's ``StepCache``. The phases
(``optim.phases``) call these methods in order:

    plan      plan_group()                          group-level choices from the gradients, before
                                                    the items exist (block gradnorm)
              owner(), is_active(), prepare_group() selection, state resets, float32 gradient
                                                    (default: prepare() per item)
    reduce    sign_parts()                          what residual_comm="sign" sends
    select    select()                              svd refresh (projection), fingerprint()
    down      down()                                G_sf; fragments' partial sums (projection)
    state     rule(), state_batched()               the state-full rule (phase-generic); the
                                                    items a kind runs in its own kernels
    exchange  compact_shape()                       shape of U for owners' broadcasts
    apply     route(), apply_one()                  a place in a batched apply, or the item's
                                                    own update (after the group's decay)

plus, outside the step: check_group() (when a group is added: what the kind cannot honour),
expected_state_bytes() (shard_state's ownership weights), state_role()
(checkpoint consolidation) and current_selection() (checkpoints, aux bytes).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.core.rules import state_full_keys
from frugal_dist.optim.ownership import state_owner
from frugal_dist.optim.step_items import Item, reset_buffers

if TYPE_CHECKING:
    from frugal_dist.layouts.base import ParamView
    from frugal_dist.optim.phases import ApplyBatches, StepContext


class SubspaceKind(ABC):
    """Base of the subspace kinds (see the module docstring for when each method runs)."""

    name = "?"
    matrix_grad = False  # Item.g is the padded local (rows, n) matrix, not the local values
    has_basis = False  # the compact state lives in a basis (moment_transfer="rotate" applies)

    # ------------------------------------------------------------------ sizes and roles
    def rule(self, group: dict[str, Any]) -> str:
        """The state-full rule of the group's split parameters."""
        return group["state_full"]

    def free_rule(self, group: dict[str, Any]) -> str:
        """The state-free rule applied where the state-full part does not reach."""
        return group["state_free"]

    @abstractmethod
    def state_numel(self, shape: tuple[int, ...], group: dict[str, Any], k: int = 0) -> int:
        """Entries of the state-full subspace of a parameter of ``shape`` (0: no state) at
        refresh ``k`` (the density may decay, ``optim.density_schedule``: refresh 0 is the
        largest)."""

    def expected_state_bytes(self, shape: tuple[int, ...], group: dict[str, Any]) -> int:
        """Float32 state-full bytes (#buffers of the rule x 4 B x state_numel), at refresh 0:
        the largest when the density decays (``shard_state``'s static weights)."""
        n = self.state_numel(shape, group)
        return 0 if n == 0 else 4 * len(state_full_keys(self.rule(group))) * n

    def compact_shape(self, it: Item) -> tuple[int, ...]:
        """Shape of G_sf, U and the state-full buffers of this item on this rank."""
        return tuple(it.view.data.shape)

    def state_role(self, group: dict[str, Any], shape: tuple[int, ...], key: str) -> str:
        """How a non-counter state tensor maps to the full parameter (``optim.consolidate``):
        ``param`` (shaped like the parameter), ``coordinate`` (compact rows of a coordinate
        set), ``right`` (one row per parameter row), ``replicated`` (the same on every rank)."""
        return "param"

    def current_selection(
        self, view: ParamView, group: dict[str, Any], k: int, ctx: StepContext
    ) -> Any:
        """The global selection at refresh ``k`` that a checkpoint needs (coordinates only)."""
        return None

    def check_group(self, group: dict[str, Any], where: str) -> None:
        """Refuse, with a ``ValueError`` naming the parameter or option and the fix, a group
        (defaults filled in) whose parameters this kind cannot step: orientation-dependent
        choices on (in, out)-stored weights (``param_groups.refuse_in_out``), shapes the kind
        needs. Called by ``FRUGAL.add_param_group``. Default: nothing to refuse."""
        return

    def row_aligned_state(self, group: dict[str, Any]) -> bool:
        """Whether a fragment's compact state is the state of the rows it holds, for every
        refresh (so a sharded layout keeps each slot on one rank and reshards it by rows).
        Default: yes."""
        return True

    # ------------------------------------------------------------------ plan
    def plan_group(
        self, ctx: StepContext, group: dict[str, Any], views: list[ParamView],
        clocks: list[tuple[int, bool]],
    ) -> None:  # fmt: skip
        """Before ``owner`` / ``is_active`` are asked: choices of the whole group that need this
        step's gradients (``views``: every view of the group; ``clocks``: (refresh index,
        refreshes now) of each view with a gradient, ``optim.refresh_schedule``). May
        communicate (every rank calls it for the same groups in the same order). Default:
        nothing."""
        return

    def owner(self, ctx: StepContext, group: dict[str, Any], index: int, name: str, k: int) -> int:
        """Rank that keeps the state-full buffers of parameter ``index`` (``name``) of ``group``
        during refresh ``k`` and computes its U (asked only under ``shard_state``: otherwise
        every rank owns everything)."""
        return state_owner(ctx, name)

    def is_active(self, ctx: StepContext, group: dict[str, Any], view: ParamView, k: int) -> bool:
        """Whether the parameter has a state-full part during refresh ``k``."""
        return True

    def fuses(self, it: Item, ctx: StepContext) -> bool:
        """The item's state phase runs inside its apply kernel (``fast_apply.run_fused``);
        asked for active items on their owner."""
        return False

    def lr_scale(self, group: dict[str, Any]) -> float:
        """Factor of lr for the state-full update (``proj_params_lr_scale`` for split params)."""
        return group["proj_params_lr_scale"]

    def hands_over(self, group: dict[str, Any]) -> bool:
        """Steps of this group send data between ranks even for replicated parameters without
        ``reduce_gradients`` / ``shard_state`` (svd bases from their owner)."""
        return False

    def prepare_group(self, its: list[Item], ctx: StepContext) -> None:
        """Plan-phase work on all items of one group (the same items, in the same order, on
        every rank), for work batched over the group (projection: the on-device random bases of
        a refresh). Default: ``prepare`` per item."""
        for it in its:
            self.prepare(it, ctx)

    def prepare(self, it: Item, ctx: StepContext) -> None:
        """Plan-phase work after the item exists: selections, resets of the state buffers.
        Default: none (nothing to select)."""
        return

    def reset_at_refresh(self, it: Item, ctx: StepContext) -> None:
        """At a refresh, the owner starts the compact buffers afresh (``reset_statistics``, or
        no buffers yet); with ``reset_statistics=False`` existing ones are kept."""
        if not (it.refresh and it.owner == ctx.rank):
            return
        if it.group["reset_statistics"] or "sf_step" not in it.st:
            reset_buffers(it.st, self.rule(it.group), self.compact_shape(it), it.view.data.device)

    # ------------------------------------------------------------------ reduce (sign comm)
    def sign_parts(self, it: Item) -> tuple[Tensor | None, Tensor | None] | None:
        """For ``residual_comm="sign"``: None if the item needs its full gradient reduced, else
        (compact gradient to mean-reduce or None, tensor whose signs are voted on or None)."""
        return None

    def whole_vote_scale(self, it: Item) -> tuple[float, float] | None:
        """(s_p, s_i) when the item's whole update is W <- W (1 - lr wd) - (lr s_p) s_i F(R)
        with R the voted tensor of ``sign_parts``, element for element the parameter's data
        (so ``kernels.vote_apply`` may apply the packed vote directly); None otherwise (the
        float32 vote and ``apply_one``). Default: None."""
        return None

    # ------------------------------------------------------------------ select / down
    def select(self, its: list[Item], ctx: StepContext) -> None:
        """Selections that need the (reduced) gradient: the svd refresh. Default: none."""
        return

    def fingerprint(self, it: Item) -> int | None:
        """An int64 digest of the item's subspace at a refresh (None: nothing to compare)."""
        return None

    def down(self, its: list[Item], ctx: StepContext) -> None:
        """G_sf = down(G) for the active items (``it.g_sf`` may be set already by ``reduce``)."""
        for it in its:
            if it.g_sf is None and it.active:
                it.g_sf = it.g

    # ------------------------------------------------------------------ state
    def state_batched(
        self, its: list[Item], ctx: StepContext, clip: Tensor | None = None
    ) -> set[int]:
        """Compute U for the items of one group this kind batches in its own kernels; return
        their ids (the state phase runs ``core.rules`` on the others). Default: none.
        ``clip``: the rule reads c G_sf (a pending clip's coefficient, ``optim.clipping``)."""
        return set()

    # ------------------------------------------------------------------ apply
    @abstractmethod
    def free_direction(self, it: Item) -> Tensor | None:
        """F(R) of one item (a new full-size tensor, or None for ``none``)."""

    def route(self, it: Item, ctx: StepContext, batches: ApplyBatches) -> None:
        """Queue the (non-fused) item in one of ``batches``' lists: a batched apply, or
        ``rest`` (``apply_one`` after the group's weight decay). Default: ``rest``."""
        batches.rest.append(it)

    @abstractmethod
    def apply_one(self, it: Item, ctx: StepContext) -> None:
        """The item's own update W += -lr (...) (weight decay already applied)."""

    # ------------------------------------------------------------------ free_scale="matched"
    def matched_sizes(self, it: Item) -> tuple[int, int]:
        """(N_U, N_F): global entries of the state-full direction U and of the entries the
        state-free step touches (``optim.free_scale``). Only kinds that support
        ``free_scale="matched"`` implement it (validation refuses the others)."""
        raise NotImplementedError(f"free_scale='matched' is not supported for {self.name}")

    def update_sumsq(self, it: Item, ctx: StepContext) -> Tensor:
        """This rank's share of sum U^2, each global entry counted on one rank only."""
        raise NotImplementedError(f"free_scale='matched' is not supported for {self.name}")

    def free_sumsq(self, it: Item, free: Tensor) -> Tensor:
        """This rank's sum F^2 over the state-free entries of its fragment (``free``: F on the
        local matrix; may be modified in place where it is overwritten later anyway)."""
        raise NotImplementedError(f"free_scale='matched' is not supported for {self.name}")

    def gemm_context(self, group: dict[str, Any], device: Any) -> Any:
        """Context for this kind's per-item GEMMs (projection: ``proj_precision`` on CUDA)."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"<subspace kind {self.name}>"


def fused_adamw_ok(it: Item, ctx: StepContext) -> bool:
    """Whole-tensor AdamW through ``fast_apply.run_fused`` (Triton on CUDA, or
    ``torch._fused_adamw_``): not under ``shard_state``, float32 data and gradient (one dtype
    for params, grads and moments), non-empty, and ``fused=True`` or (``fused=None`` and a CUDA
    tensor or ``kernels="triton"``)."""
    view = it.view
    if ctx.sharded or ctx.fused is False or view.data.numel() == 0:
        return False
    if view.data.dtype != torch.float32 or view.grad.dtype != torch.float32:
        return False
    return bool(ctx.fused) or view.data.device.type == "cuda" or ctx.kernels == "triton"
