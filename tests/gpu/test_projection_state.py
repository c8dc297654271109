"""The fused projection state phase and the copy-free batched projection step on CUDA
(``kernels.projection_state``, ``optim.projection_batch``): the kernel against ``core.rules``
(the torch foreach path), the step against the torch path and the oracle at TF32 / bf16
tolerances, which kernels a steady step launches, and what it allocates. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.core.rules import state_full_directions
from tests.helpers import clone_params, grad_stream, make_params, max_diff, set_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
BETAS = (0.9, 0.999)
# right (m >= n) and left (m < n) batches, r = 32 / 24, and a lone square matrix
SHAPES = [(256, 128), (256, 128), (96, 256), (96, 256), (256, 128), (80, 80)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=1e-2, update_gap=4, weight_decay=0.05, inactive_lr_scale=0.5,
              proj_params_lr_scale=0.8, subspace="projection", density=0.25)  # fmt: skip
TYPES = {"random": dict(proj_type="random"), "svd-warm": dict(proj_type="svd", svd_method="warm")}


def _stored(B, A, C, transposed, dtype=torch.float32):
    shape = (B, C, A) if transposed else (B, A, C)
    t = torch.empty(shape, device="cuda", dtype=dtype)
    return t.mT if transposed else t


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("steps", [[5, 5, 5], [1, 9, 2]])
def test_adamw_state_matches_the_foreach_rules(transposed, steps):
    from frugal_dist.kernels.projection_state import adamw_state

    B, A, C = 3, 300, 517
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = _stored(B, A, C, transposed).copy_(torch.randn(B, A, C, device="cuda", generator=gen))
    ms = [0.1 * torch.randn(A, C, device="cuda", generator=gen) for _ in range(B)]
    vs = [torch.rand(A, C, device="cuda", generator=gen) for _ in range(B)]
    ref_m, ref_v = [m.clone() for m in ms], [v.clone() for v in vs]
    bufs = [{"exp_avg": m, "exp_avg_sq": v} for m, v in zip(ref_m, ref_v)]
    ref = state_full_directions("adamw", [x[b].contiguous() for b in range(B)], bufs, steps,
                                BETAS, 1e-8)  # fmt: skip
    u = _stored(B, A, C, transposed)
    adamw_state(x, ms, vs, steps, BETAS, 1e-8, u)
    for b in range(B):
        # reciprocal bias corrections and FMA contraction: float32 last-bit differences
        torch.testing.assert_close(u[b], ref[b], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(ms[b], ref_m[b], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(vs[b], ref_v[b], rtol=1e-6, atol=1e-8)
    u16 = _stored(B, A, C, transposed, torch.bfloat16)
    x16 = _stored(B, A, C, transposed, torch.bfloat16)
    ms2, vs2 = [m.clone() for m in ms], [v.clone() for v in vs]
    adamw_state(x, ms2, vs2, [t + 1 for t in steps], BETAS, 1e-8, u16, x16)
    adamw_state(x, ms, vs, [t + 1 for t in steps], BETAS, 1e-8, u)
    assert torch.equal(u16, u.bfloat16())  # one round-to-nearest-even of the float32 result
    assert torch.equal(x16, x.bfloat16())


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("C", [512, 516])  # 516: not a multiple of 16 (the offset / mask hints)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("clip", [None, 0.37])
def test_vector_moments_change_no_bit(transposed, C, precision, clip, monkeypatch):
    """The compiled ``ALIGNED`` path (16-byte vectors for m and v) against the scalar path
    (``vector_moments`` forced off) on the same inputs: m, v, U and X's bf16 copy torch.equal."""
    from frugal_dist.kernels import projection_state as ps

    B, A = 3, 300
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = _stored(B, A, C, transposed).copy_(torch.randn(B, A, C, device="cuda", generator=gen))
    ms = [0.1 * torch.randn(A, C, device="cuda", generator=gen) for _ in range(B)]
    vs = [torch.rand(A, C, device="cuda", generator=gen) for _ in range(B)]
    assert ps.vector_moments(ms, vs, C)
    coef = None if clip is None else torch.tensor(clip, device="cuda")
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    results = []
    for force_off in (False, True):
        if force_off:
            monkeypatch.setattr(ps, "vector_moments", lambda *a: False)
        m2, v2 = [m.clone() for m in ms], [v.clone() for v in vs]
        u = _stored(B, A, C, transposed, dt)
        copy = _stored(B, A, C, transposed, dt) if precision == "bf16" else None
        ps.adamw_state(x, m2, v2, [3, 8, 3], BETAS, 1e-8, u, copy, clip=coef)
        results.append([*m2, *v2, u] + ([] if copy is None else [copy]))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def _pair(steps: int, kernels: str, precision: str, kind: str):
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    qs = clone_params(ps)
    kw = {**COMMON, **TYPES[kind], "proj_precision": precision}
    opt = FRUGAL([{"params": ps, "names": NAMES}], kernels=kernels, **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), random_device="cuda", **kw)
    for grads in grad_stream(SHAPES, steps):
        set_grads(ps, [g.cuda() for g in grads])
        set_grads(qs, [g.cuda() for g in grads])
        opt.step()
        ref.step()
    return ps, qs


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_step_with_the_fused_state_follows_the_oracle(kind, precision, monkeypatch):
    """The default CUDA step (down, fused state, apply kernels) over 3 refreshes. fp32: float32
    rounding, 1e-4 (as test_cuda_kernels_step). TF32 / bf16 products carry ~2^-11 / 2^-8
    relative error, so sign(R) flips where |R| is that small; a flip moves a weight by
    2 lr s_p s_i = 8e-3: bound 0.03 (test_cuda_kernels_step's), movement above 0.05."""
    from frugal_dist.kernels import projection_state

    calls: list[int] = []
    real = projection_state.adamw_state

    def counted(x, *a, **k):
        calls.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(projection_state, "adamw_state", counted)
    ps, qs = _pair(12, "auto", precision, kind)
    assert sum(calls) == 12 * len(SHAPES)
    assert max_diff(ps, qs) < (1e-4 if precision == "fp32" else 0.03)
    assert max_diff(qs, [p.cuda() for p in make_params(SHAPES)]) > 0.05


# the apply kernels (``projection_tiles.json`` picks one per shape; 6th tile entry 1: stacked; a
# 7th, the variant: ``projection_apply_v2``)
APPLY_KERNELS = ("_apply_kernel", "_apply_stacked_kernel", "_apply_v2_kernel")


def _kernels_of_steady_step(precision: str) -> list[str]:
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    opt = FRUGAL([{"params": ps, "names": NAMES}], proj_precision=precision, nonfinite="ignore",
                 **{**COMMON, "update_gap": 100}, **TYPES["random"])  # fmt: skip
    grads = [[g.cuda() for g in gs] for gs in grad_stream(SHAPES, 3)]
    for g in grads[:2]:  # the refresh, then a steady step (tables, compiled kernels)
        set_grads(ps, g)
        opt.step()
    set_grads(ps, grads[2])
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_bf16_steady_step_is_three_triton_kernels_per_batch():
    """bf16: per (shape, side) batch one down, one state and one apply launch -- no cast,
    transpose, stacking or foreach kernels (the bases are stacked once per refresh)."""
    names = _kernels_of_steady_step("bf16")
    kernels = [n for n in names if not n.startswith("Memcpy")]
    applies = {n for n in kernels if n in APPLY_KERNELS}
    assert applies and set(kernels) == {"_adamw_state_kernel", "_down_kernel"} | applies, names
    assert len(kernels) == 3 * 3 and sum(n in APPLY_KERNELS for n in kernels) == 3, names


def test_tf32_steady_step_copies_no_compact_operands():
    """tf32: no cat / cast / transpose of bases, G_sf or U (the down still stacks G for its
    ``bmm`` -- ``projection_tiles.json`` ``down_backend`` -- as one foreach copy per batch)."""
    names = _kernels_of_steady_step("tf32")
    assert not [n for n in names if "CatArray" in n or "elementwise_kernel" in n], names
    assert sum("_adamw_state_kernel" in n for n in names) == 3


def test_tf32_steady_step_is_one_apply_launch_per_batch():
    """Exact kernel names: the foreach copy that stacks G for the ``bmm`` down is a
    ``multi_tensor_apply_kernel``, which a substring match on "_apply_kernel" also counted (6 on
    the H200 at 6505362: 3 copies + 3 applies; a CPU run of the Triton path launches 3)."""
    names = _kernels_of_steady_step("tf32")
    assert sum(n in APPLY_KERNELS for n in names) == 3, names


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_bases_are_held_once_and_the_step_allocates_only_compact_temporaries(precision):
    """The bases live in one buffer per batch (tf32: the per-item bases are its slices; bf16: a
    bfloat16 stack beside them, half their bytes); a steady bf16 step allocates at most its
    compact temporaries (X, U, X's bfloat16 copy: 8 B per compact entry) and the small tables
    (tf32 also stacks G for the ``bmm`` down: not bounded here)."""
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    opt = FRUGAL([{"params": ps, "names": NAMES}], proj_precision=precision, nonfinite="ignore",
                 **{**COMMON, "update_gap": 100}, **TYPES["random"])  # fmt: skip
    grads = [[g.cuda() for g in gs] for gs in grad_stream(SHAPES, 3)]
    for g in grads[:2]:
        set_grads(ps, g)
        opt.step()
    bases = {name: sel.basis for name, (_, sel) in opt.selections_in_use().items()}
    storages = {b.untyped_storage().data_ptr() for b in bases.values()}
    if precision == "tf32":
        assert len(storages) == 3
        return
    set_grads(ps, grads[2])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    compact = sum(opt.state[p]["exp_avg"].numel() for p in ps)
    # X float32, U and X's copy bfloat16; allocator rounding (512 B blocks) and small tables
    assert extra <= (4 + 2 + 2) * compact + 64 * 1024, (extra, compact)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("side,shape", [("right", (544, 256)), ("left", (256, 544))])
@pytest.mark.parametrize("tile", [(64, 128, 32, 4, 3, 1), (128, 64, 32, 4, 3, 1)])
def test_stacked_apply_kernel_matches_the_two_dot_kernel(precision, side, shape, tile):
    """The stacked-operand apply (one dot on [X; U]) against the two-dot kernel on the same
    bfloat16 / float32 operands: the same products in another accumulation grouping, so
    identical up to float32 summation order -- except sign(R) where |R| is at that level."""
    _matches_the_two_dot_kernel(precision, side, shape, tile)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("side,shape", [("right", (544, 256)), ("left", (256, 544))])
@pytest.mark.parametrize("variant", ["grouped+tma", "grouped+early+tma+regs168",
                                     "seq+tma+persist2", "grouped+regs128"])  # fmt: skip
def test_apply_v2_variants_match_the_two_dot_kernel(precision, side, shape, variant):
    """``projection_apply_v2`` (the tile's 7th field) against ``_apply_kernel`` with the same
    (BM, BN, BK): the same products in the same K order (bit-equal under the interpreter)."""
    _matches_the_two_dot_kernel(precision, side, shape, (64, 64, 32, 4, 3, 0, variant))


def _matches_the_two_dot_kernel(precision, side, shape, tile):
    from frugal_dist.kernels.projection_triton import fused_apply

    gen = torch.Generator(device="cuda").manual_seed(5)
    m, n = shape
    B, r = 3, 64
    dim = m if side == "left" else n
    P = torch.linalg.qr(torch.randn(B, dim, r, device="cuda", generator=gen)).Q.contiguous()
    G = [torch.randn(m, n, device="cuda", generator=gen) for _ in range(B)]
    W = [torch.randn(m, n, device="cuda", generator=gen) for _ in range(B)]
    a, c = (m, r) if side == "right" else (r, n)
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    X = torch.stack([g @ p if side == "right" else p.T @ g for g, p in zip(G, P)])
    U = torch.randn(B, a, c, device="cuda", generator=gen)
    Xk = _stored(B, a, c, side == "left", dt).copy_(X)
    Uk = _stored(B, a, c, side == "left", dt).copy_(U)
    hp = dict(decay=1 - 1e-3, c_u=-1e-2, c_f=-5e-3, rule="signsgd", precision=precision)
    W1, W2 = [w.clone() for w in W], [w.clone() for w in W]
    fused_apply(W1, G, P.to(dt), Xk, Uk, side, tile=tile[:5], **hp)
    fused_apply(W2, G, P.to(dt), Xk, Uk, side, tile=tile, **hp)
    for b in range(B):
        diff = (W2[b] - W1[b]).abs()
        assert (diff > 1e-5).float().mean() < 1e-3  # sign flips only (2 x 5e-3 each)
        assert diff[diff <= 1e-5].max() < 1e-6


def test_per_matrix_mm_down_matches_bmm():
    from frugal_dist.kernels import projection_triton as pt
    from frugal_dist.kernels.projection import project_down

    gen = torch.Generator(device="cuda").manual_seed(6)
    for side, (m, n) in (("right", (544, 256)), ("left", (256, 544))):
        dim = m if side == "left" else n
        P = torch.linalg.qr(torch.randn(3, dim, 64, device="cuda", generator=gen)).Q.contiguous()
        G = [torch.randn(m, n, device="cuda", generator=gen) for _ in range(3)]
        ref = project_down(G, P, side, precision="fp32", backend="bmm")
        old = pt.DOWN_BACKEND["tf32"]
        try:
            pt.DOWN_BACKEND["tf32"] = "mm"
            out = project_down(G, P, side, precision="tf32", backend="triton")
        finally:
            pt.DOWN_BACKEND["tf32"] = old
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-3)  # TF32 products


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("side,shape", [("right", (544, 256)), ("left", (256, 544))])
def test_aligned_down_matches_the_plain_down(precision, side, shape):
    """The ``aligned`` down tile (16-byte vector loads of G) computes what the plain tile does."""
    from frugal_dist.kernels.projection_triton import fused_down

    gen = torch.Generator(device="cuda").manual_seed(7)
    m, n = shape
    B, r = 3, 64
    P = torch.randn(B, m if side == "left" else n, r, device="cuda", generator=gen)
    P = P.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    G = [torch.randn(m, n, device="cuda", generator=gen) for _ in range(B)]
    outs = []
    for tile in ((128, 128, 32, 8, 3), (128, 128, 32, 8, 3, "aligned")):
        out = torch.empty((B, m, r) if side == "right" else (B, r, n), device="cuda")
        outs.append(fused_down(G, P, side, out, precision=precision, tile=tile))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
