"""The steady projection step, batched over same-shape matrices (Dion-style megabatches).

For B matrices of one shape (m, n) and one side, with orthonormal bases P_b of rank r:

    right (P: n x r):  down(G) = G P      (m, r)     up(X) = X P^T
    left  (P: m x r):  down(G) = P^T G    (r, n)     up(X) = P X

    project_down:      G_sf = down(G)                                   one (m x n) . r product
    apply_projection:  R = G - up(G_sf);  D = up(U) + s_i F(R)          two products, F elementwise
                       W <- W (1 - lr wd) - lr s_p D                    (F: sign | identity | 0)

The apply keeps one full-size buffer per chunk (the stacked gradient, overwritten in place by R,
then F(R), then the scaled D), so a chunk of matrices costs exactly one (B, m, n) temporary. Weight
decay is folded into the last write: with wd > 0 the buffer holds E = -(s_p / wd) D and W is
updated by ``lerp_(E, lr wd)`` = W (1 - lr wd) - lr s_p D in one read-read-write pass of W.

Backends (``backend``):

* ``torch`` -- one ``mm`` / ``addmm`` per matrix, a per-matrix temporary (lowest memory; CPU path).
* ``bmm``   -- matrices stacked into chunks of at most ``chunk_elems`` entries; each product is
               one ``bmm`` / ``baddbmm_`` and each elementwise step one kernel per chunk.
* ``triton`` -- each phase as one batched Triton launch per shape group
               (``kernels.projection_triton``): the apply fuses both up-products and the update
               (reads G and W, writes W, no temporaries); the down product reads G in its own
               dtype (no stacked copy), or runs as ``bmm`` where that measured faster
               (``projection_triton.DOWN_BACKEND``: ``bmm`` stacks G, ``mm`` runs one product
               per matrix). Needs triton (CUDA, or TRITON_INTERPRET=1).
* ``auto``  -- ``bmm`` on CUDA, ``torch`` elsewhere.

Precision of the projection GEMMs (``precision``):

* ``fp32`` -- IEEE float32 products (cuBLAS without TF32); the exact reference arithmetic.
* ``tf32`` -- float32 storage, TF32 tensor-core products (10-bit mantissa inputs, float32
              accumulate; ~7x fp32's dense rate on H100/H200 spec sheets). CPU: same as fp32.
* ``bf16`` -- bases and gradients rounded to bfloat16 for the products (float32 accumulate). The
              ``bmm`` / ``torch`` apply's full-size buffer is bfloat16 too (half the bytes), so R,
              F(R) and D carry 8 mantissa bits (``triton`` keeps G, W and the epilogue float32).
              G_sf is returned as float32. sign(R) changes only where |R| is within the
              products' rounding error (~2^-8 of |G|).

Sharded rows (FSDP2 ``Shard(0)``, each rank a block of whole rows): pass each rank's local rows
as the (m_local, n) matrices. ``right``: everything is local, no communication. ``left``: pass
the basis rows of the local rows, P_local (m_local, r); ``project_down`` then returns the
*partial* sums P_local^T G_local, and the caller must all-reduce(sum) them over the shard group
(B r n floats, 4 bytes each) before the state phase; ``apply_projection`` needs no communication
(up(X) = P_local X is the local rows). Flat ZeRO fragments, whose boundaries cut rows, are not
supported here (the per-item fragment path handles them).

How a step uses this, per parameter group (rank r > 0; rho = 0 stays on the state-free path):

1. group the projection items by (matrix shape, side, rank); keep each group's bases as one
   (B, dim, r) float32 tensor (per-item state may hold the views ``bases[b]``);
2. down:  ``X = project_down(grads, bases, side, precision=..., backend=...)``; ``left`` on row
   shards: all-reduce(sum) X over the shard group (through ``comm/``);
3. state: U from X (state tensors as views of one (B, ...) buffer keep U batched; lists work
   but are stacked, one copy);
4. apply: ``apply_projection(datas, grads, bases, X, U, side, lr=, weight_decay=, s_p=, s_i=,
   rule=state_free)``. It applies the weight decay itself: leave these tensors out of the
   group's separate ``W *= 1 - lr wd`` pass;
5. refresh (``kernels.refresh``): svd owners call ``svd_bases(grads, r, side, method="warm",
   previous=<old bases or None>, seeds=[projection_seed(seed, name, k) ...])`` per shape group
   and broadcast as now; random bases come from ``random_bases`` on every rank (no broadcast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("auto", "torch", "bmm", "triton")
SIDES = ("left", "right")
RULES = ("signsgd", "sgd", "none")
CHUNK_ELEMS = 1 << 26  # entries per stacked chunk (256 MiB of float32)

Batch = Tensor | Sequence[Tensor]


# ------------------------------------------------------------------------------------ checks
def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    """Raise a ValueError naming ``field`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {list(choices)}, got {value!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``bmm`` on CUDA, ``torch`` elsewhere; other names are checked and returned."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "bmm" if device.type == "cuda" else "torch"
    return backend


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Within the block, float32 CUDA matmuls use IEEE fp32 (``fp32``) or TF32 (``tf32``,
    ``bf16``); the previous setting is restored on exit. CPU matmuls are unaffected.

    Uses the new API (``torch.backends.cuda.matmul.fp32_precision``), which cuBLAS reads for
    every float32 GEMM. Inside the block the legacy getter ``matmul.allow_tf32`` may raise
    torch's "mix of the legacy and new APIs" error, so run only these products inside it; on
    exit the previous value (``none`` = inherit included) is restored exactly."""
    check_choice("precision", precision, PRECISIONS)
    mm = torch.backends.cuda.matmul
    want = "ieee" if precision == "fp32" else "tf32"
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        mm.fp32_precision = want
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:  # torch < 2.9
        old_flag = mm.allow_tf32
        mm.allow_tf32 = want == "tf32"
        try:
            yield
        finally:
            mm.allow_tf32 = old_flag


def operand_dtype(precision: str) -> torch.dtype:
    """The dtype the products read (bases, gradients, buffers): bfloat16 for ``bf16``."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def as_batch(xs: Batch, what: str) -> Tensor:
    """A (B, a, b) tensor from a stacked tensor or a list of same-shape matrices."""
    if isinstance(xs, Tensor):
        if xs.dim() != 3:
            raise ValueError(f"{what} must be (B, rows, cols) or a list of matrices, got "
                             f"shape {tuple(xs.shape)}")  # fmt: skip
        return xs
    if len(xs) == 0:
        raise ValueError(f"{what} is empty")
    return torch.stack([x.reshape(xs[0].shape[-2], -1) if x.dim() != 2 else x for x in xs])


def chunks(count: int, per_item: int, chunk_elems: int) -> list[tuple[int, int]]:
    """[start, end) ranges over ``count`` items of ``per_item`` entries, each range at most
    ``chunk_elems`` entries (at least one item)."""
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    step = max(1, chunk_elems // max(per_item, 1))
    return [(i, min(i + step, count)) for i in range(0, count, step)]


def matrix_dims(numel: int, basis: Tensor, side: str) -> tuple[int, int]:
    """(m, n) of a matrix with ``numel`` entries projected on ``side`` by ``basis`` (dim x r or
    B x dim x r): dim is m (left) or n (right)."""
    check_choice("side", side, SIDES)
    dim = int(basis.shape[-2])
    if dim == 0 or numel % dim:
        raise ValueError(f"a {side} basis with {dim} rows cannot project a matrix of {numel} "
                         "entries (left: P is m x r; right: P is n x r)")  # fmt: skip
    return (numel // dim, dim) if side == "right" else (dim, numel // dim)


def _stack_into(buf: Tensor, mats: Sequence[Tensor], m: int, n: int) -> Tensor:
    """Copy ``mats`` (any shapes with m*n entries, any float dtype) into ``buf`` (B, m, n)."""
    torch._foreach_copy_(list(buf.unbind(0)), [x.reshape(m, n) for x in mats])
    return buf


def mm32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` (batched or not) as float32; bfloat16 operands accumulate in float32 and, on
    CUDA, are written as float32 directly (``out_dtype``)."""
    if a.dtype == torch.float32:
        return torch.matmul(a, b, out=out) if out is not None else a @ b
    if a.is_cuda:
        fn = torch.bmm if a.dim() == 3 else torch.mm
        res = fn(a, b, out_dtype=torch.float32)
    else:
        res = (a @ b).float()
    if out is not None:
        out.copy_(res)
        return out
    return res


# ------------------------------------------------------------------------------------ down
@torch.no_grad()
def project_down(
    grads: Batch,
    bases: Batch,
    side: str,
    *,
    precision: str = "tf32",
    backend: str = "auto",
    chunk_elems: int = CHUNK_ELEMS,
) -> Tensor:
    """G_sf = down(G) for B same-shape matrices: (B, m, r) for ``right``, (B, r, n) for ``left``,
    float32 (a ``left`` result of the ``triton`` backend at tf32 / bf16 is stored as (B, n, r),
    the K-contiguous layout ``apply_projection`` reads, and returned as its ``.mT`` view).
    ``grads``: a list of (m, n)-viewable tensors or a (B, m, n) tensor; ``bases``: a list or
    (B, dim, r) tensor (float32, or bfloat16 for ``precision='bf16'``: no cast then).
    Row shards with ``left``: the result is a partial sum to all-reduce (module docstring).
    Communication: none."""
    check_choice("precision", precision, PRECISIONS)
    g0 = grads[0]
    P = as_batch(bases, "bases")
    m, n = matrix_dims(g0.numel(), P, side)
    r = int(P.shape[-1])
    B = len(grads)
    if P.shape[0] != B:
        raise ValueError(f"bases has {P.shape[0]} matrices for {B} gradients")
    dev = g0.device
    dt = operand_dtype(precision)
    Pc = _as(P, dt)
    how = resolve_backend(backend, dev)
    if side == "right":
        out = torch.empty(B, m, r, device=dev, dtype=torch.float32)
    elif how == "triton" and precision != "fp32":  # stored (B, n, r): what the apply reads
        out = torch.empty(B, n, r, device=dev, dtype=torch.float32).mT
    else:
        out = torch.empty(B, r, n, device=dev, dtype=torch.float32)
    if how == "triton":
        kern = _triton_module(dev)
        if kern.down_on_triton(precision, dev):
            return kern.fused_down(grads, Pc, side, out, precision=precision)
        if kern.DOWN_BACKEND[precision] == "mm":  # per-matrix products: no stacked copy of G
            how = "torch"
    with matmul_precision(precision):
        if how == "torch":
            for b in range(B):
                g = grads[b].reshape(m, n).to(dt)
                if side == "right":
                    mm32(g, Pc[b], out=out[b])
                elif out.stride(1) == 1:  # (B, n, r) storage: X^T = G^T P
                    mm32(g.T, Pc[b], out=out[b].T)
                else:
                    mm32(Pc[b].T, g, out=out[b])
            return out
        for lo, hi in chunks(B, m * n, chunk_elems):
            if isinstance(grads, Tensor) and grads.dtype == dt:
                S = grads[lo:hi]
            else:
                S = _stack_into(torch.empty(hi - lo, m, n, device=dev, dtype=dt),
                                grads[lo:hi], m, n)  # fmt: skip
            if side == "right":
                mm32(S, Pc[lo:hi], out=out[lo:hi])
            elif out.stride(1) == 1:  # (B, n, r) storage: X^T = G^T P
                mm32(S.mT, Pc[lo:hi], out=out[lo:hi].mT)
            else:
                mm32(Pc[lo:hi].mT, S, out=out[lo:hi])
    return out


# ------------------------------------------------------------------------------------ apply
def _coefficients(lr: float, wd: float, s_p: float, s_i: float) -> tuple[float, float]:
    """(c, c s_i): the buffer ends as c (up(U) + s_i F(R)); c = -lr s_p, or -s_p / wd with weight
    decay (the lerp form, see the module docstring)."""
    c = -s_p / wd if wd != 0.0 else -lr * s_p
    return c, c * s_i


def _finish(params: list[Tensor], bufs: list[Tensor], lr: float, wd: float) -> None:
    """W <- lerp(W, E, lr wd) (wd > 0) or W + E, over many matrices at once."""
    if wd == 0.0:
        torch._foreach_add_(params, bufs)
    elif bufs[0].dtype == params[0].dtype:
        torch._foreach_lerp_(params, bufs, lr * wd)
    else:  # a bfloat16 buffer: lerp needs one dtype, so decay and add in two passes
        torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, bufs, alpha=lr * wd)


@dataclass(eq=False)
class ParamBatch:
    """The B parameters of a batch that comes back with the very same parameters at every step
    (the step plan's batches, ``optim.projection_batch``): ``apply_projection`` checks them and
    makes their (m, n) views once (``views``), and the ``triton`` backend keeps their address
    table and its alignment here (``addresses``), so such a step makes no per-parameter check,
    ``data_ptr`` or lookup. It holds the tensors: their addresses stay theirs while it lives."""

    tensors: list[Tensor]
    checked: tuple[int, int, list[Tensor]] | None = None  # (m, n, views) once checked
    addresses: tuple[Tensor, int] | None = None  # (table, OR of the addresses), triton backend

    def __len__(self) -> int:
        return len(self.tensors)

    def views(self, m: int, n: int) -> list[Tensor]:
        """The parameters as checked contiguous float32 (m, n) views (``_param_views``, made on
        the first call for these dims)."""
        if self.checked is None or self.checked[:2] != (m, n):
            self.checked = (m, n, _param_views(self.tensors, m, n))
        return self.checked[2]


def _param_views(params: Sequence[Tensor], m: int, n: int) -> list[Tensor]:
    out = []
    mn = (m, n)
    for i, p in enumerate(params):
        if p.numel() != m * n:
            raise ValueError(f"params[{i}] has {p.numel()} entries, the gradients {m}x{n}")
        if not p.is_contiguous():
            raise ValueError(f"params[{i}] is not contiguous: the update must write through a "
                             "view; pass .data of a contiguous parameter")  # fmt: skip
        if p.dtype != torch.float32:
            raise ValueError(f"params[{i}] is {p.dtype}; the batched apply takes float32 "
                             "masters (other dtypes: the per-item path)")  # fmt: skip
        out.append(p if p.shape == mn else p.view(m, n))  # (m, n) already: no view op
    return out


@torch.no_grad()
def apply_projection(
    params: Sequence[Tensor] | ParamBatch,
    grads: Batch,
    bases: Batch,
    g_sf: Batch,
    u: Batch,
    side: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    s_p: float = 1.0,
    s_i: float = 1.0,
    rule: str = "signsgd",
    precision: str = "tf32",
    backend: str = "auto",
    chunk_elems: int = CHUNK_ELEMS,
    matched: bool = False,
) -> None:
    """W <- W (1 - lr wd) - lr s_p (up(U) + s_i F(G - up(G_sf))) for B same-shape matrices, in
    place in ``params`` (contiguous float32 tensors with m*n entries each; or a ``ParamBatch`` of
    them, checked once).

    ``g_sf`` and ``u``: what ``project_down`` returned and the state-full direction, (B, m, r)
    (right) or (B, r, n) (left). ``rule``: the state-free F (``signsgd`` sign, ``sgd`` identity,
    ``none`` 0). Temporaries: one (B_chunk, m, n) buffer per chunk (``bmm``) or one (m, n) per
    matrix (``torch``), of the precision's operand dtype. ``matched`` (``free_scale="matched"``,
    ``triton`` backend): s_i F(R) of each matrix times s_t = RMS(U_b) / RMS(F_b), computed on the
    device (``kernels.projection_matched``; a no-op for ``none``). Communication: none."""
    check_choice("rule", rule, RULES)
    check_choice("precision", precision, PRECISIONS)
    if weight_decay < 0.0 or lr < 0.0:
        raise ValueError(f"lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
    B = len(params)
    if B == 0:
        return
    X = as_batch(g_sf, "g_sf")
    U = as_batch(u, "u")
    P = as_batch(bases, "bases")
    r = int(P.shape[-1])
    first = params.tensors[0] if isinstance(params, ParamBatch) else params[0]
    m, n = matrix_dims(first.numel(), P, side)
    for what, t in (("g_sf", X), ("u", U), ("bases", P)):
        if t.shape[0] != B:
            raise ValueError(f"{what} has {t.shape[0]} matrices for {B} params")
    want = (m, r) if side == "right" else (r, n)
    for what, t in (("g_sf", X), ("u", U)):
        if tuple(t.shape[1:]) != want:
            raise ValueError(f"{what} must be (B, {want[0]}, {want[1]}) for a {side} "
                             f"projection of {m}x{n}, got {tuple(t.shape)}")  # fmt: skip
    held = isinstance(params, ParamBatch)
    W = params.views(m, n) if held else _param_views(params, m, n)
    dev = W[0].device
    dt = operand_dtype(precision)
    how = resolve_backend(backend, dev)
    if matched and how != "triton":
        raise ValueError(f"matched=True runs on backend='triton' only, got {how!r}")
    if how == "triton":  # float32 X is rounded in registers; the others are cast if they must be
        kern = _triton_module(dev)
        c_f, scales = -lr * s_p * s_i, None
        if matched and rule == "signsgd":  # ||U_b|| from U as given (before an operand cast)
            from frugal_dist.kernels.projection_matched import matched_c_f, matched_operands

            scales, c_f = matched_operands(U), matched_c_f(c_f, U.shape[1] * U.shape[2])
        Xk, Uk = X, _as(U, dt)
        if side == "left" and precision != "fp32":  # K-contiguous B tiles: (B, n, r) storage
            Xk, Uk = _k_contiguous(Xk), _k_contiguous(Uk)
        w_addresses = None
        if held:
            if params.addresses is None:
                params.addresses = kern.addresses(W)
            w_addresses = params.addresses
        kern.fused_apply(
            W, grads, _as(P, dt), Xk, Uk, side, decay=1.0 - lr * weight_decay, c_u=-lr * s_p,
            c_f=c_f, rule=rule, precision=precision, w_addresses=w_addresses,
            matched=scales)  # fmt: skip
        return
    Pc, Xc, Uc = P.to(dt), X.to(dt), U.to(dt)
    c, c_free = _coefficients(lr, weight_decay, s_p, s_i)

    def fill(S: Tensor, lo: int, hi: int, gs: Sequence[Tensor] | Tensor) -> None:
        """S (the stacked G[lo:hi] unless rule == 'none') <- c (up(U) + s_i F(G - up(G_sf)))."""
        Pb = Pc[lo:hi] if S.dim() == 3 else Pc[lo]
        Xb = Xc[lo:hi] if S.dim() == 3 else Xc[lo]
        Ub = Uc[lo:hi] if S.dim() == 3 else Uc[lo]
        PT = Pb.mT if S.dim() == 3 else Pb.T

        def up_add(buf: Tensor, x: Tensor, beta: float, alpha: float) -> None:
            if S.dim() == 3:
                (buf.baddbmm_(x, PT, beta=beta, alpha=alpha) if side == "right"
                 else buf.baddbmm_(Pb, x, beta=beta, alpha=alpha))  # fmt: skip
            else:
                (buf.addmm_(x, PT, beta=beta, alpha=alpha) if side == "right"
                 else buf.addmm_(Pb, x, beta=beta, alpha=alpha))  # fmt: skip

        if rule == "none":
            up_add(S, Ub, 0.0, c)
            return
        up_add(S, Xb, 1.0, -1.0)  # R = G - up(G_sf)
        if rule == "signsgd":
            S.sign_()
        up_add(S, Ub, c_free, c)  # c s_i F(R) + c up(U)

    with matmul_precision(precision):
        if how == "torch":
            for b in range(B):
                if rule == "none":
                    S = torch.empty(m, n, device=dev, dtype=dt)
                else:
                    S = grads[b].reshape(m, n).to(dt, copy=True)
                fill(S, b, b + 1, grads)
                _finish([W[b]], [S], lr, weight_decay)
            return
        for lo, hi in chunks(B, m * n, chunk_elems):
            S = torch.empty(hi - lo, m, n, device=dev, dtype=dt)
            if rule != "none":
                _stack_into(S, grads[lo:hi], m, n)
            fill(S, lo, hi, grads)
            _finish(W[lo:hi], list(S.unbind(0)), lr, weight_decay)


def _as(t: Tensor, dt: torch.dtype) -> Tensor:
    """``t.to(dt)`` without a dispatcher call where ``t`` is of ``dt`` already (``t`` itself)."""
    return t if t.dtype == dt else t.to(dt)


def _k_contiguous(t: Tensor) -> Tensor:
    """``t`` (B, r, n) stored as (B, n, r) (a copy only when it is not already)."""
    return t if t.stride(1) == 1 else t.mT.contiguous().mT


def _triton_module(device: torch.device):  # noqa: ANN202 (a module)
    """``kernels.projection_triton`` (the ``triton`` backend), or a clear error where it cannot
    run."""
    try:
        from frugal_dist.kernels import projection_triton
    except ImportError as exc:
        raise RuntimeError(f"backend='triton' needs the triton package ({exc}); use 'bmm' or "
                           "'auto'") from exc  # fmt: skip
    if not projection_triton.triton_usable(device):
        raise RuntimeError("backend='triton' runs on CUDA tensors (or the CPU under "
                           "TRITON_INTERPRET=1); use 'bmm' or 'auto'")  # fmt: skip
    return projection_triton


# ------------------------------------------------------------------------------------ oracle
def reference_projection_step(
    w: Tensor, g: Tensor, basis: Tensor, u: Tensor, side: str, *, lr: float,
    weight_decay: float = 0.0, s_p: float = 1.0, s_i: float = 1.0, rule: str = "signsgd",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(G_sf, new W) for one matrix in float64, written out as in ``core/reference.py`` (the
    test oracle of ``project_down`` / ``apply_projection``; shares no code with them)."""
    w, g, P, u = (t.double() for t in (w, g, basis, u))
    g_sf = P.T @ g if side == "left" else g @ P
    up_u = P @ u if side == "left" else u @ P.T
    resid = g - (P @ g_sf if side == "left" else g_sf @ P.T)
    free = {"signsgd": torch.sign(resid), "sgd": resid, "none": torch.zeros_like(resid)}[rule]
    w = w * (1 - lr * weight_decay) - lr * s_p * up_u - lr * s_p * s_i * free
    return g_sf, w
