"""The fused projection state phase (``kernels.projection_state``), the copy-free stacking of
batch operands and the bases held once (``optim.projection_batch``), checked on the CPU: the
kernel under the Triton interpreter (``PYTHONPATH=$PWD:/work/triton_site TRITON_INTERPRET=1``,
skipped otherwise) against ``core.rules`` (the torch foreach path), the step against the oracle
``ReferenceFRUGAL``."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.core.rules import state_full_directions
from frugal_dist.optim.projection_batch import stacked
from tests.helpers import clone_params, grad_stream, make_params, max_diff, set_grads
from tests.triton_marks import needs_interpreter

BETAS = (0.9, 0.999)

# repeated shapes: right (m >= n) and left (m < n) batches of 3 and 2 matrices, and a single one
SHAPES = [(24, 16), (24, 16), (16, 24), (16, 24), (24, 16), (20, 20)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=1e-2, update_gap=3, weight_decay=0.05, inactive_lr_scale=0.5,
              proj_params_lr_scale=0.8, subspace="projection", density=0.3)  # fmt: skip
TYPES = {
    "random": dict(proj_type="random"),
    "svd-warm": dict(proj_type="svd", svd_method="warm"),
}


def _moments(B: int, A: int, C: int, seed: int = 0) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    ms = [0.1 * torch.randn(A, C, generator=gen) for _ in range(B)]
    vs = [torch.rand(A, C, generator=gen) for _ in range(B)]
    return ms, vs


def _stored(B: int, A: int, C: int, transposed: bool, dtype=torch.float32) -> torch.Tensor:
    """A (B, A, C) tensor, stored (B, C, A) when ``transposed`` (the left apply layout)."""
    return torch.empty(B, C, A, dtype=dtype).mT if transposed else torch.empty(B, A, C, dtype=dtype)


# ------------------------------------------------------------------------------ the kernel
@needs_interpreter
@pytest.mark.parametrize("x_t", [False, True], ids=["x", "xT"])
@pytest.mark.parametrize("u_t", [False, True], ids=["u", "uT"])
@pytest.mark.parametrize("steps", [[4, 4, 4], [1, 7, 3]], ids=["same-t", "per-item-t"])
def test_adamw_state_matches_the_foreach_rules(x_t, u_t, steps):
    """m, v and U against ``core.rules.state_full_directions`` (the CPU path): the kernel
    multiplies by float32 reciprocals of the bias corrections (last-bit differences)."""
    from frugal_dist.kernels.projection_state import adamw_state

    B, A, C = 3, 37, 70  # not multiples of the tile: masked edges
    gen = torch.Generator().manual_seed(1)
    x = _stored(B, A, C, x_t).copy_(torch.randn(B, A, C, generator=gen))
    ms, vs = _moments(B, A, C)
    ref_m, ref_v = [m.clone() for m in ms], [v.clone() for v in vs]
    bufs = [{"exp_avg": m, "exp_avg_sq": v} for m, v in zip(ref_m, ref_v)]
    ref = state_full_directions("adamw", [x[b].contiguous() for b in range(B)], bufs, steps,
                                BETAS, 1e-8)  # fmt: skip
    out = _stored(B, A, C, u_t)
    adamw_state(x, ms, vs, steps, BETAS, 1e-8, out)
    for b in range(B):
        torch.testing.assert_close(out[b], ref[b], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(ms[b], ref_m[b], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(vs[b], ref_v[b], rtol=1e-6, atol=1e-8)


@needs_interpreter
def test_adamw_state_bf16_outputs_are_the_rounded_float32_ones():
    """A bfloat16 U and the bfloat16 copy of X are the float32 results rounded once; the
    moments stay float32 and identical."""
    from frugal_dist.kernels.projection_state import adamw_state

    B, A, C = 2, 16, 40
    x = torch.randn(B, A, C, generator=torch.Generator().manual_seed(2))
    ms, vs = _moments(B, A, C)
    ms32, vs32 = [m.clone() for m in ms], [v.clone() for v in vs]
    u32 = torch.empty(B, A, C)
    adamw_state(x, ms32, vs32, [2, 2], BETAS, 1e-8, u32)
    u16 = _stored(B, A, C, True, torch.bfloat16)
    x16 = _stored(B, A, C, True, torch.bfloat16)
    adamw_state(x, ms, vs, [2, 2], BETAS, 1e-8, u16, x16)
    # within one bfloat16 unit (the interpreter rounds toward zero, CUDA to nearest even)
    torch.testing.assert_close(u16.float(), u32, rtol=2**-7, atol=0)
    torch.testing.assert_close(x16.float(), x, rtol=2**-7, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(ms, ms32))


def _offset_moments(B: int, A: int, C: int, seed: int = 0) -> tuple[list, list]:
    """``_moments``'s values in contiguous tensors that start 4 bytes past a 16-byte boundary."""
    ms, vs = _moments(B, A, C, seed)
    shifted = [torch.empty(A * C + 1)[1:].view(A, C).copy_(t) for t in ms + vs]
    return shifted[:B], shifted[B:]


def test_vector_moments_needs_16_byte_addresses_and_rows_of_4():
    pytest.importorskip("triton")
    from frugal_dist.kernels.projection_state import vector_moments

    ms, vs = _moments(2, 3, 8)
    assert vector_moments(ms, vs, 8)
    assert not vector_moments(ms, vs, 6)  # rows of 6: a group of 4 can straddle 16 bytes
    oms, ovs = _offset_moments(2, 3, 8)
    assert not vector_moments(ms, [vs[0], ovs[1]], 8)
    assert not vector_moments([oms[0], ms[1]], vs, 8)


@needs_interpreter
@pytest.mark.parametrize("transposed", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("clip", [None, 0.37], ids=["noclip", "clip"])
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "A,C,offset,vector",
    [(37, 72, False, True), (37, 70, False, False), (37, 72, True, False)],
    ids=["aligned", "rows-of-70", "offset-moments"],
)  # fmt: skip
def test_adamw_state_vector_moments_path_is_bit_identical(A, C, offset, vector, u_dtype, clip,
                                                          transposed, monkeypatch):  # fmt: skip
    """``ALIGNED`` (16-byte m / v addresses, C % 4 == 0: the compiler's vector hints) changes
    no bit of m, v, U or X's copy against the scalar path (``vector_moments`` forced off);
    unaligned moments take the scalar path. Masked edges along A and C; X and U stored (B, A, C)
    or, left, (B, C, A); a per-matrix step count."""
    from frugal_dist.kernels import projection_state as ps

    B, steps = 3, [2, 5, 2]
    gen = torch.Generator().manual_seed(5)
    x = _stored(B, A, C, transposed).copy_(torch.randn(B, A, C, generator=gen))
    coef = None if clip is None else torch.tensor(clip)
    real, chosen = ps.vector_moments, []

    def run(force_off: bool):
        ms, vs = (_offset_moments if offset else _moments)(B, A, C)
        out = _stored(B, A, C, transposed, u_dtype)
        copy = _stored(B, A, C, transposed, torch.bfloat16) if u_dtype == torch.bfloat16 else None
        monkeypatch.setattr(ps, "vector_moments",
                            (lambda *a: False) if force_off else
                            (lambda *a: chosen.append(real(*a)) or chosen[-1]))  # fmt: skip
        ps.adamw_state(x, ms, vs, steps, BETAS, 1e-8, out, copy, clip=coef)
        return [*ms, *vs, out] + ([] if copy is None else [copy])

    hinted, plain = run(False), run(True)
    assert chosen == [vector]
    assert all(torch.equal(a, b) for a, b in zip(hinted, plain, strict=True))


def test_adamw_state_rejects_bad_input():
    pytest.importorskip("triton")
    from frugal_dist.kernels.projection_state import adamw_state

    x = torch.randn(2, 4, 6)
    ms, vs = _moments(2, 4, 6)
    with pytest.raises(ValueError, match="out must be a float32"):
        adamw_state(x, ms, vs, [1, 1], BETAS, 1e-8, torch.empty(2, 6, 4))
    with pytest.raises(ValueError, match="exp_avg_sq\\[1\\] must be a contiguous float32"):
        adamw_state(x, ms, [vs[0], vs[1].T], [1, 1], BETAS, 1e-8, torch.empty_like(x))
    with pytest.raises(ValueError, match="need 2 exp_avg"):
        adamw_state(x, ms[:1], vs, [1, 1], BETAS, 1e-8, torch.empty_like(x))
    with pytest.raises(ValueError, match="x must be float32"):
        adamw_state(x.double(), ms, vs, [1, 1], BETAS, 1e-8, torch.empty_like(x))


# ------------------------------------------------------------------------------ stacking
@pytest.mark.parametrize("transposed", [False, True])
def test_stacked_returns_a_view_of_batch_rows(transposed):
    base = _stored(4, 3, 5, transposed).copy_(torch.randn(4, 3, 5))
    rows = list(base.unbind(0))
    out = stacked(rows)
    assert out.data_ptr() == base.data_ptr() and torch.equal(out, base)
    out[2, 1, 1] = 7.0  # a view: writes land in the rows
    assert rows[2][1, 1] == 7.0
    assert stacked(rows[:1]).data_ptr() == base.data_ptr()


def test_stacked_copies_what_is_not_a_batch():
    base = torch.randn(4, 3, 5)
    for mats in ([base[0], base[2], base[1]], [base[0], torch.randn(3, 5)],
                 [base[0, :, :4], base[1, :, :4]][:1] + [torch.randn(3, 4)]):  # fmt: skip
        out = stacked(mats)
        assert torch.equal(out, torch.stack(mats))
        assert out.data_ptr() != base.data_ptr()
    overlapping = [base.view(-1)[i : i + 15].view(3, 5) for i in (0, 5, 10)]
    assert torch.equal(stacked(overlapping), torch.stack(overlapping))


# ------------------------------------------------------------------------------ the step
def _run(steps: int, opt_kw: dict, **kw):
    ps = make_params(SHAPES)
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **opt_kw, **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    for grads in grad_stream(SHAPES, steps):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
    return ps, qs, opt


@needs_interpreter
@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_triton_step_runs_the_fused_state_and_follows_the_oracle(kind, precision, monkeypatch):
    """``kernels="triton"``: down, fused state and apply kernels over 2 refreshes (the
    interpreter computes tf32 products in float32): float32 rounding only, 1e-5. (The
    interpreter's bfloat16 ``tl.dot`` is not usable -- it gives garbage on main too -- so the
    bf16 step is checked on CUDA: tests/gpu/test_projection_state.py.)"""
    from frugal_dist.kernels import projection_state

    calls: list[int] = []
    real = projection_state.adamw_state

    def counted(x, *a, **k):
        calls.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(projection_state, "adamw_state", counted)
    ps, qs, _ = _run(6, {"kernels": "triton"}, proj_precision=precision, **COMMON, **TYPES[kind])
    assert calls and sum(calls) == 6 * len(SHAPES)  # every matrix, every step, batched
    assert len(calls) == 6 * 3  # three (shape, side) batches per step
    assert max_diff(ps, qs) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_steady_steps_stack_and_cast_nothing(precision, monkeypatch):
    """Between refreshes the batched step builds no stack (``torch.stack``) and no cast copy
    (``Tensor.to``) of bases, compact gradients or directions: everything is laid out once."""
    ps = make_params(SHAPES)
    opt = FRUGAL([{"params": ps, "names": NAMES}], kernels="triton", proj_precision=precision,
                 **{**COMMON, "update_gap": 10}, **TYPES["random"])  # fmt: skip
    grads = list(grad_stream(SHAPES, 3))
    set_grads(ps, grads[0])
    opt.step()  # refresh: the bases are stacked here
    counts = {"stack": 0, "to": 0}
    real_stack, real_to = torch.stack, torch.Tensor.to

    def ours() -> bool:  # called from the projection step's modules (not e.g. nonfinite's norms)
        return "projection" in os.path.basename(sys._getframe(2).f_code.co_filename)

    def count_stack(*a, **k):
        counts["stack"] += ours()
        return real_stack(*a, **k)

    def count_to(self, *a, **k):
        out = real_to(self, *a, **k)
        counts["to"] += out is not self and ours()
        return out

    monkeypatch.setattr(torch, "stack", count_stack)
    monkeypatch.setattr(torch.Tensor, "to", count_to)
    for g in grads[1:]:
        set_grads(ps, g)
        opt.step()
    assert counts == {"stack": 0, "to": 0}


@needs_interpreter
def test_bf16_direction_and_operand_copy_are_one_buffer_at_every_refresh(monkeypatch):
    """bf16: the state kernel writes U and the operand copy of X into the two halves of one
    buffer, so the stacked apply kernel's U - X offset (an int argument Triton specialises on)
    is B a c elements at every step, across refreshes -- not an allocator-dependent distance."""
    from frugal_dist.kernels import projection_state

    seen: list[tuple[int, int]] = []
    real = projection_state.adamw_state

    def spy(x, m, v, t, betas, eps, u, x_op=None, clip=None):
        assert (
            x_op is not None and u.untyped_storage().data_ptr() == x_op.untyped_storage().data_ptr()
        )
        assert u.stride() == x_op.stride()
        seen.append((u.data_ptr() - x_op.data_ptr(), u.numel() * u.element_size()))
        return real(x, m, v, t, betas, eps, u, x_op, clip=clip)

    monkeypatch.setattr(projection_state, "adamw_state", spy)
    ps = make_params(SHAPES)
    opt = FRUGAL([{"params": ps, "names": NAMES}], kernels="triton", proj_precision="bf16",
                 **{**COMMON, "update_gap": 2}, **TYPES["random"])  # fmt: skip
    for g in grad_stream(SHAPES, 5):  # refreshes at steps 1, 3 and 5
        set_grads(ps, g)
        opt.step()
    assert len(seen) == 5 * 3 and all(delta == nbytes for delta, nbytes in seen)


@needs_interpreter
@pytest.mark.parametrize("kind", list(TYPES))
def test_bases_are_held_once(kind):
    """fp32 / tf32: each item's basis (and svd's ``proj_basis`` state) is a slice of the one
    stacked buffer the kernels read; no second copy of the bases stays alive."""
    ps, _, opt = _run(4, {"kernels": "triton"}, proj_precision="tf32", **COMMON, **TYPES[kind])
    in_use = opt.selections_in_use()
    storages: dict[int, set] = {}
    for p, name in zip(ps, NAMES):
        basis = in_use[name][1].basis
        if kind == "svd-warm":
            assert opt.state[p]["proj_basis"] is basis
        storages.setdefault(basis.untyped_storage().data_ptr(), set()).add(tuple(p.shape))
    # one buffer per (shape, side) batch, and every same-shape basis in it
    assert sorted(storages.values(), key=sorted) == [{(16, 24)}, {(20, 20)}, {(24, 16)}]
    assert opt.aux_bytes() == (0 if kind == "svd-warm" else 4 * (5 * 16 * 5 + 20 * 6))


@needs_interpreter
@pytest.mark.parametrize("kind", list(TYPES))
def test_resume_from_a_saved_state_dict_is_exact(kind):
    """A state dict saved mid-run (bases as views of one buffer) and loaded into a fresh
    optimizer continues exactly like the uninterrupted run."""
    kw = dict(kernels="triton", proj_precision="tf32", **COMMON, **TYPES[kind])
    grads = list(grad_stream(SHAPES, 7))
    ps = make_params(SHAPES)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    qs = clone_params(ps)
    for g in grads:
        set_grads(ps, g)
        opt.step()
    opt2 = FRUGAL([{"params": qs, "names": NAMES}], **kw)
    for i, g in enumerate(grads):
        if i == 4:
            buf = io.BytesIO()
            torch.save(opt2.state_dict(), buf)
            buf.seek(0)
            opt2 = FRUGAL([{"params": qs, "names": NAMES}], **kw)
            opt2.load_state_dict(torch.load(buf))
        set_grads(qs, g)
        opt2.step()
    assert max_diff(ps, qs) == 0.0


# ------------------------------------------------------------------------------ stacked apply
@needs_interpreter
@pytest.mark.parametrize("rule", ["signsgd", "sgd"])
@pytest.mark.parametrize("side,shape", [("right", (70, 40)), ("left", (40, 70))])
@pytest.mark.parametrize("layout", ["alike", "different"])
def test_stacked_apply_kernel_equals_the_two_dot_kernel(rule, side, shape, layout):
    """``_apply_stacked_kernel`` (tile entry stacked = 1: both products as one dot on [X; U])
    against ``_apply_kernel`` and the float64 oracle; shapes and the rank (20, K tile 16) are
    not tile multiples, so every mask runs. fp32 (the interpreter's bfloat16 dot is unusable).
    ``different``: X and U in different layouts (the kernel's host side lays X out like U)."""
    from frugal_dist.kernels.projection import reference_projection_step
    from frugal_dist.kernels.projection_triton import fused_apply

    gen = torch.Generator().manual_seed(3)
    m, n = shape
    B, r = 3, 20
    dim = m if side == "left" else n
    P = torch.linalg.qr(torch.randn(B, dim, r, generator=gen)).Q.contiguous()
    G = [torch.randn(m, n, generator=gen) for _ in range(B)]
    W = [torch.randn(m, n, generator=gen) for _ in range(B)]
    a, c = (m, r) if side == "right" else (r, n)
    X = torch.stack([g @ p if side == "right" else p.T @ g for g, p in zip(G, P)])
    U = _stored(B, a, c, side == "left").copy_(torch.randn(B, a, c, generator=gen))
    if layout == "alike":
        X = torch.empty_like(U).copy_(X)
    hp = dict(decay=1 - 1e-2 * 0.1, c_u=-1e-2 * 0.8, c_f=-1e-2 * 0.8 * 0.5, rule=rule,
              precision="fp32")  # fmt: skip
    W1, W2 = [w.clone() for w in W], [w.clone() for w in W]
    fused_apply(W1, G, P, X, U, side, tile=(32, 32, 16, 4, 1), **hp)
    fused_apply(W2, G, P, X, U, side, tile=(32, 32, 16, 4, 1, 1), **hp)
    for b in range(B):
        torch.testing.assert_close(W2[b], W1[b], atol=1e-6, rtol=1e-6)
        _, ref = reference_projection_step(W[b], G[b], P[b], U[b].contiguous(), side,
                                           lr=1e-2, weight_decay=0.1, s_p=0.8, s_i=0.5,
                                           rule=rule)  # fmt: skip
        torch.testing.assert_close(W2[b].double(), ref, atol=1e-5, rtol=1e-5)


def test_tiles_file_takes_shape_and_side_tiles_stacked_flags_and_mm_down(tmp_path, monkeypatch):
    pt = pytest.importorskip("frugal_dist.kernels.projection_triton")
    f = tmp_path / "tiles.json"
    f.write_text('{"apply": {"bf16": [128, 64, 64, 4, 3], "bf16.right": [64, 128, 64, 4, 3, 1]},'
                 ' "down_backend": {"tf32": "mm"}}')  # fmt: skip
    tiles, down = pt.load_tiles(f)
    assert tiles["apply"]["bf16.right"] == (64, 128, 64, 4, 3, 1)
    assert down["tf32"] == "mm"
    f.write_text('{"apply": {"bf16.right": [64, 128, 64, 4, 3], "bf16.48x16": [32, 64, 64, 4, 3]},'
                 ' "down": {"bf16.48x16": [64, 64, 32, 4, 2]}}')  # fmt: skip
    tiles, _ = pt.load_tiles(f)
    monkeypatch.setattr(pt, "TILES", tiles)
    cuda = torch.device("cuda")  # the table applies on CUDA (the interpreter has its own tile)
    assert pt._tile("apply", "bf16", cuda, (48, 16), "right") == (32, 64, 64, 4, 3)  # shape
    assert pt._tile("apply", "bf16", cuda, (64, 16), "right") == (64, 128, 64, 4, 3)  # side
    assert pt._tile("apply", "bf16", cuda, (16, 64), "left") == tiles["apply"]["bf16"]
    assert pt._tile("down", "bf16", cuda, (48, 16)) == (64, 64, 32, 4, 2)
    for bad in ('{"down": {"bf16.right": [64, 64, 64, 4, 3]}}',
                '{"apply": {"bf16.up": [64, 64, 64, 4, 3]}}',
                '{"apply": {"bf16.48x": [64, 64, 64, 4, 3]}}',
                '{"apply": {"bf16": [64, 64, 64, 4, 3, 2]}}',
                '{"down": {"bf16": [64, 64, 64, 4, 3, 1]}}'):  # fmt: skip
        f.write_text(bad)
        with pytest.raises(ValueError, match="must be five positive ints"):
            pt.load_tiles(f)


@needs_interpreter
@pytest.mark.parametrize("side,shape", [("right", (40, 24)), ("left", (24, 40))])
def test_per_matrix_mm_down_equals_the_kernel(side, shape, monkeypatch):
    """``down_backend = "mm"``: one product per matrix into the same (left: (B, n, r)-stored)
    result, no stacked copy of G."""
    from frugal_dist.kernels import projection_triton as pt
    from frugal_dist.kernels.projection import project_down

    gen = torch.Generator().manual_seed(4)
    m, n = shape
    dim = m if side == "left" else n
    P = torch.linalg.qr(torch.randn(3, dim, 6, generator=gen)).Q.contiguous()
    G = [torch.randn(m, n, generator=gen) for _ in range(3)]
    ref = project_down(G, P, side, precision="tf32", backend="triton")
    monkeypatch.setattr(pt, "down_on_triton", lambda *a: False)
    monkeypatch.setitem(pt.DOWN_BACKEND, "tf32", "mm")
    monkeypatch.setattr(torch, "stack", None)  # any stacking would fail
    out = project_down(G, P, side, precision="tf32", backend="triton")
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
