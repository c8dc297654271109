"""One parameter's work in one FRUGAL step (``Item``) and the helpers every phase shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.core.fragments import RowSpan
from frugal_dist.core.rules import state_full_keys
from frugal_dist.layouts.base import ParamView

if TYPE_CHECKING:
    from frugal_dist.optim.kinds.base import SubspaceKind


@dataclass
class Item:
    """One parameter's work in one step; the phases fill it in order (plan: up to ``g``, ``sel``;
    reduce / down: ``g_sf``; state / exchange: ``u``; apply consumes and clears them)."""

    view: ParamView
    group: dict[str, Any]
    kind: SubspaceKind
    refresh: bool
    k: int
    active: bool  # has a state-full part this step
    owner: int  # rank holding the state-full buffers (computes U)
    g: Tensor  # gradient: local values, or the padded local matrix (``kind.matrix_grad``)
    sel: Any = None  # selection in local coordinates
    gsel: Any = None  # global selection
    g_sf: Tensor | None = None
    g_sf_op: Tensor | None = None  # G_sf as the apply kernel reads it (``projection_batch``)
    free: Tensor | None = None  # state-free direction decided by the sign vote
    free_done: bool = False  # ``free`` is final (residual_comm="sign")
    vote_bits: tuple[Tensor, int] | None = None  # (gathered (W, B) uint8, byte offset): F(R)
    # still packed, applied by ``fast_apply.run_voted`` (``kernels.vote_apply``)
    u: Tensor | None = None
    fused: bool = False  # state phase inside the apply kernel (``fast_apply.run_fused``)
    sf_t: int = 0  # state-full step count after this step (active items on their owner)
    prev_basis: Tensor | None = None  # moment_transfer="rotate": global basis before a refresh
    free_scale: Tensor | None = None  # free_scale="matched": s_i s_t reduced over the ranks

    @property
    def name(self) -> str:
        return self.view.name

    def release(self) -> None:
        """Drop this item's temporaries (once its update is applied)."""
        self.free = self.u = self.g_sf = self.g_sf_op = self.vote_bits = self.free_scale = None

    @property
    def st(self):
        return self.view.state

    @property
    def span(self) -> RowSpan:
        return self.view.span


def reset_buffers(st: Any, rule: str, shape: tuple[int, ...], device: torch.device) -> None:
    """Zero state-full buffers of ``shape`` and ``sf_step`` = 0 (a fresh start of the rule)."""
    for key in state_full_keys(rule):
        st[key] = torch.zeros(shape, dtype=torch.float32, device=device)
    st["sf_step"] = torch.zeros((), dtype=torch.float32)


def drop_buffers(st: Any, rule: str) -> None:
    """Remove the state-full buffers and ``sf_step`` (an inactive block keeps none)."""
    for key in (*state_full_keys(rule), "sf_step"):
        st.pop(key, None)


def apply_update(p: Tensor, direction: Tensor, alpha: float) -> None:
    """``p += alpha * direction``; 16-bit params are updated through float32 (one rounding)."""
    if p.numel() == 0:
        return
    d = direction.reshape(p.shape)
    if p.dtype in (torch.bfloat16, torch.float16):
        p.copy_(p.float().add_(d, alpha=alpha))
    else:
        p.add_(d.to(p.dtype), alpha=alpha)


def increment_counters(states: list, key: str) -> list[int]:
    """``st[key] += 1`` for each state's CPU counter tensor; returns the values *after* it.

    Each counter is read (``item()``) and written with ``fill_(value + 1)``: the same float32
    result as ``add_(1)`` (both round the exact sum once), and on the CPU a scalar ``fill_``
    skips the TensorIterator set-up that ``add_`` (or a CPU ``_foreach_add_``) pays per tensor.
    A layout's state view (not a plain dict) gets the counter stored back, as ``+=`` does.
    """
    after = []
    for st in states:
        t = st[key]
        v = int(t.item()) + 1
        t.fill_(v)
        if type(st) is not dict:
            st[key] = t
        after.append(v if v <= EXACT_COUNT else int(t.item()))
    return after


EXACT_COUNT = 1 << 24  # float32 counts every integer up to here exactly
