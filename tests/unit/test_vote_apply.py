"""``frugal_dist.kernels.vote_apply.vote_apply_`` (majority vote fused into the state-free
update) against ``comm.bits.majority_from_packed`` followed by today's update (the group's
``W *= 1 - lr wd``, then ``apply_update`` of the float32 vote).

The torch path runs everywhere and must be bit-identical. The Triton path runs on CUDA or under
the CPU interpreter (``PYTHONPATH=$PWD:/work/triton_site TRITON_INTERPRET=1 pytest
tests/unit/test_vote_apply.py``): bit-identical without decay; with decay within one float32
rounding of p keep and one of the result (a GPU compiler may contract ``p keep + (-alpha) F``
into one FMA).
"""

from __future__ import annotations

import pytest
import torch

from frugal_dist.comm import bits
from frugal_dist.kernels import sign_bits
from frugal_dist.kernels.vote_apply import vote_apply_
from frugal_dist.optim.step_items import apply_update
from tests.triton_marks import needs_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]
# empty, shorter than a byte, whole bytes, a tail, more than one 4096-element tile
SIZES = [0, 1, 7, 8, 9, 64, 4097, 9001]


def _case(world: int, seed: int, ties: bool):
    """(params, per-rank gradients, gathered bits, byte offsets); with ``ties`` ranks 2k and
    2k+1 disagree everywhere (so an even W ties on every entry)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(DEV) for n in SIZES]
    grads = []
    for r in range(world):
        if ties and r % 2 == 1:
            grads.append([-x for x in grads[-1]])
        else:
            grads.append([torch.randn(n, generator=g).to(DEV) for n in SIZES])
    grads[0][5][:4] = torch.tensor([0.0, -0.0, float("nan"), -1e-30])  # +, +, -, - bits
    rows = [sign_bits.pack_signs(gs, impl="torch") for gs in grads]
    offsets, _ = sign_bits.packed_offsets(SIZES)
    return params, grads, torch.stack(rows), offsets


def _reference(params, gathered, offsets, alpha, decay):
    """Today's path: majority_from_packed per tensor, ``_foreach_mul_``, ``apply_update``."""
    out = [p.clone() for p in params]
    if decay != 0.0:
        torch._foreach_mul_(out, 1.0 - decay)
    for p, o in zip(out, offsets):
        n = p.numel()
        if n == 0:
            continue
        vote = bits.majority_from_packed(gathered[:, o : o + (n + 7) // 8].cpu(), n)
        apply_update(p, vote.to(p.device), -alpha)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 33])  # 33: the grouped count
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("decay", [0.0, 1e-3])
def test_vote_apply_matches_vote_then_update(impl, world, ties, decay):
    params, _, gathered, offsets = _case(world, 10 * world + int(ties), ties)
    alpha = 3e-3 * 0.25 * 0.5  # lr s_p s_i
    want = _reference(params, gathered, offsets, alpha, decay)
    got = [p.clone() for p in params]
    vote_apply_(got, gathered, offsets, alpha, decay=decay, impl=impl)
    eps = torch.finfo(torch.float32).eps
    for p, w, x in zip(params, want, got):
        if impl == "torch" or decay == 0.0 or DEV == "cpu":
            assert torch.equal(w, x)
        else:  # one FMA instead of two roundings: within the roundings of p keep and the sum
            assert ((x - w).abs() <= eps * (p.abs() + w.abs())).all()
    if ties and world % 2 == 0:  # every entry tied (but rank 0's +-0 / NaN): only decay moved p
        for i, (p, x) in enumerate(zip(params, got)):
            lo = 4 if i == 5 else 0
            assert torch.equal(x[lo:], (p * (1.0 - decay) if decay else p)[lo:])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead", [0, 3])  # 0: rows read as words; 3: an unaligned start, bytes
def test_vote_apply_reads_a_column_slice(impl, lead):
    """Params whose bits start after other tensors' (the sign reduce packs the float32-vote
    tensors first), and a gathered buffer whose rows are a slice of a wider one."""
    params, _, gathered, offsets = _case(3, 7, False)
    pad = torch.full((3, 5), 255, dtype=torch.uint8, device=DEV)
    wide = torch.cat([pad[:, :lead], gathered, pad], 1)
    view = wide[:, lead : lead + gathered.shape[1]]
    want = _reference(params[4:], gathered, offsets[4:], 1e-2, 0.0)
    got = [p.clone() for p in params[4:]]
    vote_apply_(got, view, offsets[4:], 1e-2, impl=impl)
    for w, x in zip(want, got):
        assert torch.equal(w, x)


def test_vote_apply_rejects_bad_input():
    gathered = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="float32"):
        vote_apply_([torch.zeros(8, dtype=torch.bfloat16)], gathered, [0], 1.0)
    with pytest.raises(ValueError, match="pass the\n?.*gathered row|gathered row"):
        vote_apply_([torch.zeros(40)], gathered, [0], 1.0)
    with pytest.raises(ValueError, match="uint8"):
        vote_apply_([torch.zeros(8)], gathered.float(), [0], 1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_majority_vote_reads_a_column_slice(impl):
    """``majority_vote`` of a row-strided slice equals that of the contiguous copy."""
    _, _, gathered, _ = _case(4, 3, False)
    wide = torch.cat([gathered, gathered], 1)
    part = wide[:, 5 : 5 + 700]
    assert torch.equal(
        sign_bits.majority_vote(part, impl=impl),
        sign_bits.majority_vote(part.contiguous(), impl="torch"),
    )
