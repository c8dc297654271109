"""The fused AdamW state phase of the batched projection step (one Triton launch per batch).

For B same-shape compact gradients X_b = down(G_b) (a x c: (m, r) right, (r, n) left), with the
per-matrix moments m_b, v_b (contiguous float32 (a, c) tensors, the optimizer state) and the
state-full step count t_b of each matrix:

    m_b <- m_b + (1 - b1) (X_b - m_b)                         (torch's lerp; the b1 < 0.5 form)
    v_b <- b2 v_b + ((1 - b2) X_b) X_b
    U_b  = (m_b / (sqrt(v_b) / sqrt(1 - b2^t_b) + eps)) / (1 - b1^t_b)

that is ``core.rules.state_full_directions("adamw", ...)`` (the oracle; the CPU path), with the
two per-matrix bias-correction divisions as multiplications by their float32 reciprocals (as
``kernels.elementwise_triton``: one IEEE division and one IEEE square root per entry remain).

One pass: reads X, m, v and writes m, v, U -- 24 bytes per float32 entry (22 with a bfloat16 U,
+2 for the optional bfloat16 copy of X that the bf16 apply reads), against ~9 foreach passes of
the torch path. X and U are stacked (B, a, c) tensors of any
strides (the apply kernel's layout: a ``left`` batch keeps X and U as (B, c, a) storage, the
K-contiguous tiles that TF32 tensor-core products need), so U is written where and in the dtype
(float32, or bfloat16 for ``proj_precision="bf16"``) the apply reads it: no transpose, cast or
stacking copy. The moments are reached through a table of B device addresses (they are separate
state tensors). Tiles are 2-D (``BA`` x ``BC``) so that differently ordered X / U and m / v
layouts meet in registers. A table's addresses are unknown to the compiler (4-byte alignment
assumed: scalar accesses), so when the host has checked that every m / v address is a multiple
of 16 bytes and their rows a multiple of 4 entries (``vector_moments``), ``ALIGNED`` says so and
m, v move in 16-byte vectors like X and U (sm_90 PTX: tests/unit/test_projection_state_compile.py;
no bit changes). LLaMA-1B's (r, 5461) left batch has odd rows: scalar moments there.

Needs triton (CUDA, or ``TRITON_INTERPRET=1`` on the CPU for tests). Communication: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from itertools import chain
from operator import or_
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from frugal_dist.kernels.elementwise_triton import (
    adam_corrections,
    adam_scalars,
    adamw_direction,
    clipped,
    exact_products,
    launch_device,
    upload,
)
from frugal_dist.kernels.projection_apply_v2 import cdiv
from frugal_dist.kernels.projection_triton import addresses

_DATA_PTR = Tensor.data_ptr

# (rows, columns) of one program's tile and its warps: 2048 entries, 8 per thread at 8 warps.
# Candidates for the lead's sweep (benchmarks/kernels_projection.py times the kernel).
TILE_A = 32
TILE_C = 64
NUM_WARPS = 8
_U_ELEM = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


@triton.jit
def _adamw_state_kernel(
    m_addrs, v_addrs, coef, x_ptr, u_ptr, xo_ptr,
    A, C,
    s_xb, s_xa, s_xc, s_ub, s_ua, s_uc, s_ob, s_oa, s_oc,
    ibc1_all, ibc2s_all, w1, one_minus_w1, b2, w2, eps, clip,
    PER_ITEM: tl.constexpr, LERP_HIGH: tl.constexpr, U_ELEM: tl.constexpr,
    COPY_X: tl.constexpr, XO_ELEM: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr,
    CLIP: tl.constexpr, EXACT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Grid (tiles of one (A, C) matrix, B). ``coef``: per-matrix (1/bc1, 1/bc2s) float64 pairs
    when ``PER_ITEM`` (step counts differ), else the scalars ``ibc*_all``. ``COPY_X``: also
    write X to ``xo_ptr`` (the apply kernel's operand copy, unscaled). ``CLIP``: the moments
    read c X (c = *clip, a pending clip's coefficient). ``ALIGNED``: every m / v address is a
    multiple of 16 bytes and C of 4 (host-checked, ``vector_moments``), so their rows move in
    16-byte vectors (the table's addresses are otherwise assumed 4-byte aligned: scalars)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_c = tl.cdiv(C, BC)
    ra = (pid // tiles_c) * BA + tl.arange(0, BA)
    rc = (pid % tiles_c) * BC + tl.arange(0, BC)
    mask = (ra < A)[:, None] & (rc < C)[None, :]
    m_ptr = tl.load(m_addrs + b).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_addrs + b).to(tl.pointer_type(tl.float32))
    if PER_ITEM:
        ibc1 = tl.load(coef + 2 * b).to(tl.float32)
        ibc2s = tl.load(coef + 2 * b + 1).to(tl.float32)
    else:
        ibc1 = ibc1_all
        ibc2s = ibc2s_all
    offs = ra[:, None] * C + rc[None, :]  # the moments are contiguous (A, C)
    mv_mask = mask
    if ALIGNED:  # groups of 4 along C start 16-byte aligned and are masked alike
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        offs = tl.multiple_of(offs, [1, 4])
        # a mask op of its own: the hint's 1 along A must not reach X's and U's mask
        mv_mask = tl.max_constancy((rc < C)[None, :] & (ra < A)[:, None], [1, 4])
    x = tl.load(x_ptr + b * s_xb + ra[:, None] * s_xa + rc[None, :] * s_xc, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mv_mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mv_mask, other=0.0)
    xs = x
    if CLIP:
        xs = clipped(x, clip, False, tl.float32, EXACT)
    m, v, d = adamw_direction(xs, m, v, w1, one_minus_w1, b2, w2, eps, ibc1, ibc2s, LERP_HIGH)
    tl.store(m_ptr + offs, m, mask=mv_mask)
    tl.store(v_ptr + offs, v, mask=mv_mask)
    tl.store(u_ptr + b * s_ub + ra[:, None] * s_ua + rc[None, :] * s_uc, d.to(U_ELEM), mask=mask)
    if COPY_X:
        xo = xo_ptr + b * s_ob + ra[:, None] * s_oa + rc[None, :] * s_oc
        tl.store(xo, x.to(XO_ELEM), mask=mask)


def vector_moments(
    exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], C: int, ors: int | None = None
) -> bool:
    """Whether the kernel may move the moments in 16-byte vectors (its ``ALIGNED``): every
    address a multiple of 16 bytes and rows of a multiple of 4 float32 entries, so each aligned
    group of 4 along a row starts on a 16-byte boundary. (X and U are tensor arguments: Triton
    specialises their pointers and strides on divisibility by 16 itself.) ``ors``: the bitwise
    OR of every moment's address when the caller has it (``projection_triton.addresses``
    caches it with the address tables: no pass over the addresses here)."""
    if C % 4:
        return False
    if ors is None:
        ors = reduce(or_, map(_DATA_PTR, chain(exp_avgs, exp_avg_sqs)), 0)
    return ors & 15 == 0


class Moments(NamedTuple):
    """B matrices' AdamW moments checked once, with their address tables (``moments``): what
    ``adamw_state`` takes where the very same moments come back at every step (the step plan's
    batches, ``optim.projection_batch``: state tensors are replaced only at refreshes and loads,
    which drop the plan), so such a step makes no per-moment check, ``data_ptr`` or lookup. It
    holds the tensors, so their addresses stay theirs while it lives."""

    exp_avgs: tuple[Tensor, ...]
    exp_avg_sqs: tuple[Tensor, ...]
    entries: int  # a*c, of every moment
    m_table: Tensor  # int64 addresses on the moments' device (``projection_triton.addresses``)
    v_table: Tensor
    ors: int  # the bitwise OR of every address (``vector_moments``)


def moments(exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], entries: int) -> Moments:
    """``Moments`` of B matrices of ``entries`` entries each: every one a contiguous float32
    tensor of that many entries (a clear error naming the first that is not); a host-to-device
    copy of two B-entry address tables where they are not cached. Communication: none."""
    if len(exp_avgs) != len(exp_avg_sqs) or not exp_avgs:
        raise ValueError(f"exp_avg and exp_avg_sq must list the same B >= 1 matrices, got "
                         f"{len(exp_avgs)} and {len(exp_avg_sqs)}")  # fmt: skip
    for what, ts in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)):
        for i, t in enumerate(ts):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != entries:
                raise ValueError(f"{what}[{i}] must be a contiguous float32 tensor of {entries} "
                                 f"entries, got {t.dtype} {tuple(t.shape)}")  # fmt: skip
    (m_table, m_or), (v_table, v_or) = addresses(exp_avgs), addresses(exp_avg_sqs)
    return Moments(tuple(exp_avgs), tuple(exp_avg_sqs), entries, m_table, v_table, m_or | v_or)


def adamw_state(
    x: Tensor,
    exp_avgs: Sequence[Tensor] | Moments,
    exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[int],
    betas: tuple[float, float],
    eps: float,
    out: Tensor,
    x_copy: Tensor | None = None,
    clip: Tensor | None = None,
) -> Tensor:
    """One AdamW step of B compact gradients (module docstring), in one launch: ``exp_avgs`` /
    ``exp_avg_sqs`` (contiguous float32, a*c entries each) advance in place; U goes to ``out``.
    ``exp_avgs`` may instead be the ``Moments`` of both (``exp_avg_sqs`` then None): checked and
    tabled once by ``moments``, only their count and size are compared here.

    ``x``: (B, a, c) float32, any strides; ``out``: (B, a, c) float32 or bfloat16, any strides
    (not overlapping ``x``); ``steps``: each matrix's state-full count after this step (>= 1).
    ``x_copy``: optional (B, a, c) float32 / bfloat16 tensor, any strides, that receives x (the
    apply kernel's bfloat16 operand: +2 B per entry here instead of a separate cast pass).
    ``clip``: a pending clip's 0-d coefficient c on x's device (``optim.clipping``): the moments
    advance with c x (Z = P^T G is linear in G), ``x_copy`` keeps x (the residual's operand).
    Memory traffic: 4 B (x) + 16 B (m, v read and written) + 4 or 2 B (U) per entry; the tables
    are cached by address with their alignment (``projection_triton.addresses``).
    Communication: none."""
    B, A, C = x.shape
    for what, t in (("out", out), ("x_copy", x_copy)):
        if t is not None and (t.shape != x.shape or t.dtype not in _U_ELEM):
            raise ValueError(f"{what} must be a float32 / bfloat16 tensor shaped like x "
                             f"{tuple(x.shape)}, got {t.dtype} {tuple(t.shape)}")  # fmt: skip
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if isinstance(exp_avgs, Moments):
        mo = exp_avgs
        if exp_avg_sqs is not None:
            raise ValueError("exp_avg_sqs must be None when exp_avgs is a Moments (it has both)")
        if mo.entries != A * C and B > 0:
            raise ValueError(f"the moments have {mo.entries} entries each, x's matrices {A}x{C}")
    elif exp_avg_sqs is None:
        raise ValueError("exp_avg_sqs is needed with a list of exp_avgs (or pass Moments)")
    else:
        mo = None
    n_m = len(exp_avgs if mo is None else mo.exp_avgs)
    n_v = len(exp_avg_sqs if mo is None else mo.exp_avg_sqs)
    if not (n_m == n_v == len(steps) == B):
        raise ValueError(f"{B} compact gradients need {B} exp_avg, exp_avg_sq and steps, got "
                         f"{n_m}, {n_v} and {len(steps)}")  # fmt: skip
    if B == 0:
        return out
    if mo is None:
        mo = moments(exp_avgs, exp_avg_sqs, A * C)
    if A * C == 0:
        return out
    b1, b2 = betas
    first = steps[0]
    per_item = any(t != first for t in steps)
    if per_item:
        coef = upload([bits for t in steps for bits in adam_corrections(t, b1, b2)], x.device)
        coef = coef.view(torch.float64)
        ibc1 = ibc2s = 1.0
    else:
        coef = x  # unused
        ibc1, ibc2s = (1.0 / (1.0 - b1**first), 1.0 / (1.0 - b2**first) ** 0.5)
    xo = out if x_copy is None else x_copy  # unused without a copy
    aligned = vector_moments(mo.exp_avgs, mo.exp_avg_sqs, C, mo.ors)
    grid = (cdiv(A, TILE_A) * cdiv(C, TILE_C), B)
    with launch_device(x.device):
        _adamw_state_kernel[grid](
            mo.m_table, mo.v_table, coef, x, out, xo, A, C,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            xo.stride(0), xo.stride(1), xo.stride(2),
            ibc1, ibc2s, **adam_scalars(tuple(betas), eps), clip=x if clip is None else clip,
            PER_ITEM=per_item, U_ELEM=_U_ELEM[out.dtype], COPY_X=x_copy is not None,
            XO_ELEM=_U_ELEM[xo.dtype], BA=TILE_A, BC=TILE_C, CLIP=clip is not None,
            EXACT=exact_products(x.device), ALIGNED=aligned, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out
