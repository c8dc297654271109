"""Projection items batched by (shape, side, rank) through ``kernels.projection``.

For B whole matrices of one shape and side with bases of rank r (``project_down`` /
``apply_projection``, see ``frugal_dist.kernels.projection``):

    down:   X = down(G)  for the batch  (B, m, r) right / (B, r, n) left      G_sf of each item
    state:  m <- lerp(m, X, 1 - b1);  v <- b2 v + (1 - b2) X^2                AdamW groups
            U = (m / (sqrt(v) / sqrt(1 - b2^t) + eps)) / (1 - b1^t)          (``state_batched``)
    apply:  W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(G - up(X)))            decay folded

Every operand is laid out once: the bases are stacked once per refresh in the products' dtype
and held once (``operand_bases``); X is the down product's (B, ...) result, used through views
(``stacked`` makes no copy of a batch's rows); the state kernel (``kernels.projection_state``:
reads X, m, v, writes m, v, U -- 24 B per compact entry, one launch per batch) writes U -- and,
for bf16, X's bfloat16 copy -- in the layout and dtype the apply kernel reads. A steady bf16 step
is then three Triton launches per batch and no copies; tf32 still stacks G for its ``bmm`` down
(``projection_tiles.json``: ``down_backend``).

On the step plan's steps (``memo``, ``StepContext.batch_memo``) the batches and what is fixed about
them between refreshes (``ProjBatch``: items, parameters, precision, operand bases, moments) are
listed once per plan, and each phase hands its (B, ...) result to the next (``_stash``) instead of
the items' rows being checked and re-stacked: no per-item ``projection_backend`` / ``stacked`` /
basis comparison per step. Once a plan step has shown that a batch's down, state and apply all
ran batched -- the state kernel took X from the down phase's stash and the apply kernel took U
(and X) from the state phase's -- its ids are remembered (``DIRECT``): on the plan's later
steps its phases hand over only the (B, ...) results, with no per-item rows at all (no
``unbind``, no ``Item.g_sf`` / ``u`` / ``g_sf_op`` assignment, nothing to ``release``). The
plan's routes, options and items are fixed until it is dropped, so every later step takes the
same batched path.

``proj_precision`` (a group option) sets the precision of these GEMMs: ``fp32`` (IEEE float32),
``tf32`` (TF32 tensor cores on CUDA; on the CPU the same as fp32) or ``bf16`` (bfloat16 operands,
float32 accumulation). Backends: ``triton`` (the fused apply kernel: reads G and W, writes W, no
temporaries) on CUDA when the kernels option allows Triton and the precision is tf32 / bf16 (the
Triton fp32 apply measured slower than ``bmm``); ``bmm`` on other CUDA runs; on the CPU the
pre-kernel per-item path stays (bit-identical) unless ``proj_precision="bf16"`` (``torch``
backend: per-matrix bfloat16 GEMMs) or ``kernels="triton"`` (interpreter tests).

Which items: projection items with r > 0 of whole (unsharded) float32 contiguous matrices whose
G_sf is not precomputed by the sign vote, in groups with an elementwise state-free rule (not
``state_free="swan"``, whose F needs the whole matrix: ``optim.matrix_free``);
``free_scale="matched"`` groups only with a ``signsgd`` / ``none`` residual and the ``triton``
backend (at every precision, fp32 included: the device scale lives in the Triton apply,
``kernels.projection_matched``), and not on fragments (``kinds.projection.route``). Fragments
(flat ZeRO layouts, FSDP rows), other dtypes and rho = 0 keep the per-item path of
``kinds.projection``, whose CUDA GEMMs run at the group's precision too (``gemm_precision``;
``bf16`` as TF32 there). Communication: none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugal_dist.core.rules import MATRIX_FREE_RULES
from frugal_dist.kernels.elementwise import triton_available
from frugal_dist.kernels.projection import (
    ParamBatch,
    apply_projection,
    matmul_precision,
    project_down,
)
from frugal_dist.optim.free_scale import matched
from frugal_dist.optim.step_items import Item

if TYPE_CHECKING:  # triton is optional: kernels.projection_state imports it
    from frugal_dist.kernels.projection_state import Moments


def projection_backend(it: Item, kernels: str) -> str | None:
    """The ``kernels.projection`` backend for this projection item, or None: the per-item
    path."""
    if it.sel is None or it.free_done or it.sel.rank == 0:
        return None
    if it.group["state_free"] in MATRIX_FREE_RULES:
        return None  # swan: F of the whole matrix, the per-item path (optim.matrix_free)
    data = it.view.data
    if not it.span.is_full or data.dtype != torch.float32 or not data.is_contiguous():
        return None
    if data.numel() == 0:
        return None
    if matched(it.group):  # the Triton apply scales per matrix on the device, at every precision
        if it.group["state_free"] not in ("signsgd", "none"):
            return None  # sgd: sum R^2 is needed before the apply (optim.free_scale)
        cuda_auto = kernels == "auto" and data.device.type == "cuda" and triton_available()
        return "triton" if kernels == "triton" or cuda_auto else None
    precision = group_precision(it.group, data.device)
    if kernels == "triton":
        return "triton"
    if data.device.type == "cuda":
        if kernels == "auto" and precision != "fp32" and triton_available():
            return "triton"
        return "bmm"
    return "torch" if precision == "bf16" else None


def group_precision(group: dict[str, Any], device: torch.device) -> str:
    """The group's ``proj_precision`` on ``device``: ``auto`` (the default) is ``bf16`` on CUDA
    (the 60M quality guard: within the seed spread of tf32 and of the exact fp32 path,
    benchmarks/results/quality_60m_guard_bf16/) and ``fp32`` elsewhere (CPU matmuls are IEEE
    float32 for tf32 too, so CPU results are those of the pre-kernel step)."""
    precision = group["proj_precision"]
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def gemm_precision(
    group: dict[str, Any], device: torch.device
) -> contextlib.AbstractContextManager:
    """For the per-item path of a projection group (``kinds.projection``): CUDA float32
    matmuls at its ``proj_precision`` (``bf16`` runs as TF32 there: fragments keep float32
    operands); a no-op elsewhere (CPU matmuls are IEEE float32 either way)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return matmul_precision(group_precision(group, device))


def _key(it: Item, backend: str) -> tuple:
    return (backend, tuple(it.g.shape), it.sel.side, it.sel.rank)


STASH = "stash"  # ``memo`` key of this step's batch results (``_stash``)
DIRECT = "direct"  # ``memo`` key of the batch ids whose phases pass no per-item rows


@dataclass(eq=False)
class ProjBatch:
    """One (backend, shape, side, rank) batch of projection items and what is fixed about it
    between refreshes: the first item's group (its precision and scales), the parameters and,
    on plan steps (``memo``), the operand bases once built."""

    backend: str
    items: list[Item]
    group: dict[str, Any]
    precision: str
    ids: tuple[int, ...]  # the items' identities: the key of the per-step results in ``memo``
    params: ParamBatch  # checked, with their address table, once per batch (once per plan)
    bases: Tensor | None = None
    moments: Moments | None = None


def batches(its: list[Item], kernels: str, memo: dict | None = None) -> list[ProjBatch]:
    """The batches per (backend, shape, side, rank), in first-appearance order.

    ``memo``: the step plan's (``StepContext.batch_memo``; None on full steps), kept while the
    plan lives: the plan's item lists are the same list objects every step and hold their
    items, so the batches of a list are computed once per plan, not per step."""
    if memo is not None:
        hit = memo.get(id(its))
        if hit is not None and hit[0] is its:
            return hit[1]
    out: dict[tuple, list[Item]] = {}
    for it in its:
        backend = projection_backend(it, kernels)
        if backend is not None:
            out.setdefault(_key(it, backend), []).append(it)
    found = []
    for key, sub in out.items():
        group, params = sub[0].group, ParamBatch([it.view.data for it in sub])
        found.append(ProjBatch(key[0], sub, group, group_precision(group, sub[0].g.device),
                               tuple(map(id, sub)), params))  # fmt: skip
    if memo is not None:
        memo[id(its)] = (its, found)
    return found


def _batch_bases(b: ProjBatch, cache: dict, memo: dict | None) -> Tensor:
    """``operand_bases`` of the batch; on plan steps looked up once per plan (the bases do not
    change before the next refresh, which drops the plan)."""
    if memo is None:
        return operand_bases(b.items, cache)
    if b.bases is None:
        b.bases = operand_bases(b.items, cache)
    return b.bases


def _stash(memo: dict | None, what: str, b: ProjBatch, value: Tensor | None,
           rows: list | None) -> None:  # fmt: skip
    """On plan steps, remember a batch result (``value``) of this step for a later phase, with
    its first and last row views as handed to the items (checked by ``_stashed``; ``rows``
    None: a ``_direct`` batch, none handed out). Dropped when the batch's apply is done
    (``_unstash``) or, at the latest, at the end of the plan step."""
    if memo is not None:
        first, last = (None, None) if rows is None else (rows[0], rows[-1])
        memo.setdefault(STASH, {})[(what, b.ids)] = (value, first, last)


def _stashed(memo: dict | None, what: str, b: ProjBatch, rows: list) -> Tensor | None:
    """The batch result ``_stash`` kept this step if ``rows`` (the items' current views) are
    exactly its rows (same batch, same step), else None (``stacked`` then lays them out)."""
    hit = None if memo is None else memo.get(STASH, {}).get((what, b.ids))
    if hit is None or hit[1] is not rows[0] or hit[2] is not rows[-1]:
        return None
    return hit[0]


def _direct(memo: dict | None, b: ProjBatch) -> bool:
    """Whether this plan step's phases of ``b`` pass their results through the stash only (no
    per-item rows): a previous step of the plan ran all three of them batched (module
    docstring)."""
    return memo is not None and b.ids in memo.get(DIRECT, ())


def _taken(memo: dict, what: str, b: ProjBatch) -> Tensor | None:
    """A ``_direct`` batch's result of this step (None: not made, e.g. no bfloat16 copy)."""
    hit = memo.get(STASH, {}).get((what, b.ids))
    return None if hit is None else hit[0]


def _unstash(memo: dict | None, b: ProjBatch) -> None:
    """Forget the batch's results (its update is applied): their memory goes now, as the
    items' rows do."""
    if memo is not None:
        stash = memo.get(STASH, {})
        for what in ("g_sf", "u", "g_sf_op"):
            stash.pop((what, b.ids), None)


def stacked(tensors: list[Tensor]) -> Tensor:
    """The (B, ...) stack of same-shape ``tensors``: a view, without a copy, when they are
    equally spaced non-overlapping slices of one storage with one layout (the rows of a batch
    result, whatever its strides), else ``torch.stack``."""
    t0 = tensors[0]
    if len(tensors) == 1:
        return t0.unsqueeze(0)
    root = t0._base if t0._base is not None else t0
    step = tensors[1].storage_offset() - t0.storage_offset()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t0.shape, t0.stride()))
    if step >= extent and all(
        (t._base if t._base is not None else t) is root
        and t.dtype == t0.dtype
        and t.shape == t0.shape
        and t.stride() == t0.stride()
        and t.storage_offset() == t0.storage_offset() + b * step
        for b, t in enumerate(tensors)
    ):
        return t0.as_strided((len(tensors), *t0.shape), (step, *t0.stride()), t0.storage_offset())
    return torch.stack(tensors)


def operand_bases(sub: list[Item], cache: dict) -> Tensor:
    """The batch's bases as one (B, dim, r) tensor in the products' operand dtype, built once
    per refresh and held once:

    * ``fp32`` / ``tf32``: the float32 stack *is* the bases -- each item's basis (its selection,
      and the svd ``proj_basis`` state) is rebound to its slice ``stack[b]``, so no second copy
      exists (``state_dict()`` then holds views of one buffer: ``torch.save`` writes it once,
      consolidated checkpoints and DCP write each view's own entries);
    * ``bf16``: a bfloat16 stack beside the float32 per-item bases (half their bytes), so the
      kernels read no float32 P and the step writes no per-step casts.

    ``cache[key]`` = (the per-item basis tensors, the stack), kept while the very same tensors
    come back (until the next refresh)."""
    group = sub[0].group
    key = ("bases", id(group), _key(sub[0], ""))
    bases = [it.sel.basis for it in sub]
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(bases) and all(a is b for a, b in zip(hit[0], bases)):
        return hit[1]
    cache.pop(key, None)  # the old stack goes before the new one is built
    full = stacked(bases)
    if group_precision(group, full.device) == "bf16":
        out = full.to(torch.bfloat16)
    else:
        out = full
        bases = list(full.unbind(0))
        for it, view in zip(sub, bases):
            if it.st.get("proj_basis") is it.sel.basis:
                it.st["proj_basis"] = view
            if it.gsel is not None and it.gsel is not it.sel and it.gsel.basis is it.sel.basis:
                it.gsel.basis = view
            it.sel.basis = view  # also the cached selection (``StepCache.selections``)
    cache[key] = (bases, out)
    return out


def down_batched(its: list[Item], kernels: str, cache: dict, memo: dict | None = None) -> set[int]:
    """G_sf = down(G) of every batchable item, one ``project_down`` per batch; returns the ids of
    the items done (their ``g_sf`` are views of the batch result). ``memo``: see ``batches``."""
    done: set[int] = set()
    for b in batches(its, kernels, memo):
        sub = b.items
        X = project_down([it.g for it in sub], _batch_bases(b, cache, memo), sub[0].sel.side,
                         precision=b.precision, backend=b.backend)  # fmt: skip
        if _direct(memo, b):
            _stash(memo, "g_sf", b, X, None)
        else:
            rows = X.unbind(0)
            for it, x in zip(sub, rows):
                it.g_sf = x
            _stash(memo, "g_sf", b, X, rows)
        done.update(b.ids)
    return done


def fused_state_usable(kernels: str, device: torch.device) -> bool:
    """Whether the state phase of batched projections runs as one Triton launch per batch
    (``kernels.projection_state``): CUDA with ``kernels`` allowing Triton, or ``"triton"``."""
    if kernels == "triton":
        return True
    return kernels == "auto" and device.type == "cuda" and triton_available()


def state_batched(
    its: list[Item], kernels: str, *, sharded: bool, memo: dict | None = None,
    clip: Tensor | None = None,
) -> set[int]:  # fmt: skip
    """U = AdamW(G_sf) of the batchable items of one group (``state_full="adamw"``), one
    ``adamw_state`` launch per batch (m, v advanced in place, U written once); returns the ids
    of the items done, the others keep the ``core.rules`` foreach path.

    U goes where the apply kernel reads it: a (B, ...) buffer (no stacking copy), for the
    ``triton`` backend in its operand dtype and, ``left``, stored (B, n, r); with ``bf16`` the
    kernel also writes G_sf's bfloat16 copy (``it.g_sf_op``). ``shard_state`` keeps U float32
    contiguous (it is broadcast to the other ranks). ``memo``: see ``batches`` (plan steps take
    X from the down phase's batch result, not from the rows). ``clip``: a pending clip's
    coefficient c, the moments advance with c G_sf (``optim.clipping``). Communication: none."""
    group = its[0].group
    if its[0].kind.rule(group) != "adamw" or not fused_state_usable(kernels, its[0].g.device):
        return set()
    from frugal_dist.kernels.projection_state import adamw_state

    done: set[int] = set()
    for b in batches(its, kernels, memo):
        sub = b.items
        direct = _direct(memo, b)
        moments = _moments(b, memo)
        if direct:
            assert memo is not None and moments is not None
            X = _taken(memo, "g_sf", b)
            if X is None:
                raise RuntimeError("projection_batch: a direct batch's down result is missing")
        else:
            xs = [it.g_sf for it in sub]
            if any(x is None for x in xs) or moments is None:
                continue
            X = _stashed(memo, "g_sf", b, xs)
            if X is None:
                X = stacked(xs)
        B, a, c = X.shape
        dev = X.device
        fast = b.backend == "triton" and not sharded
        precision = b.precision
        bf16 = fast and precision == "bf16"
        dt = torch.bfloat16 if bf16 else torch.float32
        # bf16: U and the operand copy of X are the two halves of one buffer, so the stacked
        # apply kernel's U - X offset is the same (B a c elements) at every step and refresh:
        # separate allocations give an offset that Triton specialises on (int32 / int64 range),
        # i.e. a recompilation whenever a new allocation lands in another class
        halves = 2 if bf16 else 1
        if fast and sub[0].sel.side == "left" and precision != "fp32":
            both = torch.empty(halves, B, c, a, device=dev, dtype=dt).mT
        else:
            both = torch.empty(halves, B, a, c, device=dev, dtype=dt)
        U = both[-1]
        X_op = both[0] if bf16 else None
        adamw_state(X, moments, None, [it.sf_t for it in sub], group["betas"], group["eps"], U,
                    X_op, clip=None if clip is None else clip.to(dev))  # fmt: skip
        done.update(b.ids)
        if direct:
            _stash(memo, "u", b, U, None)
            if X_op is not None:
                _stash(memo, "g_sf_op", b, X_op, None)
            continue
        rows = U.unbind(0)
        for it, u in zip(sub, rows):
            it.u = u
        _stash(memo, "u", b, U, rows)
        if X_op is not None:
            ops = X_op.unbind(0)
            for it, x in zip(sub, ops):
                it.g_sf_op = x
            _stash(memo, "g_sf_op", b, X_op, ops)
    return done


def _moments(b: ProjBatch, memo: dict | None) -> Moments | None:
    """The batch's AdamW moments, checked and with their address tables
    (``kernels.projection_state.moments``; None: some item has none yet); on plan steps made
    once per plan (state tensors are replaced only at refreshes and loads, which drop the plan):
    a plan step makes no per-moment check or address lookup."""
    if memo is not None and b.moments is not None:
        return b.moments
    sts = [it.st for it in b.items]
    if any("exp_avg" not in st for st in sts):
        return None
    from frugal_dist.kernels.projection_state import moments

    exp_avgs = [st["exp_avg"] for st in sts]
    # every moment as large as the first; ``adamw_state`` checks that size against X's
    found = moments(exp_avgs, [st["exp_avg_sq"] for st in sts], exp_avgs[0].numel())
    if memo is not None:
        b.moments = found
    return found


def apply_batched(
    its: list[Item], lr: float, wd: float, kernels: str, cache: dict, memo: dict | None = None
) -> None:
    """W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(R)) for items ``projection_backend`` accepts
    (their G_sf from ``down_batched`` or the per-item down, U from the state / exchange phase);
    one ``apply_projection`` per batch, decay folded. Operands already laid out by
    ``state_batched`` (U, the bfloat16 G_sf) are passed as they are. ``memo``: see
    ``batches``."""
    for b in batches(its, kernels, memo):
        sub, group = b.items, b.group
        direct = _direct(memo, b)
        if direct:
            assert memo is not None
            X = _taken(memo, "g_sf_op", b)
            X = _taken(memo, "g_sf", b) if X is None else X
            U = _taken(memo, "u", b)
            if X is None or U is None:
                raise RuntimeError("projection_batch: a direct batch's operands are missing")
        else:
            X = _operand(memo, b, "g_sf_op", [it.g_sf_op for it in sub])
            if X is None:
                X = _operand(memo, b, "g_sf", [it.g_sf for it in sub])
            U = _operand(memo, b, "u", [it.u for it in sub])
            if memo is not None and _all_stashed(memo, b, X, U):  # later steps: no rows
                memo.setdefault(DIRECT, set()).add(b.ids)
        apply_projection(
            b.params, [it.g for it in sub], _batch_bases(b, cache, memo), X,
            U, sub[0].sel.side,
            lr=lr, weight_decay=wd, s_p=group["proj_params_lr_scale"],
            s_i=group["inactive_lr_scale"], rule=group["state_free"],
            precision=b.precision, backend=b.backend, matched=matched(group),
        )  # fmt: skip
        if not direct:
            for it in sub:
                it.release()
        _unstash(memo, b)


def _all_stashed(memo: dict, b: ProjBatch, X: Tensor | None, U: Tensor | None) -> bool:
    """Whether this step's apply operands of ``b`` are the state phase's stashed results and
    that phase took X from the down phase's stash (its rows were not re-stacked): all three
    phases ran batched, so the plan's later steps need no per-item rows (``DIRECT``)."""
    stash = memo.get(STASH, {})
    down, u = stash.get(("g_sf", b.ids)), stash.get(("u", b.ids))
    op = stash.get(("g_sf_op", b.ids))
    if X is None or U is None or down is None or u is None or u[0] is not U:
        return False
    return X is down[0] or (op is not None and X is op[0])


def _operand(memo: dict | None, b: ProjBatch, what: str, rows: list) -> Tensor | None:
    """The (B, ...) operand of the items' ``rows`` (None if any is missing): this step's stashed
    batch result, else ``stacked``."""
    if any(x is None for x in rows):
        return None
    X = _stashed(memo, what, b, rows)
    return stacked(rows) if X is None else X
