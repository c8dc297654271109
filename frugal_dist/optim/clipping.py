"""``FRUGAL.clip_grad_norm_``: gradient clipping without the gradient-sized multiply.

torch's ``clip_grad_norm_(params, max_norm)`` reads every gradient for the total norm, then
multiplies EVERY gradient in place by the clip coefficient

    c = min(max_norm / (||g||_p + eps), 1)                       (a 0-d device tensor)

(``clip_grads_with_norm_``: one more read + write of every gradient byte). FRUGAL needs the
scaled gradient only where a scale-dependent rule reads it:

    scale-invariant (c > 0):   sign(c G) = sign(G)   -- signSGD state-free parts (inactive blocks,
                               rho = 0, coordinates outside S, signSGD groups), and the
                               projection residual's sign: sign(c G - P P^T c G) = sign(R)
    scale-dependent:           the state-full rule's input (AdamW / SGDM / Lion on an active
                               block, the selected coordinates, the compact Z = P^T G, whole
                               AdamW groups) and the ``sgd`` state-free rule

``clip_grad_norm_`` computes the norm (torch's ``get_total_norm``: the same value torch's clip
computes), records c and the norm (``PendingClip``) and returns the norm; the ``.grad`` tensors
are NOT scaled. The next ``step()`` (exactly one: it clears the record, also when it skips the
step or raises) takes its inf/nan verdict from the norm (as ``step(grad_norm=...)``) and applies
c only where it is read (``clip_mode``):

* full steps (the first step after each refresh): ``FULL`` and ``COMPACT`` items' gradients are
  multiplied in place by c with torch's own op (``torch._foreach_mul_`` by the device scalar),
  so the step computes bit for bit what it computes after torch's clip; ``NONE`` items (pure
  signSGD) are not touched.
* plan steps (``optim.step_plan``): the prepared Triton launches (whole AdamW, columns / rows
  coordinates, ``sgd`` state-free tensors) read c from the device scalar and scale the gradient
  in registers (``kernels.elementwise_triton``: float32 product rounded once, then to the
  gradient's dtype, as torch's multiply); ``COMPACT`` items (projections with a signSGD / none
  residual) get c on the compact Z = G_sf the state phase reads
  (the projection state kernel ``kernels.projection_state`` scales Z in registers; the torch path
  multiplies a compact copy); the remaining ``FULL`` items are multiplied in place as on full
  steps. Everything but projections is bit-equal to torch's clip; projections are not:
  c (P^T G) and P^T (c G) round differently, and sign(R) is taken from the unscaled G (the
  residual is scale-invariant only in exact arithmetic), so a residual entry within rounding of
  0 can take the other sign (measured by ``tests/unit/test_clip_grad_norm.py``).
* ``nonfinite="ignore"``: no verdict is taken, so a non-finite norm (c = 0 or nan) must act as
  in torch: every gradient is multiplied in place (torch's ``clip_grads_with_norm_`` exactly).

Refused (``clip_grad_norm_`` raises, naming torch's clip + ``step(grad_norm=...)``): a bound
engine layout (fragments: the local norm is not the total norm), DTensor parameters (FSDP2),
and ``reduce_gradients=True`` at world size > 1 (the local gradients are not the reduced ones).
``step_ranks`` with a pending clip raises. A second ``clip_grad_norm_`` before ``step()`` raises
(the gradients are unscaled, so a second norm would not be torch's); ``zero_grad`` drops a
pending clip (new gradients).

Edge: c G underflowing to 0 where G is not (|G| below ~1.4e-45 / c) has sign 0 after torch's
clip and sign(G) here. Cost: one read of every gradient (the norm), no write; a plan step adds 8
B of pointer per prepared launch. Communication: none (the norm of replicated gradients is the
global norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from frugal_dist.comm.collectives import rank_and_world
from frugal_dist.optim.nonfinite import check_grad_norm

NONE, COMPACT, FULL = "none", "compact", "full"
_FREE_ONLY = ("signsgd", "none")  # state-free rules invariant under a positive scale of G


@dataclass
class PendingClip:
    """The clip ``clip_grad_norm_`` recorded for the next step: the coefficient c (0-d float32
    on the gradients' device) and the total norm (the step's inf/nan verdict)."""

    coef: Tensor
    norm: Tensor


class ClipSlot:
    """Holds at most one ``PendingClip`` between ``clip_grad_norm_`` and the step consuming it."""

    def __init__(self) -> None:
        self.pending: PendingClip | None = None

    def put(self, clip: PendingClip) -> None:
        if self.pending is not None:
            raise RuntimeError(
                "FRUGAL.clip_grad_norm_ called twice before step(): the first call did not "
                "scale the gradients (the step applies its coefficient), so a second norm would "
                "not be torch's; call step() (or zero_grad()) in between, or clip once"
            )
        self.pending = clip

    def take(self) -> PendingClip | None:
        """The pending clip, cleared (a step consumes it whatever happens next)."""
        clip, self.pending = self.pending, None
        return clip

    def clear(self) -> None:
        self.pending = None

    def take_for_step(
        self, grad_norm: Any, closure: Any, nonfinite: str, groups: list
    ) -> tuple[PendingClip | None, Tensor | float | None]:
        """``step()``'s start: (the clip the step applies, the norm of its inf/nan verdict).
        The pending clip is taken (consumed whatever happens next); the norm is its norm or
        ``grad_norm`` (``step_norm``), checked (``nonfinite.check_grad_norm``: None under
        "ignore"); under ``nonfinite="ignore"`` the clip is applied now (``unless_ignored``)."""
        clip = self.take()
        norm = check_grad_norm(step_norm(clip, grad_norm, closure, False), closure, nonfinite)
        return unless_ignored(clip, nonfinite, groups), norm


def clip_grad_norm_(
    opt: Any,
    slot: ClipSlot,
    max_norm: float,
    norm_type: float = 2.0,
    eps: float = 1e-6,
    total_norm: Tensor | None = None,
) -> Tensor:
    """The total ``norm_type`` norm of ``opt``'s gradients (torch's ``get_total_norm``), with c =
    clamp(max_norm / (norm + eps), max=1) recorded for the next step (module docstring).

    ``total_norm``: that norm as the caller computed it over the same gradients (a 0-d floating
    tensor), used instead of computing it here. torch's clip stacks the per-tensor norms in the
    order it is given the parameters (the model's, for ``clip_grad_norm_(model.parameters())``);
    this function's order is the param groups', and the two sums may differ in the last bit, so
    a caller that must match torch's clip of the model bit for bit passes the model-order norm
    (``train.engine_setup.clip_gradients`` does)."""
    max_norm, norm_type, eps = float(max_norm), float(norm_type), float(eps)
    if not max_norm > 0.0:
        raise ValueError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm}")
    if not eps >= 0.0:
        raise ValueError(f"clip_grad_norm_: eps must be >= 0, got {eps}")
    _check_supported(opt)
    if total_norm is None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
    elif not (isinstance(total_norm, Tensor) and total_norm.dim() == 0
              and total_norm.is_floating_point()):  # fmt: skip
        raise TypeError(
            "clip_grad_norm_: total_norm must be a 0-d floating tensor (the total norm of these "
            f"gradients, e.g. torch.nn.utils.get_total_norm), got {type(total_norm).__name__}"
        )
    else:
        norm = total_norm
    # torch's clip_grads_with_norm_ arithmetic (its eps is 1e-6), so c has the same bits
    coef = torch.clamp(max_norm / (norm + eps), max=1.0)
    slot.put(PendingClip(coef, norm))
    return norm


def applies(opt: Any) -> bool:
    """Whether ``clip_grad_norm_`` accepts ``opt`` (no layout, no DTensor parameter, no
    ``reduce_gradients`` at world size > 1); the training loop's choice of clip."""
    try:
        _check_supported(opt)
    except ValueError:
        return False
    return True


def _check_supported(opt: Any) -> None:
    fix = ("use torch.nn.utils.clip_grad_norm_ (or the engine's clip) and pass its norm to "
           "step(grad_norm=...)")  # fmt: skip
    if opt.layout is not None:
        raise ValueError(
            "FRUGAL.clip_grad_norm_: an engine layout is bound (sharded fragments): the norm of "
            f"the local fragments is not the total norm; {fix}"
        )
    for g in opt.param_groups:
        for p in g["params"]:
            if hasattr(p, "placements"):
                raise ValueError(
                    "FRUGAL.clip_grad_norm_: DTensor parameters (FSDP2): the local norm is not "
                    f"the total norm; {fix}"
                )
    if opt.reduce_gradients and rank_and_world(opt.process_group)[1] > 1:
        raise ValueError(
            "FRUGAL.clip_grad_norm_ with reduce_gradients=True at world size > 1: the "
            "gradients are reduced inside step(), so their norm here is a local one; clip "
            "after the reduction (DDP) or leave clipping to torch"
        )


def clip_mode(it: Any) -> str:
    """Where item ``it`` reads c G: ``NONE`` (only signs of G), ``COMPACT`` (only the state-full
    rule's compact input Z = P^T G: projections with a sign / none residual) or ``FULL`` (the
    scaled gradient: active blocks, whole state-full tensors, coordinates, the ``sgd`` rule)."""
    free = it.kind.free_rule(it.group)
    if not it.active:
        return NONE if free in _FREE_ONLY else FULL
    if free in _FREE_ONLY and it.kind.name == "projection":
        return COMPACT
    return FULL


def step_norm(clip: PendingClip | None, grad_norm: Any, closure: Any, simulated: bool) -> Any:
    """The norm ``step()`` takes its verdict from: the pending clip's (``grad_norm`` and a
    closure refused with it: they would pair the clip with other gradients or another norm)."""
    if clip is None:
        return grad_norm
    if grad_norm is not None:
        raise ValueError(
            "FRUGAL.step(grad_norm=...) after clip_grad_norm_: the clip already recorded the "
            "norm for this step's verdict; pass neither or clip with torch and pass its norm"
        )
    if closure is not None:
        raise ValueError(
            "FRUGAL.step(closure) after clip_grad_norm_: the closure recomputes the gradients, "
            "so the pending clip is not theirs; clip inside the closure with torch's clip"
        )
    if simulated:
        raise ValueError(
            "FRUGAL.step_ranks after clip_grad_norm_: the pending clip is of one rank's "
            "gradients; clip each simulated rank's gradients with torch's clip"
        )
    return clip.norm


def unless_ignored(clip: PendingClip | None, nonfinite: str, groups: list) -> PendingClip | None:
    """``nonfinite="ignore"`` takes no verdict, so c may be 0 or nan: every gradient is
    multiplied in place (torch's clip exactly) and None returned; else ``clip``."""
    if clip is None or nonfinite != "ignore":
        return clip
    scale_([p.grad for g in groups for p in g["params"] if p.grad is not None], clip.coef)
    return None


def scale_(grads: list[Tensor], coef: Tensor) -> None:
    """``grads`` multiplied in place by c: torch's ``clip_grads_with_norm_`` op (one
    ``_foreach_mul_`` by the 0-d tensor per (device, dtype)), so the products have its bits."""
    by_key: dict[tuple, list[Tensor]] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), gs in by_key.items():
        torch._foreach_mul_(gs, coef.to(device))


def scale_items_(items: list[Any], coef: Tensor, modes: tuple[str, ...] = (COMPACT, FULL)) -> None:
    """Full step: the gradients of the items whose ``clip_mode`` is in ``modes`` multiplied in
    place (``scale_``); an item whose ``g`` is a float32 copy of a 16-bit gradient gets the copy
    refreshed from the scaled gradient (exact)."""
    picked = [it for it in items if clip_mode(it) in modes]
    scale_([it.view.grad for it in picked if it.view.grad is not None], coef)
    for it in picked:
        grad = it.view.grad
        if grad is not None and not _aliases(it.g, grad) and it.g.numel() == grad.numel():
            it.g.copy_(grad.reshape(it.g.shape))


def scaled_compact(x: Tensor, coef: Tensor | None) -> Tensor:
    """The state-full rule's input for a ``COMPACT`` item: c G_sf (a compact copy; G_sf itself
    stays unscaled for the residual)."""
    return x if coef is None else x * coef.to(x.device)


def _aliases(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
