"""The bandwidth-lean parts of the FRUGAL apply phase.

* ``apply_fused``: whole-tensor AdamW items through ``torch._fused_adamw_`` -- one kernel reads
  W, G, m, v and writes W, m, v (decoupled weight decay inside): 28 B per float32 parameter.
* ``apply_free_batch``: pure state-free updates W += -lr s F(G) (signSGD / SGD groups, inactive
  blocks, rho = 0 coordinates / projections) with foreach kernels over many tensors at once;
  signSGD's temporaries are bounded to ``FREE_CHUNK`` elements at a time.
* ``apply_coordinate_batch`` / ``apply_projection_batch``: coordinate / projection items with a
  signSGD residual: foreach sign and add over many tensors; only the scatter of U (coordinates)
  or the two GEMMs (projections) stay per tensor.
* ``device_steps``: step counts on the device for the fused kernel, kept without host syncs.

Which items go where is each kind's ``apply`` (``optim.kinds``); ``can_batch`` is the common
precondition. These functions are the plug points for the fused GPU kernels
(``frugal_dist.kernels``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from frugal_dist.optim.step_items import Item

FREE_CHUNK = 1 << 25  # elements per batched signSGD apply (bounds its temporaries)


def can_batch(it: Item) -> bool:
    """Whether an item's update may join a foreach batch of this module: F(R) not decided by a
    sign vote already, float32 data (one dtype per foreach list), not empty. Each kind decides
    which batch (``apply`` of ``optim.kinds``)."""
    return not it.free_done and it.view.data.dtype == torch.float32 and it.view.data.numel() > 0


def apply_free_batch(batch: list[tuple[Item, str, float]], lr: float) -> None:
    """W += -lr * scale * F(G) over many tensors with foreach kernels; the temporaries of
    signSGD are bounded to ``FREE_CHUNK`` elements at a time."""
    by_key: dict[tuple[str, float], list[Item]] = {}
    for it, rule, scale in batch:
        if rule != "none":
            by_key.setdefault((rule, scale), []).append(it)
    for (rule, scale), its in by_key.items():
        alpha = -lr * scale
        for chunk in _chunks(its):
            data = [c.view.data for c in chunk]
            grads = [
                _param_shaped(c, c.g) if c.kind.matrix_grad else _shaped(c.g, c.view.data)
                for c in chunk
            ]
            if rule == "signsgd":
                torch._foreach_add_(data, torch._foreach_sign(grads), alpha=alpha)
            else:
                torch._foreach_add_(data, grads, alpha=alpha)


def apply_coordinate_batch(its: list[Item], lr: float, s_p: float, s_i: float) -> None:
    """W += -lr s_p D with D = U on the selected coordinates and s_i sign(G) elsewhere, for many
    coordinate items at once: one foreach sign (and scale), one ``index_copy_`` of U per item,
    one foreach add. Temporaries are bounded to ``FREE_CHUNK`` elements at a time."""
    for chunk in _chunks(its):
        full = torch._foreach_sign([it.g for it in chunk])
        if s_i != 1.0:
            torch._foreach_mul_(full, s_i)
        for it, f in zip(chunk, full):
            it.sel.scatter_(f, it.u)  # selected: up(U); others: s_i F(R)
            it.free = it.u = it.g_sf = None
        directions = [_param_shaped(it, f) for it, f in zip(chunk, full)]
        torch._foreach_add_([it.view.data for it in chunk], directions, alpha=-lr * s_p)


def apply_projection_batch(its: list[Item], lr: float, s_p: float, s_i: float) -> None:
    """W += -lr s_p (s_i sign(G - up(G_sf)) + up(U)) for many projection items: the two GEMMs
    per item (residual, ``up_add_``) stay per tensor, the sign and the update are one foreach
    op each. Temporaries are bounded to ``FREE_CHUNK`` elements at a time."""
    for chunk in _chunks(its):
        full = [it.sel.residual(it.g, it.g_sf) for it in chunk]
        torch._foreach_sign_(full)
        for it, f in zip(chunk, full):
            it.sel.up_add_(f, it.u, beta=s_i)  # s_i F(R) + up(U), in place in F(R)'s buffer
            it.free = it.u = it.g_sf = None
        directions = [_param_shaped(it, f) for it, f in zip(chunk, full)]
        torch._foreach_add_([it.view.data for it in chunk], directions, alpha=-lr * s_p)


def _chunks(its: list[Item]) -> list[list[Item]]:
    """``its`` cut into consecutive runs of at least ``FREE_CHUNK`` elements (the last: less)."""
    out: list[list[Item]] = []
    chunk: list[Item] = []
    size = 0
    for it in its:
        chunk.append(it)
        size += it.view.data.numel()
        if size >= FREE_CHUNK:
            out.append(chunk)
            chunk, size = [], 0
    if chunk:
        out.append(chunk)
    return out


def device_steps(its: list[Item], mirrors: dict[str, list]) -> list[Tensor]:
    """State-full step counts as tensors on the data's device for the fused kernel.

    The counters of record stay float32 CPU tensors (``sf_step``, never read from the
    device); a CUDA mirror per parameter is kept equal to them by one foreach increment per
    step, and rebuilt (``torch.full``, no sync) whenever it does not hold the previous count.
    """
    out: list[Tensor] = []
    bump: list[Tensor] = []
    for it in its:
        st = it.st["sf_step"]
        if it.view.data.device.type == "cpu":
            out.append(st)
            continue
        t = it.sf_t  # read from the CPU counter in the plan phase: no device sync
        cached = mirrors.get(it.name)
        if cached is not None and cached[1] == t - 1 and cached[0].device == it.g.device:
            bump.append(cached[0])
            cached[1] = t
        else:
            cached = [torch.full((), float(t), dtype=torch.float32, device=it.g.device), t]
            mirrors[it.name] = cached
        out.append(cached[0])
    if bump:
        torch._foreach_add_(bump, 1.0)
    return out


def apply_fused(
    its: list[Item], lr: float, wd: float, group: dict, mirrors: dict[str, list]
) -> None:
    """``torch._fused_adamw_``: one kernel reads W, G, m, v and writes W, m, v (decoupled
    weight decay included). Active blocks use lr * s_p and wd / s_p (same product lr * wd)."""
    by_scale: dict[float, list[Item]] = {}
    for it in its:
        scale = it.kind.lr_scale(group)
        by_scale.setdefault(scale, []).append(it)
    b1, b2 = group["betas"]
    for scale, sub in by_scale.items():
        torch._fused_adamw_(
            [it.view.data for it in sub],
            [_shaped(it.g, it.view.data) for it in sub],
            [it.st["exp_avg"] for it in sub],
            [it.st["exp_avg_sq"] for it in sub],
            [],
            device_steps(sub, mirrors),
            lr=lr * scale, beta1=b1, beta2=b2, weight_decay=wd / scale, eps=group["eps"],
            amsgrad=False, maximize=False,
        )  # fmt: skip


def _shaped(g: Tensor, like: Tensor) -> Tensor:
    """``g`` viewed with ``like``'s shape (itself when it already has it: no view op)."""
    return g if g.shape == like.shape else g.reshape(like.shape)


def _param_shaped(it: Item, local: Tensor) -> Tensor:
    """``it.span.unpad(local)`` shaped like the parameter data (no view op for a whole tensor
    whose local matrix already has its shape)."""
    data = it.view.data
    if it.span.is_full and local.shape == data.shape:
        return local
    return _shaped(it.span.unpad(local), data)


def local_matrix(view, g: Tensor) -> Tensor:
    """``view.span.pad(g.reshape(-1))``, skipping both views when ``g`` is already the whole
    (m, n) matrix."""
    span = view.span
    if span.is_full and g.dim() == 2 and g.shape[0] == span.m and g.shape[1] == span.n:
        return g
    return span.pad(g.reshape(-1))
