"""The 1-bit sign kernels (``kernels.sign_bits``: pack, float32 vote, packed vote;
``kernels.vote_apply``) compiled on CUDA against the torch path (itself tested against
``comm.bits``): LLaMA-like shapes (many tiles, ragged tails), W = 1..33 voters (bit-sliced
counts of every depth and the grouped count), rows read as 32-bit words and as bytes (an
unaligned slice); and a sign-mode step over simulated ranks against ``kernels="torch"``.
Everything bit-identical but vote-apply with decay (one FMA: within two float32 roundings).
Skipped without CUDA or triton."""

from __future__ import annotations

import pytest
import torch

from frugal_dist.kernels import sign_bits as sb
from frugal_dist.kernels.elementwise import triton_available
from frugal_dist.kernels.vote_apply import vote_apply_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
]
SHAPES = [(2048, 5461), (2048,), (7, 3), (0,), (1,), (3, 8193), (256, 2048)]
WORLDS = [1, 2, 3, 4, 31, 33]  # count depths 1-3, the largest unrolled (5), the grouped


def _grads(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in SHAPES]
    out[1][:4] = torch.tensor([0.0, -0.0, float("nan"), -1e-30])
    return out


def _gathered(world: int, ts: list[torch.Tensor]) -> torch.Tensor:
    """W packed rows; the upper half of an even W mostly the complement of the lower (ties)."""
    rows = [sb.pack_signs([t * (r + 1) - r * 0.1 for t in ts], impl="triton") for r in range(world)]
    gathered = torch.stack(rows)
    if world % 2 == 0:
        half = gathered.shape[1] // 2
        gathered[world // 2 :, :half] = ~gathered[: world // 2, :half]
    return gathered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_matches_torch_path_and_views_pack_as_one(dtype):
    ts = _grads(0, dtype)
    want = sb.pack_signs(ts, impl="torch")
    assert torch.equal(sb.pack_signs(ts, impl="triton"), want)
    flat = torch.cat([t.reshape(-1) for t in ts])
    views = [v.view(t.shape) for v, t in zip(torch.split(flat, [t.numel() for t in ts]), ts)]
    assert torch.equal(sb.pack_signs(views, impl="triton"), want)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("lead", [0, 1])  # 0: words; 1: an unaligned column slice, bytes
def test_votes_match_torch_path(world, lead):
    ts = _grads(world)
    gathered = _gathered(world, ts)
    wide = torch.zeros((world, gathered.shape[1] + 8), dtype=torch.uint8, device="cuda")
    wide[:, lead : lead + gathered.shape[1]] = gathered
    part = wide[:, lead : lead + gathered.shape[1]]
    assert torch.equal(sb.majority_vote(part, impl="triton"), sb.majority_vote(part, impl="torch"))
    assert torch.equal(sb.majority_bits(part, impl="triton"), sb.majority_bits(part, impl="torch"))


@pytest.mark.parametrize("world", [2, 3, 33])
@pytest.mark.parametrize("decay", [0.0, 1e-3])
def test_vote_apply_matches_torch_path(world, decay):
    ts = _grads(40 + world)
    gathered = _gathered(world, ts)
    offsets, _ = sb.packed_offsets([t.numel() for t in ts])
    g = torch.Generator(device="cuda").manual_seed(1)
    params = [torch.randn(t.shape, device="cuda", generator=g) for t in ts]
    want = [p.clone() for p in params]
    got = [p.clone() for p in params]
    vote_apply_(want, gathered, offsets, 3e-3, decay=decay, impl="torch")
    vote_apply_(got, gathered, offsets, 3e-3, decay=decay, impl="triton")
    eps = torch.finfo(torch.float32).eps
    for p, w, x in zip(params, want, got):
        if decay == 0.0:
            assert torch.equal(w, x)
        else:
            assert ((x - w).abs() <= eps * (p.abs() + w.abs())).all()


STEP_SHAPES = [(64, 48), (48, 64), (40, 40), (33, 7)]  # (33, 7): 231 entries, a ragged tail
STEP_CASES = {
    "block": dict(subspace="block", density=0.4),  # inactive blocks: vote-apply from the bits
    "rho0": dict(subspace="block", density=0.0),
    # coordinates: the residual (G, selected entries zeroed) is voted to float32 (no GEMM in
    # the residual, so both runs vote on the same bits)
    "columns": dict(subspace="coordinate", coord_choice="columns", density=0.3),
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
@pytest.mark.parametrize("world", [2, 4])
def test_sign_mode_step_with_kernels_matches_torch(case, world):
    """``residual_comm="sign"`` over ``world`` simulated ranks on CUDA: the Triton pack / vote /
    vote-apply step equals the ``kernels="torch"`` one (AdamW kernels within rounding)."""
    from frugal_dist import FRUGAL
    from tests.distributed import workers
    from tests.helpers import make_params, max_diff

    out = {}
    for kernels in ("torch", "auto"):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(STEP_SHAPES)]
        opt = FRUGAL(params, lr=1e-2, update_gap=2, seed=3, weight_decay=0.05,
                     reduce_gradients=True, residual_comm="sign", kernels=kernels,
                     **STEP_CASES[case])  # fmt: skip
        for step in range(4):
            grads = [[g.cuda() for g in workers.rank_grads(step, r, STEP_SHAPES)]
                     for r in range(world)]  # fmt: skip
            opt.step_ranks(grads)
        out[kernels] = params
    assert max_diff(out["auto"], out["torch"]) < 1e-5
    assert max_diff(out["auto"], [p.cuda() for p in make_params(STEP_SHAPES)]) > 1e-3
