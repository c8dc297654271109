"""1-bit signs: pack a float tensor's signs 8 per byte, and the majority vote over ranks.

A non-negative value votes +1 (bit 1), a negative value -1 (bit 0). The majority of W votes is
sign(2 * ones - W): +1, -1, or 0 on a tie (an even W split evenly), as in signSGD with majority
vote (Bernstein et al., 2019).

This per-tensor torch code defines the format and is the oracle of the fused pack and vote that
the sign path runs (``frugal_dist.kernels.sign_bits``, tested byte for byte against it); it is
not on the step's path.
"""

from __future__ import annotations

import torch
from torch import Tensor

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_signs(x: Tensor) -> Tensor:
    """uint8 tensor of ceil(numel/8) bytes: bit i of byte j is 1 iff x.flat[8j+i] >= 0."""
    flat = x.reshape(-1)
    n = flat.numel()
    bits = (flat >= 0).to(torch.uint8)
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = _SHIFTS.to(bits.device)
    return (bits.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def count_ones(packed: Tensor, n: int) -> Tensor:
    """Unpack ``packed`` (..., nbytes) to int32 bits (..., n) -- summed over a leading rank dim
    by the caller."""
    shifts = _SHIFTS.to(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.int32)


def majority_from_packed(gathered: Tensor, n: int) -> Tensor:
    """``gathered``: (W, nbytes) packed signs of W ranks -> float32 majority sign of n entries."""
    world = gathered.shape[0]
    ones = count_ones(gathered, n).sum(dim=0)
    return torch.sign((2 * ones - world).to(torch.float32))
