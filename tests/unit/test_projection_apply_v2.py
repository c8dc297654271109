"""kernels/projection_apply_v2.py: every apply variant equals the plain kernel bit for bit
(CPU interpreter), and the tile table's 7th field (the variant) is validated."""

from __future__ import annotations

import pytest
import torch

from frugal_dist.kernels.projection import project_down
from frugal_dist.kernels.refresh import random_bases
from tests.triton_marks import needs_interpreter

VARIANTS = ["grouped", "early", "persist", "grouped+early+persist3", "tma",
            "tma+grouped+early+persist2+regs128", "seq", "seq+early+tma+persist2"]  # fmt: skip
BASE = (32, 32, 16, 4, 1)


def _operands(side, shape, r, B=2, seed=0):
    """W, G, P, X (K-contiguous on the left, as ``apply_projection`` hands it over), U."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    G = [torch.randn(m, n, generator=gen) for _ in range(B)]
    W = [torch.randn(m, n, generator=gen) for _ in range(B)]
    P = random_bases(n if side == "right" else m, r, list(range(B)), "cpu")
    X = project_down(G, P, side, precision="fp32", backend="torch")
    U = torch.randn(X.shape, generator=gen)
    if side == "left":
        X, U = X.mT.contiguous().mT, U.mT.contiguous().mT
    return W, G, P, X, U


CASES = [("right", (70, 40), 20), ("left", (40, 70), 20), ("right", (64, 96), 32),
         ("left", (96, 64), 32)]  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", ["signsgd", "sgd", "none"])
@pytest.mark.parametrize("side,shape,r", CASES)
def test_variant_equals_the_plain_kernel(variant, rule, side, shape, r):
    """Shapes that are not tile multiples (rows wrap / zero-pad into masked outputs) and a
    rank that is (32) or is not (20) a multiple of the K tile (16)."""
    from frugal_dist.kernels.projection_triton import fused_apply

    W, G, P, X, U = _operands(side, shape, r)
    kw = dict(decay=0.99, c_u=-0.07, c_f=-0.035, rule=rule, precision="fp32")
    want = [w.clone() for w in W]
    fused_apply(want, G, P, X, U, side, tile=BASE, **kw)
    got = [w.clone() for w in W]
    fused_apply(got, G, P, X, U, side, tile=(*BASE, 0, variant), **kw)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(want[0], W[0])  # the step did something


@needs_interpreter
@pytest.mark.parametrize("side,shape,r", CASES[:2])
def test_tma_describes_the_step_operands_and_declines_others(side, shape, r):
    """The operands as ``apply_projection`` hands them over (this file's ``_operands``) get
    descriptors, so the ``tma`` cases above ran them; a left X in its (B, r, n) layout (not
    flattenable) is declined (pointer loads instead)."""
    from frugal_dist.kernels import projection_apply_v2 as v2

    if not v2.tma_available():
        pytest.skip("this triton has no host-side tensor descriptors")
    _, _, P, X, U = _operands(side, shape, r)
    stores = v2.operand_stores(P, X, U, side)
    descs = v2.descriptors(stores, 32, 32, 16)
    assert descs is not None and [list(d.shape) for d in descs] == [
        [t.shape[0] * t.shape[1], r] for t in stores
    ]
    assert v2.descriptors(v2.operand_stores(P, X.contiguous(), U, "left"), 32, 32, 16) is None


def test_variant_strings_parse_and_bad_ones_name_the_token():
    pytest.importorskip("triton")  # the parser lives in the kernel module
    from frugal_dist.kernels.projection_apply_v2 import parse_variant

    assert parse_variant("base") == {"grouped": False, "early": False, "seq": False,
                                     "tma": False, "persist": 0, "maxnreg": None}  # fmt: skip
    assert parse_variant("grouped+persist3+tma+regs168+seq") == {
        "grouped": True,
        "early": False,
        "seq": True,
        "tma": True,
        "persist": 3,
        "maxnreg": 168,
    }
    assert parse_variant("persist")["persist"] == 1
    for bad, what in (("swizzle", "swizzle"), ("", "variant"), ("persist0", "k >= 1"),
                      ("regs", "regs"), ("regs300", "n <= 255")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            parse_variant(bad)


def test_tiles_file_takes_a_variant_and_rejects_bad_ones(tmp_path):
    pt = pytest.importorskip("frugal_dist.kernels.projection_triton")
    f = tmp_path / "tiles.json"
    f.write_text('{"apply": {"bf16.right": [64, 64, 64, 4, 4, 0, "grouped+early"], '
                 '"bf16": [64, 64, 64, 4, 4, 1, "base"]}}')  # fmt: skip
    tiles, _ = pt.load_tiles(f)
    assert tiles["apply"]["bf16.right"] == (64, 64, 64, 4, 4, 0, "grouped+early")
    assert pt.tile_variant(tiles["apply"]["bf16.right"])["early"]
    assert pt.tile_variant(tiles["apply"]["bf16"]) is None
    for entry, what in (('[64, 64, 64, 4, 4, 0, "fast"]', "unknown token 'fast'"),
                        ('[64, 64, 64, 4, 4, 1, "early"]', "stacked"),
                        ('[64, 64, 64, 4, 4, 0, 3]', "variant")):  # fmt: skip
        f.write_text(f'{{"apply": {{"bf16": {entry}}}}}')
        with pytest.raises(ValueError, match=f"apply.bf16.*{what}"):
            pt.load_tiles(f)
    for entry in ('[64, 64, 64, 4, 4, 0, "early"]', '[64, 64, 64, 4, 4, "fast"]'):
        f.write_text(f'{{"down": {{"bf16": {entry}}}}}')
        with pytest.raises(ValueError, match="down.bf16"):
            pt.load_tiles(f)
    f.write_text('{"down": {"bf16.2048x2048": [128, 256, 64, 8, 3, "aligned"]}}')
    assert pt.load_tiles(f)[0]["down"]["bf16.2048x2048"] == (128, 256, 64, 8, 3, "aligned")


@needs_interpreter
def test_unaligned_matrices_take_the_scalar_epilogue():
    """W / G at addresses that are not 16-byte multiples (views into a flat buffer at an odd
    offset) run with ALIGNED off and give the plain kernel's result."""
    from frugal_dist.kernels.projection_triton import fused_apply

    W, G, P, X, U = _operands("right", (70, 40), 20)
    flat = torch.zeros(1 + 2 * 70 * 40)
    views = [flat[1 + b * 2800 : 1 + (b + 1) * 2800].view(70, 40) for b in range(2)]
    assert all(v.data_ptr() % 16 for v in views)
    kw = dict(decay=0.99, c_u=-0.07, c_f=-0.035, rule="signsgd", precision="fp32")
    want = [w.clone() for w in W]
    fused_apply(want, G, P, X, U, "right", tile=BASE, **kw)
    for v, w in zip(views, W, strict=True):
        v.copy_(w)
    fused_apply(views, G, P, X, U, "right", tile=(*BASE, 0, "grouped+early+tma"), **kw)
    for a, b in zip(views, want, strict=True):
        assert torch.equal(a, b)


@needs_interpreter
@pytest.mark.parametrize("side,shape", [("right", (70, 40)), ("left", (40, 70))])
@pytest.mark.parametrize("offset", [0, 1])
def test_aligned_down_equals_the_plain_down(side, shape, offset):
    """The ``aligned`` down tile (vector loads of G, only where every address is a 16-byte
    multiple: ``offset`` 1 puts the gradients at odd addresses) gives the plain result."""
    from frugal_dist.kernels.projection_triton import fused_down

    _, G, P, X, _ = _operands(side, shape, 20)
    flat = torch.zeros(offset + 2 * G[0].numel())
    views = [flat[offset + b * g.numel() : offset + (b + 1) * g.numel()].view(g.shape)
             for b, g in enumerate(G)]  # fmt: skip
    for v, g in zip(views, G, strict=True):
        v.copy_(g)
    want = torch.empty_like(X)
    fused_down(G, P, side, want, precision="fp32", tile=BASE)
    got = torch.empty_like(X)
    fused_down(views, P, side, got, precision="fp32", tile=(*BASE, "aligned"))
    assert torch.equal(got, want)
