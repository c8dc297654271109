"""Everything ``FRUGAL`` keeps between steps that is *not* optimizer state: one object, one
``invalidate()``.

Every entry is a pure function of the parameter groups, the bound layout, the world size and the
state (counters, svd bases), kept only so the step does not recompute it: dropping all of it at
any time changes no result, only the host cost of the next step. ``FRUGAL`` invalidates it when
a group is added, a layout is bound, state is loaded (``load_state_dict``, consolidated import)
and on ``reset_caches()``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from frugal_dist.core.subspaces import BlockSchedule
from frugal_dist.optim.sharding import ShardPlan


class StepCache:
    """Per-step caches of one ``FRUGAL`` instance.

    * ``agreed``: the ranks compared options, hyper-parameters and parameter names
      (``preflight.check_optimizer_agreement``) since the last invalidation;
    * ``dense_views``: id(group) -> (group, [(name, index, shape, span, param)]), the skeleton of
      whole-tensor views (no layout bound);
    * ``selections``: name -> (refresh k, global coordinate set / projection basis);
    * ``local_selections``: name -> (k, span, coordinate set restricted to a fragment's rows);
    * ``schedules``: (id(group), n, density, order, seed) -> the group's ``BlockSchedule``;
    * ``shard_plan``: the static owner plan of ``shard_state`` (``optim.ownership``);
    * ``block_owners``: (id(group), k, world) -> owners of the active blocks at refresh k;
    * ``coord_positions``: name -> (coordinate index, its ``coordinate_positions``) for the
      fused coordinate kernel (``fast_apply.run_fused``);
    * ``kernel_cache``: stacked projection bases per batch (``optim.projection_batch``);
    * ``plan``: the step plan replayed until the next refresh (``optim.step_plan``);
    * ``loss_slots``: the (S, n) tensors ``FRUGAL.observe_loss`` adds to (the schedule state of
      every held parameter of a ``refresh_policy="loss"`` group, ``optim.refresh_schedule``;
      None: gathered again from the views at the next call).
    """

    def __init__(self) -> None:
        self.invalidate()

    def invalidate(self) -> None:
        """Forget everything (the next step rebuilds what it needs)."""
        self.agreed = False
        self.dense_views: dict[int, tuple[dict, list[tuple]]] = {}
        self.selections: dict[str, tuple[int, Any]] = {}
        self.local_selections: dict[str, tuple[int, Any, Any]] = {}
        self.schedules: dict[tuple, BlockSchedule] = {}
        self.shard_plan: ShardPlan | None = None
        self.block_owners: dict[tuple, dict[int, int]] = {}
        self.coord_positions: dict[str, tuple[Tensor, Tensor]] = {}
        self.kernel_cache: dict[Any, Any] = {}
        self.plan: Any = None
        self.loss_slots: tuple[list[Tensor], list[Tensor]] | None = None
