"""Projection items batched by (shape, side, rank) through ``kernels.projection``.

For B whole matrices of one shape and side with bases of rank r (``project_down`` /
``apply_projection``, see ``frugal_dist.kernels.projection``):

    down:   X = down(G)  for the batch  (B, m, r) right / (B, r, n) left      G_sf of each item
    apply:  W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(G - up(X)))            decay folded

``proj_precision`` (a group option) sets the precision of these GEMMs: ``fp32`` (IEEE float32),
``tf32`` (TF32 tensor cores on CUDA; on the CPU the same as fp32) or ``bf16`` (bfloat16 operands,
float32 accumulation). Backends: ``triton`` (the fused apply kernel: reads G and W, writes W, no
temporaries) on CUDA when the kernels option allows Triton and the precision is tf32 / bf16 (the
Triton fp32 apply measured slower than ``bmm``); ``bmm`` on other CUDA runs; on the CPU the
pre-kernel per-item path stays (bit-identical) unless ``proj_precision="bf16"`` (``torch``
backend: per-matrix bfloat16 GEMMs) or ``kernels="triton"`` (interpreter tests).

Which items: projection items with r > 0 of whole (unsharded) float32 contiguous matrices whose
G_sf is not precomputed by the sign vote. Fragments (flat ZeRO layouts, FSDP rows), other dtypes
and rho = 0 keep the per-item path of ``kinds.projection``, whose CUDA GEMMs run at the group's
precision too (``gemm_precision``; ``bf16`` as TF32 there). Communication: none.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from frugal_dist.kernels.elementwise import triton_available
from frugal_dist.kernels.projection import apply_projection, matmul_precision, project_down
from frugal_dist.optim.step_items import Item


def projection_backend(it: Item, kernels: str) -> str | None:
    """The ``kernels.projection`` backend for this projection item, or None: the per-item
    path."""
    if it.sel is None or it.free_done or it.sel.rank == 0:
        return None
    data = it.view.data
    if not it.span.is_full or data.dtype != torch.float32 or not data.is_contiguous():
        return None
    if data.numel() == 0:
        return None
    precision = it.group["proj_precision"]
    if kernels == "triton":
        return "triton"
    if data.device.type == "cuda":
        if kernels == "auto" and precision != "fp32" and triton_available():
            return "triton"
        return "bmm"
    return "torch" if precision == "bf16" else None


def gemm_precision(
    group: dict[str, Any], device: torch.device
) -> contextlib.AbstractContextManager:
    """For the per-item path of a projection group (``kinds.projection``): CUDA float32
    matmuls at its ``proj_precision`` (``bf16`` runs as TF32 there: fragments keep float32
    operands); a no-op elsewhere (CPU matmuls are IEEE float32 either way)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return matmul_precision(group["proj_precision"])


def _key(it: Item, backend: str) -> tuple:
    return (backend, tuple(it.g.shape), it.sel.side, it.sel.rank)


def batches(its: list[Item], kernels: str) -> list[tuple[str, list[Item]]]:
    """(backend, items) per (backend, shape, side, rank), in first-appearance order."""
    out: dict[tuple, list[Item]] = {}
    for it in its:
        backend = projection_backend(it, kernels)
        if backend is not None:
            out.setdefault(_key(it, backend), []).append(it)
    return [(key[0], sub) for key, sub in out.items()]


def stacked(tensors: list[Tensor], cache: dict[Any, tuple[list[Tensor], Tensor]] | None = None,
            key: Any = None) -> Tensor:  # fmt: skip
    """The (B, ...) stack of same-shape ``tensors`` without a copy when they are the
    consecutive slices of one tensor; else ``torch.stack`` (kept in ``cache[key]`` while the
    very same tensors come back: bases, between refreshes)."""
    base = tensors[0]._base
    if (
        base is not None
        and base.dim() == tensors[0].dim() + 1
        and base.shape[0] == len(tensors)
        and base.is_contiguous()
        and all(
            t._base is base
            and t.shape == base.shape[1:]
            and t.storage_offset() == base.storage_offset() + b * base.stride(0)
            for b, t in enumerate(tensors)
        )
    ):
        return base
    if cache is not None:
        hit = cache.get(key)
        if (
            hit is not None
            and len(hit[0]) == len(tensors)
            and all(a is b for a, b in zip(hit[0], tensors))
        ):
            return hit[1]
    out = torch.stack(tensors)
    if cache is not None:
        cache[key] = (list(tensors), out)
    return out


def down_batched(its: list[Item], kernels: str, cache: dict) -> set[int]:
    """G_sf = down(G) of every batchable item, one ``project_down`` per batch; returns the ids of
    the items done (their ``g_sf`` are views of the batch result)."""
    done: set[int] = set()
    for backend, sub in batches(its, kernels):
        group = sub[0].group
        bases = stacked([it.sel.basis for it in sub], cache, ("bases", id(group), _key(sub[0], "")))
        X = project_down([it.g for it in sub], bases, sub[0].sel.side,
                         precision=group["proj_precision"], backend=backend)  # fmt: skip
        for it, x in zip(sub, X.unbind(0)):
            it.g_sf = x
            done.add(id(it))
    return done


def apply_batched(its: list[Item], lr: float, wd: float, kernels: str, cache: dict) -> None:
    """W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(R)) for items ``projection_backend`` accepts
    (their G_sf from ``down_batched`` or the per-item down, U from the state / exchange phase);
    one ``apply_projection`` per batch, decay folded."""
    for backend, sub in batches(its, kernels):
        group = sub[0].group
        bases = stacked([it.sel.basis for it in sub], cache, ("bases", id(group), _key(sub[0], "")))
        apply_projection(
            [it.view.data for it in sub], [it.g for it in sub], bases,
            stacked([it.g_sf for it in sub]), stacked([it.u for it in sub]), sub[0].sel.side,
            lr=lr, weight_decay=wd, s_p=group["proj_params_lr_scale"],
            s_i=group["inactive_lr_scale"], rule=group["state_free"],
            precision=group["proj_precision"], backend=backend,
        )  # fmt: skip
        for it in sub:
            it.free = it.u = it.g_sf = None
