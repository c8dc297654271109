"""How ``FRUGAL`` takes its param groups: the defaults, the parameter names, and every check a
group must pass before a step runs (each a ``ValueError`` naming the group, the field and the fix).

    FRUGAL(params, ...)       check_optimizer_groups    names unique over groups; residual_comm
                                                        "sign" / "hierarchical" need signSGD
                                                        (not "sgd" / "swan")
    add_param_group(group)    prepare_group             keys, option values, names (before torch
                                                        adds the group)
                              check_added_group         with the defaults filled in: the bound
                                                        layout's options, moment_transfer,
                                                        free_scale, block_order="gradnorm",
                                                        density_final,
                                                        refresh_policy, state_free="swan"
                                                        (``optim.matrix_free``), the
                                                        subspace kind's own (``check_group``)
    bind_layout(layout)       check_layout_options      what the layout cannot honour (swan:
                                                        fragments over > 1 rank)

No communication: every rank runs the same checks on the same groups (the first step's agreement
check compares them, ``comm.preflight``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import Tensor

from frugal_dist.optim import matrix_free
from frugal_dist.optim.block_gradnorm import uses_gradnorm
from frugal_dist.optim.density_schedule import check_density_decay
from frugal_dist.optim.free_scale import check_free_scale
from frugal_dist.optim.kinds import kind_for
from frugal_dist.optim.moment_transfer import check_moment_transfer
from frugal_dist.optim.refresh_schedule import check_refresh_policy
from frugal_dist.optim.validation import check_group_keys, validate_options

FRUGAL_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    algorithm="frugal",
    density=0.25,
    density_final=None,
    density_decay_steps=None,
    update_gap=200,
    refresh_policy="fixed",
    update_gap_max=None,
    refresh_threshold=None,
    subspace="block",
    block_order="descending",
    coord_choice="columns",
    proj_type="random",
    proj_side="auto",
    state_full="adamw",
    state_free="signsgd",
    inactive_lr_scale=1.0,
    proj_params_lr_scale=1.0,
    reset_statistics=True,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    seed=0,
    proj_precision="auto",
    svd_method="warm",
    moment_transfer="none",
    free_scale="fixed",
)
GROUP_KEYS = frozenset(FRUGAL_DEFAULTS) | {"params", "names", "name", "initial_lr"}


def group_label(param_group: dict[str, Any], index: int) -> str:
    """How errors name group ``index``: ``param group 1 (blocks)``."""
    return f"param group {index} ({param_group.get('name', 'unnamed')})"


def prepare_group(param_group: dict[str, Any], index: int) -> None:
    """Check a new group's keys and option values and give every parameter a name (in place;
    unnamed parameters are named ``"<group name or group<index>>.<position>"``)."""
    where = group_label(param_group, index)
    check_group_keys(param_group, GROUP_KEYS, where)
    if isinstance(param_group.get("betas"), list):
        param_group["betas"] = tuple(param_group["betas"])
    validate_options(param_group, where)
    params = param_group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    names = param_group.get("names")
    if names is None:
        label = param_group.get("name", f"group{index}")
        names = [f"{label}.{i}" for i in range(len(params))]
    names = list(names)
    if len(names) != len(params):
        raise ValueError(f"{where}: 'names' has {len(names)} entries for {len(params)} params")
    param_group["names"] = names


def check_added_group(groups: list[dict[str, Any]], layout: Any, world: int) -> None:
    """The checks of the last group of ``groups`` (defaults filled in by torch): the bound
    ``layout``'s (``check_layout_options``, over every group), ``moment_transfer``,
    ``free_scale``, ``block_order``, ``density_final`` (``optim.density_schedule``),
    ``refresh_policy`` (``optim.refresh_schedule``), the
    subspace kind's own (``SubspaceKind.check_group``: projection shapes, (in, out)-stored
    weights)."""
    group = groups[-1]
    where = group_label(group, len(groups) - 1)
    if layout is not None:
        check_layout_options(groups, layout, world)
    kind = kind_for(group)
    check_moment_transfer(group, where, kind.has_basis)
    check_free_scale(group, where)
    check_block_order(group, where)
    check_density_decay(group, where)
    check_refresh_policy(group, where)
    matrix_free.check_group_rule(group, where)
    kind.check_group(group, where)


def check_block_order(group: dict[str, Any], where: str) -> None:
    """``block_order="gradnorm"`` chooses whole tensors: only for ``subspace="block"`` (a
    ``ValueError`` naming the field otherwise; groups of another algorithm ignore it)."""
    if group["block_order"] != "gradnorm" or group["algorithm"] != "frugal":
        return
    if group["subspace"] != "block":
        raise ValueError(
            f"block_order='gradnorm' (in {where}) chooses which whole tensors are state-full and "
            f"applies to subspace='block' only, but this group has "
            f"subspace={group['subspace']!r}; use subspace='block' or leave block_order unset"
        )


def check_layout_options(groups: list[dict[str, Any]], layout: Any, world: int) -> None:
    """Options an engine layout cannot honour, refused on every rank alike before any step,
    for state that is not row-aligned (``SubspaceKind.row_aligned_state``: coordinate ``rows``
    / ``randk``, whose compact slots belong to whichever rank holds the selected row):

    * a layout whose checkpoints reshard the state by rows (``reshards_state_by_rows``: FSDP2)
      cannot place such state at all;
    * over more than one rank (``world``: ZeRO / FSDP fragments), ``reset_statistics=False``
      would have to move a kept slot's moments between ranks at each refresh;

    and ``block_order="gradnorm"`` under a layout that gives each rank a subset of a group
    (``schedule_names``: fairscale OSS), where no rank sees every tensor's gradient; and
    ``state_free="swan"`` on fragments over more than one rank (``optim.matrix_free``)."""
    matrix_free.check_layout(groups, layout, world, group_label)
    by_rows = getattr(layout, "reshards_state_by_rows", False)
    for idx, g in enumerate(groups):
        if getattr(layout, "schedule_names", None) is not None and uses_gradnorm(g):
            raise ValueError(
                f"{group_label(g, idx)}: block_order='gradnorm' ranks every tensor of the group "
                "by its gradient norm, but this layout (fairscale OSS) steps each rank's subset "
                "of the group with no collective between them. Use DDP / FSDP / ZeRO, or "
                "another block_order."
            )
        if kind_for(g).row_aligned_state(g):
            continue
        choice = f"coord_choice={g['coord_choice']!r}"
        if by_rows:
            raise ValueError(
                f"{group_label(g, idx)}: {choice} is not supported with FSDP2: its compact "
                "state is not aligned with the parameter's row shards, so checkpoints could not "
                "be resharded. Use coord_choice='columns'."
            )
        if world > 1 and not g["reset_statistics"]:
            raise ValueError(
                f"{group_label(g, idx)}: {choice} with reset_statistics=False is not supported "
                "on a sharded engine layout (ZeRO / FSDP fragments): the kept moments of a "
                "selected row or entry would move to another rank at each refresh. Use "
                "reset_statistics=True (the paper's default) or coord_choice='columns'."
            )


def check_optimizer_groups(groups: list[dict[str, Any]], residual_comm: str) -> None:
    """Checks over all groups of a new optimizer: parameter names unique across groups (the
    subspaces are seeded by name); ``residual_comm`` other than ``"exact"`` sends 1-bit signs
    of the state-free residual, which ``state_free="sgd"`` and ``"swan"`` cannot use."""
    counts = Counter(n for g in groups for n in g["names"])
    dup = sorted(n for n, c in counts.items() if c > 1)
    if dup:
        raise ValueError(f"parameter names must be unique across groups; repeated: {dup[:5]}")
    if residual_comm == "exact":
        return
    for g in groups:
        if g["algorithm"] == "frugal" and g["state_free"] == "sgd":
            raise ValueError(
                f"residual_comm={residual_comm!r} sends 1-bit signs of the state-free "
                f"residual, which state_free='sgd' cannot use (group {g.get('name')!r}); "
                "use state_free='signsgd' or residual_comm='exact'"
            )
        matrix_free.refuse_sign_comm(g, residual_comm)
