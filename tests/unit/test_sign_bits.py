"""``frugal_dist.kernels.sign_bits`` (fused pack and majority vote) against ``comm.bits``, the
per-tensor torch code that defines the format and the vote (tie rule included).

The torch path runs everywhere; the Triton path on CUDA or under the CPU interpreter
(``PYTHONPATH=$PWD:/work/triton_site TRITON_INTERPRET=1 pytest tests/unit/test_sign_bits.py``);
without either, skipped. Everything here must be bit-identical: packs are compared byte for byte,
votes with ``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch

from frugal_dist.comm import bits
from frugal_dist.kernels import sign_bits
from frugal_dist.kernels.elementwise import triton_available
from tests.triton_marks import TRITON_RUNS, needs_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]
# sizes: empty, shorter than a byte, whole bytes, a tail, more than one 4096-element tile
SIZES = [0, 1, 7, 8, 9, 64, 4097, 9001]


def _tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, generator=g) for n in SIZES]
    special = out[5]  # signed zeros and NaN: 0.0 and -0.0 vote +1, NaN votes -1
    special[:6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), -1e-30])
    return [t.to(dtype).to(DEV) for t in out]


def _oracle_pack(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([bits.pack_signs(t.cpu()) for t in ts])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_matches_comm_bits_byte_for_byte(impl, dtype):
    ts = _tensors(1, dtype)
    ts.append(torch.randn(6, 5, device=DEV).t())  # non-contiguous: the torch fallback
    got = sign_bits.pack_signs(ts, impl=impl)
    assert got.dtype == torch.uint8
    assert torch.equal(got.cpu(), _oracle_pack(ts))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 17])  # 17: the looped kernel
def test_vote_matches_majority_from_packed(impl, world):
    ts = _tensors(2)
    offsets, total = sign_bits.packed_offsets([t.numel() for t in ts])
    gen = torch.Generator().manual_seed(world)
    gathered = torch.randint(0, 256, (world, total), dtype=torch.uint8, generator=gen)
    votes = sign_bits.vote_views(sign_bits.majority_vote(gathered.to(DEV), impl=impl), ts)
    for t, o, v in zip(ts, offsets, votes):
        want = bits.majority_from_packed(gathered[:, o : o + (t.numel() + 7) // 8], t.numel())
        assert v.shape == t.shape and v.dtype == torch.float32
        assert torch.equal(v.cpu(), want.view(t.shape))


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_vote_zero_and_round_trip(impl):
    """Two ranks with opposite signs tie (0); equal signs keep theirs; pack -> vote of one rank
    is the sign with 0 counted as +1."""
    x = torch.randn(1000, device=DEV)
    a = sign_bits.pack_signs([x], impl=impl)
    b = sign_bits.pack_signs([-x], impl=impl)
    tie = sign_bits.majority_vote(torch.stack([a, b]), impl=impl)[: x.numel()]
    assert torch.equal(tie, torch.zeros_like(tie))
    same = sign_bits.majority_vote(torch.stack([a, a, b]), impl=impl)[: x.numel()]
    assert torch.equal(same, torch.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_path_chunks_agree(impl, monkeypatch):
    """Inputs larger than the torch path's chunk (shrunk here) give the same bytes and votes."""
    monkeypatch.setattr(sign_bits, "CHUNK", 64)
    ts = _tensors(3)
    packed = sign_bits.pack_signs(ts, impl=impl)
    assert torch.equal(packed.cpu(), _oracle_pack(ts))
    gathered = torch.stack([packed, sign_bits.pack_signs([-t for t in ts], impl=impl), packed])
    votes = sign_bits.vote_views(sign_bits.majority_vote(gathered, impl=impl), ts)
    for t, v in zip(ts, votes):
        assert torch.equal(v, torch.where(t >= 0, 1.0, -1.0).view(t.shape))


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="at least one tensor"):
        sign_bits.pack_signs([])
    with pytest.raises(ValueError, match="float tensors"):
        sign_bits.pack_signs([torch.ones(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="uint8"):
        sign_bits.majority_vote(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="impl must be one of"):
        sign_bits.pack_signs([torch.ones(3)], impl="cuda")
    with pytest.raises(ValueError, match="the tensors that were packed"):
        sign_bits.vote_views(torch.zeros(8), [torch.ones(9)])
    if triton_available() and not TRITON_RUNS:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            sign_bits.pack_signs([torch.ones(3)], impl="triton")


@needs_triton
def test_triton_int64_offsets_path(monkeypatch):
    """The int64-offset variant (buffers near 2^31 entries) forced on small inputs."""
    from frugal_dist.kernels import elementwise_triton as ek
    from frugal_dist.kernels import sign_bits_triton as tk

    monkeypatch.setattr(tk, "_wide", lambda *args: True)
    monkeypatch.setattr(ek, "_TILE_MAPS", {})  # the shared tile-map cache
    ts = _tensors(4)
    packed = sign_bits.pack_signs(ts, impl="triton")
    assert torch.equal(packed.cpu(), _oracle_pack(ts))
    gen = torch.Generator().manual_seed(5)
    gathered = torch.randint(0, 256, (3, packed.numel()), dtype=torch.uint8, generator=gen)
    vote = sign_bits.majority_vote(gathered.to(DEV), impl="triton")
    want = bits.majority_from_packed(gathered, 8 * packed.numel())
    assert torch.equal(vote.cpu(), want)
    assert torch.equal(sign_bits.majority_bits(gathered.to(DEV), impl="triton").cpu(),
                       sign_bits.majority_bits(gathered, impl="torch"))  # fmt: skip
    from frugal_dist.kernels.vote_apply import vote_apply_

    params = [torch.zeros_like(t) for t in ts]
    offsets, _ = sign_bits.packed_offsets([t.numel() for t in ts])
    vote_apply_(params, gathered.to(DEV), offsets, -1.0, impl="triton")  # p <- F
    assert torch.equal(torch.cat([p.cpu() for p in params]),
                       torch.cat([v.cpu() for v in sign_bits.vote_views(vote, ts)]))  # fmt: skip


def _oracle_bits(gathered: torch.Tensor) -> torch.Tensor:
    """The packed vote from ``comm.bits``: [F = +1] and, for even W, [F = 0] as packed rows."""
    world, nbytes = gathered.shape
    f = bits.majority_from_packed(gathered.cpu(), 8 * nbytes)
    rows = [bits.pack_signs(torch.where(f > 0, 1.0, -1.0))]
    if world % 2 == 0:
        rows.append(bits.pack_signs(torch.where(f == 0, 1.0, -1.0)))
    return torch.stack(rows)


# worlds: each bit-sliced depth (1..5 levels), the largest unrolled (31), the grouped sum (33+)
WORLDS = [1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 64]
# (bytes, column offset into a wider buffer): words (aligned, B % 4 == 0), a ragged last word,
# bytes (an unaligned start), one byte, more than one program of units
SLICES = [(4, 0), (5, 0), (130, 0), (131, 4), (130, 1), (1, 3), (4099, 0), (4097, 2)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", WORLDS)
def test_vote_and_packed_vote_every_world_and_tail(impl, world):
    """``majority_vote`` (float32) and ``majority_bits`` (packed) equal ``comm.bits`` for every
    world (odd: no ties; even: ties vote 0) on word-aligned, ragged and unaligned rows."""
    gen = torch.Generator().manual_seed(100 + world)
    for nbytes, col in SLICES:
        if impl == "torch" and nbytes > 200 and world > 8:
            continue  # the slow CPU oracle; the small rows cover the torch path
        wide = torch.randint(0, 256, (world, nbytes + col + 3), dtype=torch.uint8, generator=gen)
        if world % 2 == 0:  # many exact ties: half the ranks the complement of the other half
            wide[world // 2 :, : (nbytes + col) // 2] = ~wide[: world // 2, : (nbytes + col) // 2]
        part = wide.to(DEV)[:, col : col + nbytes]
        want = bits.majority_from_packed(wide[:, col : col + nbytes], 8 * nbytes)
        got = sign_bits.majority_vote(part, impl=impl)
        assert torch.equal(got.cpu(), want), (nbytes, col)
        packed = sign_bits.majority_bits(part, impl=impl)
        assert packed.shape == (2 - world % 2, nbytes)
        assert torch.equal(packed.cpu(), _oracle_bits(wide[:, col : col + nbytes])), (nbytes, col)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_packed_vote_of_packed_tensors_keeps_zero_padding(impl, world):
    """Votes of real packs (tensors with tails): F = 2 pos + tie - 1 per entry, padding bits 0."""
    ts = _tensors(6)
    rows = [sign_bits.pack_signs([t * (1 if r % 3 else -1) + r for t in ts], impl=impl)
            for r in range(world)]  # fmt: skip
    gathered = torch.stack(rows)
    packed = sign_bits.majority_bits(gathered, impl=impl)
    vote = sign_bits.majority_vote(gathered, impl=impl)
    shifts = torch.arange(8, device=packed.device)
    planes = ((packed.unsqueeze(-1).to(torch.int32) >> shifts) & 1).reshape(packed.shape[0], -1)
    f = 2 * planes[0] - 1 + (planes[1] if world % 2 == 0 else 0)
    offsets, _ = sign_bits.packed_offsets([t.numel() for t in ts])
    for t, o in zip(ts, offsets):
        n, pad = t.numel(), (-t.numel()) % 8
        assert torch.equal(f[8 * o : 8 * o + n].float(), vote[8 * o : 8 * o + n])
        assert not planes[:, 8 * o + n : 8 * o + n + pad].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_of_adjacent_views_is_one_run(impl, monkeypatch):
    """Views of one flat buffer (as a flat gradient buffer hands them over) pack to the bytes of
    the per-tensor oracle; the Triton path sends runs of adjacent views as one table row."""
    sizes = [64, 8, 4096, 9, 16, 7, 24, 5000]  # a 9 and a 7 end runs (their bytes are padded)
    flat = torch.randn(sum(sizes), device=DEV)
    views = list(torch.split(flat, sizes))
    views[2] = views[2].view(64, 64)
    rows_sent: list[int] = []
    if impl == "triton":
        from frugal_dist.kernels import sign_bits_triton as tk

        upload = tk.upload
        monkeypatch.setattr(
            tk, "upload", lambda v, d: rows_sent.append(len(v) // 3) or upload(v, d)
        )
    for order in (views, views[::-1], [views[0], views[2], views[1]]):
        got = sign_bits.pack_signs(order, impl=impl)
        assert torch.equal(got.cpu(), _oracle_pack(order))
    if impl == "triton":  # runs [64, 8, 4096, 9] [16, 7] [24, 5000]; reversed: no runs; 3 apart
        assert rows_sent == [3, 8, 3]
