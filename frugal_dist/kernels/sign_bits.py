"""1-bit signs for ``residual_comm="sign"`` / ``"hierarchical"``: pack and majority vote.

Format (``frugal_dist.comm.bits`` defines it and is the oracle): tensor t of n_t elements takes
b_t = ceil(n_t / 8) bytes at byte offset o_t = b_0 + ... + b_{t-1} of one flat uint8 buffer;
bit i of byte o_t + j is 1 iff x_t[8 j + i] >= 0 (NaN: 0; padding bits: 0). The majority of W
ranks' bits is

    vote = sign(2 * ones - W)  in {+1, -1, 0 (a tie: W even, split evenly)}

written as float32 to a flat buffer of 8 * sum(b_t) elements: element 8 o_t + i is tensor t's
entry i (``vote_views`` gives each tensor's view; the <= 7 padding entries per tensor are never
read).

The packed vote (``majority_bits``) keeps F in bits: a (P, B) uint8 buffer in the same layout,
row 0 bit = [F = +1] and, for even W only (P = 2), row 1 bit = [F = 0], so F = 2 pos + tie - 1.

Two paths, ``impl="auto"`` as the other kernels (``kernels.elementwise``): Triton on CUDA
tensors, torch on the CPU; ``"triton"`` also on the CPU under ``TRITON_INTERPRET=1``; ``"torch"``
never Triton.

* pack: one Triton launch per input dtype over every tensor (``sign_bits_triton``; tensors
  adjacent in memory, e.g. views of one flat gradient buffer, pack as one run): reads each
  element once (4 or 2 B) and writes 1/8 B. The torch path works in chunks of ``CHUNK``
  elements (bounded temporaries), the arithmetic of ``comm.bits.pack_signs``.
* vote (``majority_vote``): one launch over the gathered (W, B) bytes, read as 32-bit words
  where aligned and counted bitwise (``sign_bits_triton``): reads W x B bytes, writes 32 B per
  byte (4 B per element) -- no per-rank unpacked copy, no int8 / bool tensor per element.
* packed vote (``majority_bits``): the same count, written as bits: reads W x B, writes P x B
  bytes. The torch paths count in chunks of ``CHUNK`` elements.

Bound (what any implementation must move per element, fp32 input): pack 4 B + 1/8 B, vote
W/8 B + 4 B, packed vote (W + P)/8 B. (Where the vote only feeds a state-free update,
``kernels.vote_apply`` applies it from the bits instead: W/8 + 8 B, no float32 vote.)
``benchmarks/kernels_sign.py`` times them all against one read of the fp32 gradient.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from frugal_dist.kernels.elementwise import IMPLS, triton_available

CHUNK = 1 << 24  # elements per torch-path chunk (a multiple of 8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_PACK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(impl: str, device: torch.device) -> bool:
    """``impl`` resolved for tensors on ``device`` (module docstring); a clear error when
    ``impl="triton"`` cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package; use impl='auto'")
        if device.type != "cuda" and not interpret:
            raise RuntimeError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                "use impl='auto'"
            )
        return True
    return device.type == "cuda" and triton_available()


def packed_offsets(numels: Sequence[int]) -> tuple[list[int], int]:
    """(byte offset of each tensor, total bytes) of the packed format."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += (int(n) + 7) // 8
    return offsets, total


# ------------------------------------------------------------------------------------- pack
@torch.no_grad()
def pack_signs(tensors: Sequence[Tensor], *, impl: str = "auto") -> Tensor:
    """Every tensor's signs, packed into one flat uint8 buffer (module docstring's format).
    Tensors of any float dtype on one device; float32 / bfloat16 / float16 ones take Triton."""
    if not tensors:
        raise ValueError("pack_signs: pass at least one tensor")
    device = tensors[0].device
    if any(t.device != device for t in tensors) or not all(t.is_floating_point() for t in tensors):
        _bad_pack_input(tensors)
    numels = [t.numel() for t in tensors]
    offsets, total = packed_offsets(numels)
    out = torch.empty(total, dtype=torch.uint8, device=device)
    if use_triton(impl, device):
        from frugal_dist.kernels import sign_bits_triton as tk

        rest = tk.pack(tensors, numels, offsets, out, _PACK_DTYPES)
    else:
        rest = list(range(len(tensors)))
    for i in rest:
        _pack_torch(tensors[i].reshape(-1), out[offsets[i] : offsets[i] + (numels[i] + 7) // 8])
    return out


def _bad_pack_input(tensors: Sequence[Tensor]) -> None:
    """The clear error for the first tensor ``pack_signs`` cannot take."""
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(
                f"pack_signs: tensors[{i}] is on {t.device}, tensors[0] on {device}; pass "
                "tensors of one device"
            )
        if not t.is_floating_point():
            raise ValueError(f"pack_signs: tensors[{i}] has dtype {t.dtype}; pass float tensors")


def _pack_torch(flat: Tensor, out: Tensor) -> None:
    """``comm.bits.pack_signs`` of ``flat`` into ``out``, ``CHUNK`` elements at a time."""
    shifts = _SHIFTS.to(flat.device)
    n = flat.numel()
    for lo in range(0, n, CHUNK):
        x = flat[lo : lo + CHUNK]
        bits = (x >= 0).to(torch.uint8)
        pad = (-x.numel()) % 8
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        torch.sum(
            bits.view(-1, 8) << shifts,
            dim=1,
            dtype=torch.uint8,
            out=out[lo // 8 : lo // 8 + bits.numel() // 8],
        )


# ------------------------------------------------------------------------------------- vote
@torch.no_grad()
def majority_vote(gathered: Tensor, *, impl: str = "auto") -> Tensor:
    """``gathered``: (W, B) uint8, W ranks' packed buffers -> float32 (8 B,) of
    sign(2 ones - W) per bit (``comm.bits.majority_from_packed`` over the whole buffer)."""
    _check_gathered(gathered, "majority_vote")
    if gathered.stride(1) != 1:  # a column slice of a wider buffer is read in place
        gathered = gathered.contiguous()
    nbytes = gathered.shape[1]
    out = torch.empty(8 * nbytes, dtype=torch.float32, device=gathered.device)
    if nbytes == 0:
        return out
    if use_triton(impl, gathered.device):
        from frugal_dist.kernels import sign_bits_triton as tk

        tk.vote(gathered, out)
        return out
    step = CHUNK // 8
    for lo in range(0, nbytes, step):
        block = gathered[:, lo : lo + step]
        majority_bytes(block, out=out[8 * lo : 8 * (lo + block.shape[1])].view(-1, 8))
    return out


@torch.no_grad()
def majority_bits(gathered: Tensor, *, impl: str = "auto") -> Tensor:
    """``gathered``: (W, B) uint8, W ranks' packed buffers -> the packed vote, (P, B) uint8
    (module docstring): row 0 bit = [F = +1]; for even W (P = 2) row 1 bit = [F = 0], a tie.
    Padding bits stay 0 (padding is 0 in every rank's row)."""
    _check_gathered(gathered, "majority_bits")
    if gathered.stride(1) != 1:
        gathered = gathered.contiguous()
    world, nbytes = gathered.shape
    out = torch.empty((2 - world % 2, nbytes), dtype=torch.uint8, device=gathered.device)
    if nbytes == 0:
        return out
    if use_triton(impl, gathered.device):
        from frugal_dist.kernels import sign_bits_triton as tk

        tk.vote_bits(gathered, out)
        return out
    shifts = _SHIFTS.to(gathered.device)
    step = CHUNK // 8
    for lo in range(0, nbytes, step):
        block = gathered[:, lo : lo + step]
        twice = 2 * _ones(block)
        hi = lo + block.shape[1]
        torch.sum((twice > world).to(torch.uint8) << shifts, 1, dtype=torch.uint8,
                  out=out[0, lo:hi])  # fmt: skip
        if world % 2 == 0:
            torch.sum((twice == world).to(torch.uint8) << shifts, 1, dtype=torch.uint8,
                      out=out[1, lo:hi])  # fmt: skip
    return out


def _check_gathered(gathered: Tensor, name: str) -> None:
    if gathered.dim() != 2 or gathered.dtype != torch.uint8:
        raise ValueError(
            f"{name}: gathered must be a (world, bytes) uint8 tensor, got "
            f"{tuple(gathered.shape)} {gathered.dtype}; stack the ranks' packed buffers"
        )


def _ones(block: Tensor) -> Tensor:
    """(b, 8) int32 number of set bits per position of the (W, b) uint8 ``block``."""
    shifts = _SHIFTS.to(block.device)
    ones = torch.zeros(block.shape[1], 8, dtype=torch.int32, device=block.device)
    for r in range(block.shape[0]):
        ones += ((block[r].unsqueeze(-1) >> shifts) & 1).to(torch.int32)
    return ones


def majority_bytes(block: Tensor, out: Tensor | None = None) -> Tensor:
    """The torch vote of a (W, b) uint8 ``block``: float32 (b, 8) sign(2 ones - W) (into
    ``out`` when given); temporaries of b x 8 int32."""
    world = block.shape[0]
    ones = _ones(block)
    return torch.sign((2 * ones - world).to(torch.float32), out=out)


def vote_views(vote: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor's entries of ``majority_vote``'s flat result, shaped like the tensor."""
    offsets, total = packed_offsets([t.numel() for t in tensors])
    if vote.numel() != 8 * total:
        raise ValueError(
            f"vote_views: the vote has {vote.numel()} entries, the tensors' packed format "
            f"{8 * total}; pass the tensors that were packed"
        )
    return [vote[8 * o : 8 * o + t.numel()].view(t.shape) for o, t in zip(offsets, tensors)]
