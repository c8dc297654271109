"""``FRUGAL``: full-rank updates with gradient splitting (Zmushko et al., ICML 2025).

For a split parameter W with gradient G and state-full subspace S (re-chosen every ``update_gap``
= T steps from (seed, name, refresh index)):

    G_sf = down(G)                 U = StateFull(G_sf)            R = G - up(G_sf)
    W   <- W * (1 - lr * weight_decay)
    W   <- W - lr * s_p * up(U) - lr * s_p * s_i * StateFree(R)

with s_p = ``proj_params_lr_scale`` and s_i = ``inactive_lr_scale`` (``free_scale="matched"``:
s_i s_t, s_t = RMS(U) / RMS(StateFree(R)) per tensor and step, ``optim.free_scale``). Groups with
``algorithm="adamw"`` run AdamW, ``"state_full"`` the group's ``state_full`` rule (AdamW, SGDM or
Lion), ``"signsgd"``/``"sgd"`` the state-free rule, each on the whole tensor.
The subspace kinds, their sizes and schedules are documented in ``frugal_dist.core.subspaces``;
the rules in ``frugal_dist.core.rules``; ``frugal_dist.core.reference`` is the oracle this fast path
is tested against.

State is tensors only, created lazily in ``step()``:
``step`` (float32 scalar: steps taken), and for the state-full part ``sf_step`` (steps since the
last reset, for bias correction; ``moment_transfer="rotate"`` never resets it) plus the rule's
buffers (``exp_avg``, ``exp_avg_sq`` / ``momentum_buffer``), shaped like the compact gradient:
the whole tensor for an active block, (m, k) / (k, n) / (k,) for coordinates, (m, r) / (r, n) for
projections. ``svd`` projections also keep their basis ``proj_basis`` (it depends on a past
gradient); random bases and coordinate sets are rebuilt from the seed. Inactive blocks keep no
buffers at all.

Options of the optimizer, not of a group (``docs/optimizer.md`` has the full table):

* ``shard_state`` -- ZeRO-1 for the state-full buffers of replicated parameters: one owner rank
  per parameter keeps its buffers and computes U (``optim.ownership``).
* ``reduce_gradients`` -- FRUGAL reduces the gradients itself (unwrapped model, or DDP with
  ``comm.defer_to_optimizer_hook``); ``residual_comm`` = ``"exact"`` (mean all-reduce),
  ``"sign"`` (compact G_sf exact, residual as a 1-bit majority vote; ``state_free="signsgd"``) or
  ``"hierarchical"`` (exact inside a node, the sign scheme across ``node_groups``; one node =
  exact). Bytes per link: ``optim.sign_reduce``. ``step_ranks(rank_grads)`` takes the step of
  W simulated ranks in one process (``optim.simulated_ranks``: the same reduce, no collective).
* ``seed=None`` -- rank 0 draws and broadcasts the seed; subspace fingerprints are compared at
  every refresh. ``process_group``: the optimizer is collective over it; its participant checks
  wait at most ``FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S`` (``comm.participants``).
* ``nonfinite="skip"`` -- one fused inf/nan test of every local gradient and one host sync per
  step (``optim.nonfinite``; on plan steps after the host work), the whole step skipped on any
  rank's inf/nan (``skipped_steps()``); ``"raise"`` names the parameter; ``"ignore"``: no check
  (CUDA: one Triton launch per dtype reading each gradient once, ``kernels.finite``, 1.17 ms at
  LLaMA-1B on an H200 at c8378ce); ``step(grad_norm=n)``: verdict isfinite(n), no gradient read.
* ``fused=None`` -- whole-tensor AdamW items of float32 data run one fused kernel per group on
  CUDA (``True``: also on the CPU; ``False``: foreach kernels).
* ``proj_qr_device="auto"`` -- ``random`` projection bases drawn on the parameter's device for
  CUDA parameters (``kernels.refresh.random_bases``, all of a group's bases of one (dim, r) in
  one call per refresh), in float64 on the CPU otherwise (``"cpu"``: always that bit-exact
  basis; ``"param"``: always on the device).
* ``kernels="auto"`` -- the Triton kernels of ``frugal_dist.kernels`` on CUDA, plain torch on the
  CPU (``"triton"``: Triton wherever a kernel applies; ``"torch"``: never).

Group options of the projection kernels: ``proj_precision="auto"`` (bf16 GEMM operands on CUDA,
fp32 elsewhere; ``"fp32"``, ``"tf32"``, ``"bf16"``; the 60M quality guard puts bf16 within the
seed spread of the exact fp32 path) and ``svd_method="warm"`` (one subspace-iteration step from
the previous basis; the first refresh runs the randomized range finder with a Rayleigh-Ritz
rotation, so no refresh runs an exact SVD; ``"randomized"``, ``"exact"``: ``optim.svd_refresh``).

Communication schedule of one ``step()`` (every collective is skipped at world size 1; the
first-step rows: ``optim.agreement``):

    first step only [check_agreement]: all_gather of one int64 digest of the options, group
                                 hyper-parameters and parameter names/shapes (the full
                                 descriptions only when they differ, to name the field)
    first step only [check_agreement=False, and the step communicates]: all_reduce of 4 B
    observe_loss(loss)           none: the caller's loss, already the same on every rank
                                 (refresh_policy="loss", ``optim.refresh_schedule``)
    0. [nonfinite != "ignore", layout or reduce_gradients, no grad_norm] all_reduce(max) of
                                 one inf/nan flag (``comm_stats()``: ``nonfinite_flag``)  4 B
    1. [reduce_gradients, exact] all_reduce(mean) of every gradient, coalesced     4 B x params
       [reduce_gradients, sign ] all_reduce(mean) of AdamW / active-block / svd-refresh gradients,
                                 all_reduce(mean) of compact G_sf (coord: rho, proj: r x max(m,n)),
                                 all_gather of packed residual signs               1 bit x params
       [reduce_gradients, hierarchical] inside each node all_reduce(mean) of every gradient,
                                 across nodes the sign row, 1/L per rank (optim.sign_reduce)
    2. [svd refresh]             fragments: one reduce per owner of the padded
                                 gradients it owns                                 4 B x m x n
                                 owner computes P (svd_method), broadcast of P     4 B x dim x r
    3. [refresh, world > 1]      all_gather of one int64 fingerprint per refreshing parameter
    4. [projection fragments]    all_reduce(sum) of partial G_sf: cut rows (right) 4 B x r x rows
                                 or the (r, n) products (left)                     4 B x r x n
    5. [shard_state]             each owner broadcasts the compact U it computed   4 B x |S|
    6. [free_scale="matched", fragments] all_reduce(sum) of (sum U^2, sum F^2)      8 B x tensors
    7. [block_order="gradnorm", refresh] per-block sum G^2 (optim.block_gradnorm)  8 B x blocks

``step()`` runs these as the phases of ``frugal_dist.optim.phases``; steps between refreshes
replay a plan cached at the first step after each refresh (``optim.step_plan``: same results,
less host work). ``docs/step.md`` walks through them, and through where a new subspace kind
(``optim.kinds``) or engine plugs in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from frugal_dist.comm.collectives import agree_on_seed, rank_and_world
from frugal_dist.comm.stats import CommStats
from frugal_dist.comm.topology import NodeGroups, build_node_groups
from frugal_dist.layouts.base import ParamView
from frugal_dist.optim import accounting, agreement, clipping, ownership, phases, simulated_ranks
from frugal_dist.optim.engine_hooks import auto_layout
from frugal_dist.optim.group_setup import (
    FRUGAL_DEFAULTS,
    check_added_group,
    check_layout_options,
    check_optimizer_groups,
    prepare_group,
)
from frugal_dist.optim.kinds import kind_for
from frugal_dist.optim.layout_guard import ParamRegistry, dense_views
from frugal_dist.optim.matrix_free import refuse_sign_comm
from frugal_dist.optim.nonfinite import validate_nonfinite
from frugal_dist.optim.refresh_schedule import (
    follows_loss,
    loss_slots,
    observe,
    refresh_of_last_step,
)
from frugal_dist.optim.sign_reduce import HIERARCHICAL_UNDER_LAYOUT, hierarchy_options
from frugal_dist.optim.state_loading import (
    SCALAR_KEYS,
    check_checkpoint_groups,
    finish_load,
    saved_state_dtypes,
)
from frugal_dist.optim.step_cache import StepCache
from frugal_dist.optim.step_plan import SKIPPED, STALE, StepPlan
from frugal_dist.optim.validation import (
    check_known_keys,
    check_step_options,
    validate_options,
)


class FRUGAL(Optimizer):
    """FRUGAL optimizer (see the module docstring for the update equations and the state).

    Args:
        params: parameters or param groups. Groups should carry ``names`` (parameter names,
            as made by ``build_param_groups``): the subspace of a parameter is a pure function of
            (seed, name, refresh index), so names make runs reproducible across engines. Unnamed
            parameters are named ``"<group>.<position>"``.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay on every
            parameter; state-free lr = lr * proj_params_lr_scale * inactive_lr_scale).
        density: rho in [0, 1], the fraction of each split parameter that is state-full.
        density_final, density_decay_steps: rho decays linearly to ``density_final`` at step
            ``density_decay_steps``, each refresh sized from its step (AdaFRUGAL; a project
            addition, ``optim.density_schedule``); None: fixed.
        update_gap: T >= 1, steps between subspace refreshes.
        refresh_policy, update_gap_max, refresh_threshold: "fixed" (refresh every
            ``update_gap`` steps) | "loss" (the interval doubles, from ``update_gap`` up to
            ``update_gap_max``, when the mean loss reported with ``observe_loss`` improved by
            less than ``refresh_threshold`` per ``update_gap`` steps; this project's own rule,
            issue 19, ``optim.refresh_schedule``).
        subspace: "block" | "coordinate" | "projection".
        block_order, coord_choice, proj_type, proj_side: choices of each subspace kind.
        state_full: "adamw" | "sgdm" | "lion"; state_free: "signsgd" | "sgd" | "none" | "swan"
            (SWAN's whitened step; a project addition, ``core.swan``, ``optim.matrix_free``).
        reset_statistics: zero the state-full buffers (and restart bias correction) at each refresh.
        moment_transfer: "none" | "rotate" (projections: carry the moments into the new basis at
            a refresh instead of zeroing them; a project addition, ``optim.moment_transfer``).
        free_scale: "fixed" (the paper: state-free step lr * s_p * s_i * F(R)) | "matched"
            (per tensor and step times s_t = RMS(U) / RMS(F(R)), the state-full update's RMS
            over the state-free direction's; coordinate and projection only; a project
            addition, ``optim.free_scale``).
        seed: base seed of every subspace choice (all ranks must share it).
        algorithm: per-group "frugal" | "adamw" | "state_full" (the ``state_full`` rule on whole
            tensors) | "signsgd" | "sgd".
        proj_precision, svd_method: the projection kernels' options (module docstring).
        nonfinite, fused, proj_qr_device, kernels: optimizer-wide step options (module
            docstring).
        node_groups: ``residual_comm="hierarchical"`` only: ranks per node (int), a 2-D
            ``DeviceMesh`` (dim 0 across nodes, dim 1 inside a node), a ``NodeGroups``
            (``comm.topology.build_node_groups``), or None for ``LOCAL_WORLD_SIZE``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        *,
        process_group: Any = None,
        shard_state: bool = False,
        reduce_gradients: bool = False,
        residual_comm: str = "exact",
        node_groups: Any = None,
        check_agreement: bool = True,
        nonfinite: str = "skip",
        fused: bool | None = None,
        proj_qr_device: str = "auto",
        kernels: str = "auto",
        **kwargs: Any,
    ) -> None:
        check_known_keys(kwargs, set(FRUGAL_DEFAULTS), "FRUGAL(...) arguments")
        check_step_options(residual_comm=residual_comm, shard_state=shard_state,
                           reduce_gradients=reduce_gradients, check_agreement=check_agreement,
                           fused=fused, proj_qr_device=proj_qr_device,
                           kernels=kernels)  # fmt: skip
        if lr is not None:  # FRUGAL(params, 1e-3), as torch.optim
            kwargs["lr"] = lr
        defaults = {**FRUGAL_DEFAULTS, **kwargs}
        if isinstance(defaults["betas"], list):
            defaults["betas"] = tuple(defaults["betas"])
        self._pg = process_group
        if defaults["seed"] is None:  # rank 0 draws the seed; every rank uses it
            defaults["seed"] = agree_on_seed(None, process_group)
        validate_options(defaults, "FRUGAL(...) arguments")
        self.shard_state = bool(shard_state)
        self.reduce_gradients = bool(reduce_gradients)
        self.residual_comm = residual_comm
        self.node_size, self._node_spec = hierarchy_options(
            residual_comm, node_groups, self.reduce_gradients, rank_and_world(process_group)[1]
        )
        self._node_groups: NodeGroups | None = None
        self.check_agreement = bool(check_agreement)
        self.nonfinite = validate_nonfinite(nonfinite)
        self.fused = fused
        self.proj_qr_device = proj_qr_device
        self.kernels = kernels
        self._skipped = torch.zeros((), dtype=torch.int64)
        self._clip = clipping.ClipSlot()  # clip_grad_norm_'s coefficient for the next step
        self.comm = CommStats()
        self._cache = StepCache()
        self._layout: Any = None
        self._registry = ParamRegistry()  # what each group was built with (optim.layout_guard)
        super().__init__(params, defaults)
        check_optimizer_groups(self.param_groups, residual_comm)

    def node_groups(self) -> NodeGroups:
        """This rank's intra- and inter-node groups (``residual_comm="hierarchical"``), created
        on first use (``comm.topology``)."""
        if self.node_size is None:
            raise ValueError("node_groups() is for residual_comm='hierarchical'")
        if self._node_groups is None:
            self._node_groups = build_node_groups(self._pg, self.node_size, self._node_spec)
        return self._node_groups

    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held inf/nan (``nonfinite="skip"``); the same on
        every rank. Not part of ``state_dict()``: it counts this process's steps."""
        return int(self._skipped.item())

    # ------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``optim.group_setup``: names, options and the checks of its kind); a
        group that fails a check is not added."""
        self._cache.invalidate()  # ranks compare settings and parameters again at the next step
        prepare_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)
        layout = getattr(self, "_layout", None)  # None while torch's __init__ adds groups
        try:
            check_added_group(self.param_groups, layout, rank_and_world(self._pg)[1])
            refuse_sign_comm(self.param_groups[-1], getattr(self, "residual_comm", "exact"))
        except ValueError:
            self.param_groups.pop()  # the optimizer stays as it was
            raise
        self._registry.record(len(self.param_groups) - 1, self.param_groups[-1])

    # ------------------------------------------------------------------------- clip
    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, eps: float = 1e-6, *,
        total_norm: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Returns torch's total norm of the gradients and records c = clamp(max_norm /
        (norm + eps), max=1) for the next ``step()`` only (also a skipped one), which then
        computes what it computes after torch's ``clip_grad_norm_``. The ``.grad`` tensors are
        NOT scaled here: the step applies c where a scale-dependent rule reads them (its
        kernels, or in place). A second call before ``step()`` raises. ``total_norm``: the
        caller's norm of these gradients, used as is (``optim.clipping.clip_grad_norm_``)."""
        return clipping.clip_grad_norm_(self, self._clip, max_norm, norm_type, eps, total_norm)

    @property
    def clip_pending(self) -> bool:
        """A ``clip_grad_norm_`` coefficient waits for the next step."""
        return self._clip.pending is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also drops a pending ``clip_grad_norm_`` (new gradients)."""
        self._clip.clear()
        super().zero_grad(set_to_none)

    # ------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *,  # type: ignore[override]
             grad_norm: Tensor | float | None = None) -> float | None:  # fmt: skip
        """One FRUGAL step, phase by phase (``optim.phases``: each phase's work and collective).
        ``grad_norm``: the clip's total norm of these gradients, global over ranks; the inf/nan
        verdict is then isfinite(grad_norm), no gradient read (``optim.nonfinite``). After
        ``clip_grad_norm_``: its norm gives the verdict, its coefficient is applied here."""
        clip, norm = self._clip.take_for_step(grad_norm, closure, self.nonfinite, self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.comm.begin_step()
        plan = self._cache.plan
        if plan is not None:  # between refreshes: the cached plan (optim.step_plan)
            done = plan.run(self._context(), self.nonfinite, norm, clip)
            if done == SKIPPED:
                self._skipped += 1
            if done != STALE:
                return loss
            self._cache.plan = None
        self._full_step(grad_norm=norm, clip=clip)
        return loss

    @torch.no_grad()
    def step_ranks(
        self, rank_grads: Sequence[Sequence[Tensor | None]], node_size: int | None = None
    ) -> None:
        """Rank 0's step of a W-rank data-parallel run, simulated in this process (needs
        ``reduce_gradients=True``, one process, no layout): ``rank_grads[r]`` are rank r's
        gradients (one per parameter of ``param_groups`` in order, None for none; used as
        buffers), ``node_size`` the ranks per node for "hierarchical". The reduce runs in
        process (``optim.simulated_ranks``); W = 1 is ``step()``; then ``p.grad`` is rank 0's."""
        clipping.step_norm(self._clip.take(), None, None, True)  # a pending clip: refused
        sim = simulated_ranks.prepare(self, rank_grads, node_size)  # p.grad: rank 0's
        if sim.world == 1:
            self.step()
            return
        self._cache.plan = None  # a cached plan has no reduce phase
        self.comm.begin_step()
        self._full_step(sim)

    @torch.no_grad()
    def observe_loss(self, loss: Tensor | float) -> None:
        """Report the training loss of the step just taken, for ``refresh_policy="loss"``
        groups (``optim.refresh_schedule``: the refresh interval grows when the loss stops
        improving). Call it after every ``step()`` with the same value on every rank -- the
        loss averaged over all ranks, e.g. the all-reduced value a training loop logs (no
        collective here; a tensor is read with ``item()``). A non-finite loss is not counted;
        without a loss-driven group this does nothing."""
        if not any(follows_loss(g) for g in self.param_groups):
            return
        value = float(loss.item() if isinstance(loss, Tensor) else loss)
        slots = self._cache.loss_slots
        if slots is None:  # gathered from the views again (after a new state or a load)
            slots = self._cache.loss_slots = loss_slots(
                view.state for g in self.param_groups if follows_loss(g)
                for view in self.views(g, all_holders=True)
            )  # fmt: skip
        observe(slots, value)

    def _full_step(self, simulated: simulated_ranks.SimulatedRanks | None = None,
                   grad_norm: Tensor | float | None = None,
                   clip: clipping.PendingClip | None = None) -> None:  # fmt: skip
        """The full path: agreement (once), inf/nan check (every ``simulated`` rank's, or
        ``grad_norm``'s verdict), phases; ``clip``: the gradients the step reads scaled."""
        views = [(group, self.views(group)) for group in self.param_groups]
        ctx = self._context()
        ctx.simulated = simulated
        agreement.check_once(ctx)  # first step: ranks compare settings
        if self.nonfinite != "ignore" and not phases.gradients_finite(ctx, views, self.nonfinite,
                                                                        grad_norm):  # fmt: skip
            self._skipped += 1
            return
        items = phases.plan(ctx, views)
        if not items:
            return
        if clip is not None:  # in place where a scale-dependent rule reads (optim.clipping)
            clipping.scale_items_(items, clip.coef)
        phases.reduce(ctx, items)  # reduce_gradients: mean gradients (full / compact / signs)
        phases.select(ctx, items)  # svd refresh; refresh fingerprints compared
        phases.down(ctx, items)  # G_sf = down(G)
        phases.state(ctx, items)  # U = StateFull(G_sf) on each owner
        phases.exchange(ctx, items)  # shard_state: owners broadcast U
        routed = phases.route_apply(ctx, items)
        phases.run_apply(ctx, routed)  # W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(R))
        self._cache.plan = StepPlan.build(ctx, items, routed)  # the steps until the refresh

    def _context(self) -> phases.StepContext:
        rank, world = rank_and_world(self._pg)
        agree_pg = getattr(self._layout, "agreement_group", self._pg)  # HSDP: all mesh dims
        return phases.StepContext(
            self, rank, world, self._pg, agree_pg, self.comm, self._cache, self._layout,
            self.param_groups, self.shard_state, self.reduce_gradients, self.residual_comm,
            self.check_agreement, self.fused, self.proj_qr_device, self.kernels,
        )  # fmt: skip

    def release_unowned_state(self) -> int:
        """Drop the state-full buffers this rank does not own under ``shard_state`` at the
        current world size (after loading a merged, world-size-free state dict); returns the
        number of parameters pruned (``optim.ownership.release_unowned_state``)."""
        return ownership.release_unowned_state(self._context(), self.state)

    def mark_agreed(self) -> None:
        """Treat the first-step agreement check as done (a caller that compared the settings
        itself); the per-refresh subspace fingerprint check still runs."""
        self._cache.agreed = True

    # ------------------------------------------------------------------------- public views
    @property
    def layout(self) -> Any:
        """The engine layout bound with ``bind_layout`` (None: whole tensors, dense)."""
        return self._layout

    @property
    def process_group(self) -> Any:
        """The process group of the optimizer's collectives (None: the default group)."""
        return self._pg

    def views(self, group: dict[str, Any], all_holders: bool = False) -> list[ParamView]:
        """Every parameter of ``group`` as a view: from the bound layout, or whole tensors.
        ``all_holders``: also outside ``step()`` (checkpointing), where ZeRO-3 hides them.
        A layout an engine adapter registered for these parameters (FSDP2's DTensors,
        ``engine_hooks.register_auto_layout``) is bound on first use."""
        if self._layout is None:
            layout = auto_layout(self, group)
            if layout is not None:
                self.bind_layout(layout)
        if self._layout is not None:
            if all_holders and hasattr(self._layout, "entries"):
                return self._layout.views(self, group, all_holders=True)
            return self._layout.views(self, group)
        return dense_views(group, self.param_groups, self._registry, self._cache.dense_views,
                           self.state)  # fmt: skip

    def bind_layout(self, layout: Any) -> None:
        """Let an engine adapter describe where each parameter's local fragment lives (see
        ``frugal_dist.layouts``). Gradients then come reduced by the engine, so the optimizer's
        own ``shard_state`` / ``reduce_gradients`` must be off."""
        if self.residual_comm == "hierarchical":
            raise ValueError(HIERARCHICAL_UNDER_LAYOUT)
        if self.shard_state or self.reduce_gradients:
            raise ValueError(
                "shard_state / reduce_gradients are for replicated parameters (DDP); with an "
                "engine that shards (DeepSpeed ZeRO, FSDP) leave them False"
            )
        pg = getattr(layout, "process_group", self._pg)
        check_layout_options(self.param_groups, layout, rank_and_world(pg)[1])
        self._layout = layout
        self._pg = pg
        self._cache.invalidate()

    def reset_caches(self) -> None:
        """Drop every cached selection, schedule, owner plan and view skeleton (after state was
        replaced from outside, e.g. a consolidated import); results do not change."""
        self._cache.invalidate()

    def state_role(self, group: dict[str, Any], view: ParamView, key: str) -> str:
        """How state tensor ``key`` of ``view`` maps to the full parameter: ``counter``
        (scalar, the same everywhere), ``replicated``, ``param``, ``coordinate`` or ``right``
        (see ``SubspaceKind.state_role``)."""
        if key in SCALAR_KEYS:
            return "counter"
        return kind_for(group).state_role(group, view.shape, key)

    def selection(self, view: ParamView, group: dict[str, Any]) -> Any:
        """The global selection ``view``'s state currently refers to (that of the refresh of
        its last step; coordinate subspaces only, else None)."""
        if "step" not in view.state:
            return None
        k = refresh_of_last_step(group, view.state)
        return kind_for(group).current_selection(view, group, k, self._context())

    def step_plan(self) -> StepPlan | None:
        """The plan the steps until the next refresh replay (``optim.step_plan``; None: the
        next step takes the full path). For inspection (tests, diagnostics): read-only."""
        return self._cache.plan

    def selections_in_use(self) -> dict[str, tuple[int, Any]]:
        """name -> (refresh index, global coordinate set or projection basis) of the
        selections the last steps used (a read-only copy of the cache)."""
        return dict(self._cache.selections)

    def shard_report(self) -> dict[str, Any]:
        """The ``shard_state`` ownership plan: expected state bytes per rank and the
        imbalance (max / mean)."""
        return ownership.shard_report(self._context())

    # ------------------------------------------------------------------------- comm
    def comm_stats(self) -> dict[str, Any]:
        """Bytes this rank handed to collectives, by kind, for the last step and in total."""
        return self.comm.as_dict()

    # ------------------------------------------------------------------------- accounting
    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state on this process (``optim.accounting``)."""
        return accounting.state_bytes(self.state)

    def aux_bytes(self) -> int:
        """Bytes of metadata rebuilt from the seed, not saved: coordinate indices and random /
        randperm projection bases (svd bases are state, counted by ``state_bytes``)."""
        return accounting.aux_bytes(self.state, self._cache.selections)

    # ------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; names must match (a checkpoint of another model is refused).

        State tensors keep their saved dtype (torch's default would cast float32 moments to the
        dtype of a bf16 parameter). The saved seed and hyper-parameters are restored.
        """
        self._cache.invalidate()
        check_checkpoint_groups(state_dict["param_groups"], self.param_groups)
        saved_dtypes = saved_state_dtypes(state_dict)  # before torch's loading casts them
        super().load_state_dict(state_dict)
        finish_load(self.state, state_dict, saved_dtypes, self.param_groups, self.defaults)
        self._cache.invalidate()
