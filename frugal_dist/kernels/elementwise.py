"""Fused elementwise apply kernels for FRUGAL's bandwidth-bound step paths.

Three in-place updates, each one pass over many tensors (Dion-style megabatches: the caller groups
tensors by dtype, and for coordinates by shape; nothing here loops over tensors on the device side):

* ``free_apply_``  -- the state-free update (signSGD / SGD groups, inactive blocks, rho = 0):

      p <- p (1 - decay) - alpha F(g),     F = sign (``signsgd``), identity (``sgd``), 0 (``none``)

  Triton: one kernel reads p and g and writes p (12 B per float32 parameter with float32 g,
  10 B with bf16 g); torch: ``_foreach_mul_`` then ``_foreach_add_(sign(g))`` in chunks (the
  signs are a temporary: 20 B per parameter).

* ``adamw_apply_`` -- AdamW on whole tensors (AdamW groups, active blocks), core.rules' equations:

      m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2                      (t = steps[i] >= 1)
      p <- p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)

  28 B per float32 parameter either way. ``impl="auto"`` uses the Triton kernel on CUDA
  (``ADAMW_AUTO``: it took 0.865x ``torch._fused_adamw_``'s time on an H200 at LLaMA-1B shapes,
  ``benchmarks/results/kernels_elementwise_cuda.json``; ``impl="torch"`` on CUDA is
  ``torch._fused_adamw_``) and ``core.rules``' foreach formulas on the CPU.

* ``coordinate_adamw_apply_`` -- a ``columns`` / ``rows`` coordinate subspace on whole matrices:

      U = AdamW(G[S]) on the compact moments m, v (shape (M, K) for columns, (K, N) for rows)
      W <- W (1 - decay) - lr scale D,   D = U on S,  free_scale F(G) elsewhere

  Triton: one kernel per same-shape batch reads W and G and writes W (12 B per entry), plus
  reads and writes m and v on the selected entries (16 B each), gathering through an int32
  column -> compact position map (``coordinate_positions``, built once per refresh). torch: the
  present path (gather, ``core.rules``, sign, ``index_copy_``, foreach add: ~5 passes).

Integration contract (how ``FRUGAL``'s apply phase calls these; what each replaces):

* weight decay moves *into* the kernels: the caller no longer runs the group-wide
  ``_foreach_mul_(data, 1 - lr wd)`` on the tensors it passes here, and passes ``decay = lr wd``
  (``adamw_apply_``: ``lr`` and ``weight_decay`` as ``torch._fused_adamw_`` takes them).
* ``free_apply_(data, grads, lr * scale, rule=rule, decay=lr * wd)`` replaces
  ``fast_apply.run_free`` (one call per (rule, scale); the scale is s_p s_i for inactive
  blocks, s_p for rho = 0, 1 for signSGD / SGD groups). Grads may be 16-bit; params of any
  float dtype (non-float32 ones take the torch path).
* ``adamw_apply_(data, grads, exp_avg, exp_avg_sq, steps, lr=lr * scale, weight_decay=wd / scale,
  ...)`` replaces ``fast_apply.run_fused``; ``steps`` are the host counts ``Item.sf_t`` (after
  this step), so no device step mirrors are needed (the CUDA torch path uploads them, no sync).
* ``coordinate_adamw_apply_`` replaces the state phase *and* ``apply_coordinate_batch`` for
  ``columns`` / ``rows`` items whose owner holds the state (``shard_state`` off or world 1), with
  a state-full rule ``adamw``, whole (unsharded) matrices and the whole reduced gradient
  (world 1 or ``residual_comm="exact"``; the sign vote's precomputed F(R) keeps the present
  path): the caller passes the full (M, N) gradient, not G_sf; ``positions`` are cached with
  the selection (one per refresh). ``randk``, fragments, other rules and sharded state keep the
  present path. Same for ``free_apply_``: items whose F(R) was precomputed by the sign vote
  (``Item.free_done``) are not passed to it.
* Tensors are plain local tensors (a DTensor's ``to_local()``, a flat shard's view), on one
  device. The Triton kernels write through data pointers: they do not bump autograd version
  counters (the optimizer's tensors are never saved for backward). CUDA calls never sync the
  host (tables go through pinned memory with non-blocking copies). The torch path (CPU, or
  ``impl="torch"``) rounds exactly as the present ``fast_apply`` code, so CPU results are
  bit-identical to today's. The Triton path follows the same order with IEEE division and
  square root, but may contract a multiply-add into one FMA and multiplies by reciprocals of
  the bias corrections (float32 last-bit differences, measured by the tests; none for signSGD
  without decay, where ``alpha * sign(g)`` is exact).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from frugal_dist.core.rules import state_full_directions

T = TypeVar("T")

IMPLS = ("auto", "torch", "triton")
FREE_RULES = ("signsgd", "sgd", "none")
AXES = ("columns", "rows")
ADAMW_AUTO = "triton"  # measured 0.865x torch._fused_adamw_ on an H200 at LLaMA-1B shapes
FREE_CHUNK = 1 << 25  # elements per torch-path foreach batch (bounds the sign temporaries)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)  # params updated through float32, rounded once


# ----------------------------------------------------------------------------------- dispatch
def triton_available() -> bool:
    """Whether ``import triton`` works (it is only imported when a kernel needs it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(impl: str, device: torch.device, auto_default: str = "triton") -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    on_device = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package; use impl='auto'")
        if not on_device:
            raise RuntimeError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)"
            )
        return True
    return auto_default == "triton" and device.type == "cuda" and triton_available()


use_triton = _use_triton  # public: other kernel modules dispatch the same way (``kernels.finite``)


def _check_lists(what: str, **lists: Sequence[Tensor]) -> int:
    sizes = {name: len(xs) for name, xs in lists.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{what}: lists differ in length {sizes}; pass one entry per tensor")
    return next(iter(sizes.values()), 0)


def _check_same_numel(what: str, a: Sequence[Tensor], b: Sequence[Tensor], an: str, bn: str):
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise ValueError(
                f"{what}: {bn}[{i}] has {y.numel()} elements, {an}[{i}] {x.numel()}; "
                f"pass {bn} of the same size as {an}"
            )


def _check_rule(rule: str, field: str = "rule") -> None:
    if rule not in FREE_RULES:
        raise ValueError(f"{field} must be one of {FREE_RULES}, got {rule!r}")


def _check_steps(steps: Sequence[int]) -> None:
    for i, t in enumerate(steps):
        if int(t) < 1:
            raise ValueError(f"steps[{i}] = {t}: the state-full count after this step, >= 1")


# ------------------------------------------------------------------------------------ free
@torch.no_grad()
def free_apply_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    alpha: float,
    *,
    rule: str = "signsgd",
    decay: float = 0.0,
    impl: str = "auto",
) -> None:
    """In place: ``p <- p (1 - decay) - alpha F(g)`` for every (p, g); see the module docstring.

    ``grads[i]`` has ``params[i]``'s number of elements (any shape with it). One Triton launch per
    grad dtype for the float32 contiguous params; the rest (and every tensor with
    ``impl="torch"`` or on the CPU) take the torch path.
    """
    _check_rule(rule)
    n = _check_lists("free_apply_", params=params, grads=grads)
    if n == 0:
        return
    keep = 1.0 - decay
    if not _use_triton(impl, params[0].device):
        _check_same_numel("free_apply_", params, grads, "params", "grads")
        _free_torch(list(params), list(grads), alpha, rule, keep)
        return
    from frugal_dist.kernels import elementwise_triton as tk

    # one pass over the tensors: checks, and the table rows of each grad dtype
    f32 = torch.float32
    groups: dict[torch.dtype, tuple[list[int], list[int], list[int]]] = {}
    rest_p, rest_g = [], []
    for p, g in zip(params, grads):
        size = p.numel()
        if g.numel() != size:
            _check_same_numel("free_apply_", params, grads, "params", "grads")
        gd = g.dtype
        if (
            p.dtype is f32
            and gd in _TRITON_DTYPES
            and size
            and p.is_contiguous()
            and (g.is_contiguous())
        ):
            rows, numels, ptr_or = groups.setdefault(gd, ([], [], [0]))
            pp, gp = p.data_ptr(), g.data_ptr()
            rows += (pp, gp, size)
            numels.append(size)
            ptr_or[0] |= pp | gp
        elif size:
            rest_p.append(p)
            rest_g.append(g)
    for gd, (rows, numels, ptr_or) in groups.items():
        tk.free_apply(params[0].device, rows, tuple(numels), ptr_or[0], gd, alpha, rule, keep)
    if rest_p:
        _free_torch(rest_p, rest_g, alpha, rule, keep)


def _free_torch(params: list[Tensor], grads: list[Tensor], alpha, rule, keep) -> None:
    """The present torch path: ``_foreach_mul_`` by ``keep``, then ``_foreach_add_`` of F(g) in
    chunks of ``FREE_CHUNK`` elements; 16-bit params through float32 (one rounding)."""
    pairs = [(p, g) for p, g in zip(params, grads) if p.numel()]
    if not pairs:
        return
    if keep != 1.0:
        torch._foreach_mul_([p for p, _ in pairs], keep)
    if rule == "none":
        return
    # (no view op for a grad already shaped like its param: the step is launch-bound on a GPU)
    wide = [(p, g if g.shape == p.shape else g.reshape(p.shape)) for p, g in pairs
            if p.dtype not in _HALF]  # fmt: skip
    for chunk in runs_of(wide, lambda pair: pair[0].numel()):
        data = [p for p, _ in chunk]
        gs = [g for _, g in chunk]
        if rule == "signsgd":
            torch._foreach_add_(data, torch._foreach_sign(gs), alpha=-alpha)
        else:
            torch._foreach_add_(data, gs, alpha=-alpha)
    for p, g in pairs:
        if p.dtype in _HALF:
            d = torch.sign(g) if rule == "signsgd" else g
            p.copy_(p.float().add_(d.reshape(p.shape), alpha=-alpha))


def runs_of(
    items: Sequence[T], numel: Callable[[T], int], limit: int = FREE_CHUNK
) -> list[list[T]]:
    """``items`` cut into consecutive runs of at least ``limit`` elements (the last: fewer), so
    a foreach batch's temporaries stay bounded; ``numel(item)`` is an item's element count."""
    out: list[list[T]] = []
    chunk: list[T] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += numel(item)
        if size >= limit:
            out.append(chunk)
            chunk, size = [], 0
    if chunk:
        out.append(chunk)
    return out


# ----------------------------------------------------------------------------------- adamw
@torch.no_grad()
def adamw_apply_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    impl: str = "auto",
) -> None:
    """In place: one AdamW step of every tensor (module docstring), ``steps[i]`` = its state-full
    count after this step (>= 1). Moments are float32 and shaped like the params; grads have the
    params' number of elements. ``impl="triton"``: one launch over all (float32 contiguous)
    tensors; ``"auto"``: ``ADAMW_AUTO`` on CUDA, core.rules' foreach formulas on the CPU."""
    n = _check_lists("adamw_apply_", params=params, grads=grads, exp_avgs=exp_avgs,
                     exp_avg_sqs=exp_avg_sqs, steps=steps)  # fmt: skip
    if n == 0:
        return
    if min(steps) < 1:
        _check_steps(steps)
    dev = params[0].device
    keep = 1.0 - lr * weight_decay
    # one pass over the tensors: sizes checked, float32 contiguity noted, table rows collected
    f32, b1, b2 = torch.float32, float(betas[0]), float(betas[1])
    use_triton = _use_triton(impl, dev, ADAMW_AUTO)
    if use_triton:
        from frugal_dist.kernels import elementwise_triton as tk
    rows: list[int] = []
    numels: list[int] = []
    ptr_or, all_f32 = 0, True
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        size = p.numel()
        if g.numel() != size or m.numel() != size or v.numel() != size:
            _check_same_numel("adamw_apply_", params, grads, "params", "grads")
            _check_same_numel("adamw_apply_", params, exp_avgs, "params", "exp_avgs")
            _check_same_numel("adamw_apply_", params, exp_avg_sqs, "params", "exp_avg_sqs")
        if all_f32 and not (
            size and p.dtype is f32 and g.dtype is f32 and m.dtype is f32 and v.dtype is f32
            and p.is_contiguous() and g.is_contiguous() and m.is_contiguous()
            and v.is_contiguous()
        ):  # fmt: skip
            all_f32 = False
        if all_f32 and use_triton:
            ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
            rows += (*ptrs, size, *tk.adam_corrections(int(t), b1, b2), 0)
            numels.append(size)
            ptr_or |= ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3]
    if use_triton and not all_f32:
        if impl == "triton":
            raise ValueError(
                "adamw_apply_(impl='triton'): params, grads and moments must be non-empty "
                "contiguous float32 tensors; use impl='auto'"
            )
        use_triton = False  # auto: the torch path takes what the kernel cannot
    if use_triton:
        tk.adamw_apply(dev, rows, tuple(numels), ptr_or, lr, (b1, b2), eps, keep)
        return
    grads = [g.reshape(p.shape) for p, g in zip(params, grads)]
    if dev.type == "cuda" and all_f32:
        state_steps = list(_device_floats([float(t) for t in steps], dev).unbind(0))
        torch._fused_adamw_(
            list(params), grads, list(exp_avgs), list(exp_avg_sqs), [], state_steps,
            lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        return
    _adamw_torch(list(params), grads, list(exp_avgs), list(exp_avg_sqs), steps, lr, betas, eps,
                 keep)  # fmt: skip


def _device_floats(values: list[float], device: torch.device) -> Tensor:
    """A float32 device tensor of ``values`` through pinned memory (non-blocking: no sync)."""
    host = torch.tensor(values, dtype=torch.float32)
    return host.pin_memory().to(device, non_blocking=True)


def _adamw_torch(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, keep) -> None:
    """FRUGAL's non-fused AdamW path: decay ``_foreach_mul_``, core.rules' directions, add."""
    if keep != 1.0:
        torch._foreach_mul_(params, keep)
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    buffers = [{"exp_avg": m, "exp_avg_sq": v} for m, v in zip(exp_avgs, exp_avg_sqs)]
    dirs = state_full_directions("adamw", grads, buffers, [int(t) for t in steps], betas, eps)
    for p, d in zip(params, dirs):
        if p.dtype in _HALF:
            p.copy_(p.float().add_(d, alpha=-lr))
        else:
            p.add_(d.to(p.dtype), alpha=-lr)


# ------------------------------------------------------------------------------ coordinates
def coordinate_positions(index: Tensor, dim: int) -> Tensor:
    """int32 map of length ``dim``: ``pos[index[j]] = j`` (the compact position), -1 elsewhere.
    Build it once per refresh, with the selection, on the tensors' device (a CPU ``index`` is
    range-checked; a device one is not, to keep this free of host syncs)."""
    if index.dim() != 1:
        raise ValueError(f"index must be a 1-D tensor of distinct positions in [0, {dim})")
    if index.device.type == "cpu" and index.numel() and (index.min() < 0 or index.max() >= dim):
        raise ValueError(f"index must be a 1-D tensor of distinct positions in [0, {dim})")
    pos = torch.full((dim,), -1, dtype=torch.int32, device=index.device)
    arange = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    return pos.scatter_(0, index.long(), arange)


@torch.no_grad()
def coordinate_adamw_apply_(
    W: Sequence[Tensor],
    G: Sequence[Tensor],
    m: Sequence[Tensor],
    v: Sequence[Tensor],
    indices: Sequence[Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    scale: float = 1.0,
    free_scale: float = 1.0,
    betas: tuple[float, float],
    eps: float,
    decay: float = 0.0,
    free_rule: str = "signsgd",
    axis: str = "columns",
    positions: Sequence[Tensor] | None = None,
    impl: str = "auto",
) -> None:
    """In place, for matrices of one shape: AdamW on the selected columns (rows) ``indices[i]``
    (sorted) with compact moments ``m[i]``, ``v[i]``, the state-free rule elsewhere (module
    docstring). Every ``W[i]`` has ``W[0]``'s shape, whose matrix view (dim 0, the rest) is
    (M, N); ``G[i]`` has M N elements. ``positions[i]`` =
    ``coordinate_positions(indices[i], N or M)`` (built here when None: cache it per refresh to
    keep the step free of index work)."""
    _check_rule(free_rule, "free_rule")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES} (randk takes the per-tensor path), "
                         f"got {axis!r}")  # fmt: skip
    n = _check_lists("coordinate_adamw_apply_", W=W, G=G, m=m, v=v, indices=indices, steps=steps)
    if n == 0:
        return
    if min(steps) < 1:
        _check_steps(steps)
    shape = matrix_shape(W[0])
    M, N = shape
    k = int(indices[0].numel())
    compact = (M, k) if axis == "columns" else (k, N)
    dim = N if axis == "columns" else M
    dev = W[0].device
    use_triton = _use_triton(impl, dev) and k > 0 and M * N > 0
    if use_triton:
        from frugal_dist.kernels import elementwise_triton as tk

        if positions is None:
            positions = [coordinate_positions(ix, dim) for ix in indices]
        elif len(positions) != n:
            raise ValueError(f"positions: {len(positions)} entries for {n} matrices")
    # one pass: shapes checked, Triton eligibility noted, table rows collected
    f32, gd, b1, b2 = torch.float32, G[0].dtype, float(betas[0]), float(betas[1])
    shape0 = W[0].shape
    rows: list[int] = []
    ptr_or, ok = 0, use_triton and gd in _TRITON_DTYPES
    for i, (w, g, mi, vi, ix, t) in enumerate(zip(W, G, m, v, indices, steps)):
        if w.shape != shape0 or g.numel() != M * N:
            raise ValueError(f"coordinate_adamw_apply_: W[{i}] / G[{i}] are not shaped like "
                             f"W[0] {tuple(shape0)}; group the tensors by shape")  # fmt: skip
        if ix.numel() != k or mi.shape != compact or vi.shape != compact:
            raise ValueError(
                f"coordinate_adamw_apply_: m[{i}], v[{i}] must be {compact}: (M, K) for "
                f"columns, (K, N) for rows, K = len(indices[{i}])"
            )
        if ok:
            pos = positions[i]
            if pos.dtype is not torch.int32 or pos.numel() != dim or not pos.is_contiguous():
                raise ValueError(f"positions[{i}] must be coordinate_positions(indices[{i}], "
                                 f"{dim}): a contiguous int32 map of length {dim}")  # fmt: skip
            if not (
                w.dtype is f32 and g.dtype is gd and mi.dtype is f32 and vi.dtype is f32
                and w.is_contiguous() and g.is_contiguous() and mi.is_contiguous()
                and vi.is_contiguous()
            ):  # fmt: skip
                ok = False
                continue
            wp, gp = w.data_ptr(), g.data_ptr()
            rows += (wp, gp, mi.data_ptr(), vi.data_ptr(), pos.data_ptr(),
                     *tk.adam_corrections(int(t), b1, b2), 0)  # fmt: skip
            ptr_or |= wp | gp
    if ok:
        tk.coordinate_apply(dev, rows, n, ptr_or, gd, shape, k, lr, scale, free_scale, (b1, b2),
                            eps, 1.0 - decay, free_rule, axis == "rows")  # fmt: skip
        return
    if impl == "triton" and k > 0 and M * N > 0:
        raise ValueError("coordinate_adamw_apply_(impl='triton'): W, m, v must be "
                         "contiguous float32, G contiguous of one float dtype")  # fmt: skip
    _coordinate_torch(W, G, m, v, indices, steps, shape, lr, scale, free_scale, betas, eps,
                      1.0 - decay, free_rule, axis)  # fmt: skip


def matrix_shape(w: Tensor) -> tuple[int, int]:
    """(M, N): the matrix view (dim 0, the rest) the coordinate kernel reads ``w`` as."""
    if w.dim() == 0:
        return (1, 1)
    if w.dim() == 1:
        return (1, int(w.shape[0]))
    return (int(w.shape[0]), int(w.numel() // w.shape[0]) if w.shape[0] else 0)


def _coordinate_torch(W, G, m, v, indices, steps, shape, lr, scale, free_scale, betas, eps,
                      keep, free_rule, axis) -> None:  # fmt: skip
    """The present path: decay ``_foreach_mul_``; gather; core.rules' AdamW on the compact
    gradients; F(G) (scaled by ``free_scale``) with ``U`` written over the selected entries by
    ``index_copy_``; one foreach add of ``-lr scale D``."""
    W = list(W)
    dim = 1 if axis == "columns" else 0
    if keep != 1.0:
        torch._foreach_mul_(W, keep)
    full = [g.reshape(shape).to(mi.dtype) for g, mi in zip(G, m)]  # no copy when float32
    g_sf = [g.index_select(dim, ix) for g, ix in zip(full, indices)]
    buffers = [{"exp_avg": mi, "exp_avg_sq": vi} for mi, vi in zip(m, v)]
    dirs = state_full_directions("adamw", g_sf, buffers, [int(t) for t in steps], betas, eps)
    if free_rule == "signsgd":
        d = list(torch._foreach_sign(full))
    elif free_rule == "sgd":
        d = [g.clone() for g in full]
    else:
        d = [torch.zeros_like(g) for g in full]
    if free_rule != "none" and free_scale != 1.0:
        torch._foreach_mul_(d, free_scale)
    for di, u, ix in zip(d, dirs, indices):
        di.index_copy_(dim, ix, u)
    for w, di in zip(W, d):
        if w.dtype in _HALF:
            w.copy_(w.float().add_(di.reshape(w.shape), alpha=-lr * scale))
    wide = [(w, di.reshape(w.shape)) for w, di in zip(W, d) if w.dtype not in _HALF]
    if wide:
        torch._foreach_add_([w for w, _ in wide], [di for _, di in wide], alpha=-lr * scale)
