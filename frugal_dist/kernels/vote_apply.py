"""The majority vote applied straight to the parameters: ``vote_apply_``.

For a state-free item whose whole residual is voted (``residual_comm="sign"`` /
``"hierarchical"``: inactive blocks, ``algorithm="signsgd"`` groups), the update is

    p <- p (1 - decay) - alpha F,    F = sign(2 #{r: bit r of the entry is 1} - W)

with W voters (+1 / -1, 0 on a tie: W even, split evenly), read from the gathered packed bits
(``kernels.sign_bits``' format: a (W, B) uint8 buffer, the parameter's bits at byte offset o of
each row). No float32 vote tensor is made.

Bytes per element (float32 p): the Triton kernel reads W/8 B of bits and 4 B of p and writes
4 B of p -- 8 + W/8 B, against 4 + W/8 (vote) + 12 (``free_apply_``) = 16 + W/8 B for the
vote followed by the state-free update, and 4 B + 1/8 (pack) for one read of the gradient (the
read-once bound ``benchmarks/kernels_sign.py`` compares against).

Two paths, ``impl="auto"`` as the other kernels: Triton on CUDA tensors, torch on the CPU;
``"triton"`` also on the CPU under ``TRITON_INTERPRET=1``; ``"torch"`` never Triton.

* Triton (``sign_bits_triton.vote_apply``): one launch over every parameter of a call whose bits
  start on a 4-byte boundary (read as 32-bit words, the majority counted bitwise), one more for
  any others (read as bytes); a table of [pointer, numel, unit offset] and a tile map; decay
  folded as in ``free_apply_``
  (``p keep`` then ``+ (-alpha) F``; the compiler may contract the two into one FMA, so with
  decay the result may differ from the torch path in the last bit; without decay it is exact,
  as ``alpha F`` is).
* torch: ``p.mul_(keep)`` (skipped when ``decay == 0``), then per chunk of ``CHUNK`` elements
  the vote of the chunk's bytes (``sign_bits.majority_bytes``, bounded temporaries) and
  ``p.add_(F, alpha=-alpha)``: the operations, and so the bits, of today's step (the group's
  ``_foreach_mul_(1 - lr wd)`` and ``apply_update`` of the float32 vote).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from frugal_dist.kernels.sign_bits import CHUNK, majority_bytes, use_triton


@torch.no_grad()
def vote_apply_(
    params: Sequence[Tensor],
    gathered: Tensor,
    offsets: Sequence[int],
    alpha: float,
    *,
    decay: float = 0.0,
    impl: str = "auto",
) -> None:
    """In place: ``p <- p (1 - decay) - alpha F`` for every ``params[i]`` (float32, contiguous),
    F the majority of the bits at bytes ``[offsets[i], offsets[i] + ceil(n_i / 8))`` of each row
    of ``gathered`` ((W, B) uint8; rows may be a column slice of a wider buffer)."""
    if gathered.dim() != 2 or gathered.dtype != torch.uint8:
        raise ValueError(
            f"vote_apply_: gathered must be a (world, bytes) uint8 tensor, got "
            f"{tuple(gathered.shape)} {gathered.dtype}; pass the all-gathered packed signs"
        )
    if len(params) != len(offsets):
        raise ValueError(
            f"vote_apply_: {len(params)} params and {len(offsets)} offsets; pass one byte "
            "offset per param"
        )
    nbytes = gathered.shape[1]
    for i, (p, o) in enumerate(zip(params, offsets)):
        if p.dtype != torch.float32 or not p.is_contiguous():
            raise ValueError(
                f"vote_apply_: params[{i}] is {p.dtype}, contiguous={p.is_contiguous()}; pass "
                "contiguous float32 params (others take the float32 vote and apply_update)"
            )
        if p.device != gathered.device:
            raise ValueError(
                f"vote_apply_: params[{i}] is on {p.device}, gathered on {gathered.device}"
            )
        if o < 0 or o + (p.numel() + 7) // 8 > nbytes:
            raise ValueError(
                f"vote_apply_: params[{i}]'s bits [{o}, {o + (p.numel() + 7) // 8}) pass the "
                f"gathered row of {nbytes} bytes; pass the offsets of sign_bits.packed_offsets"
            )
    pairs = [(p, int(o)) for p, o in zip(params, offsets) if p.numel()]
    if not pairs:
        return
    if gathered.stride(1) != 1:
        gathered = gathered.contiguous()
    keep = 1.0 - decay
    if use_triton(impl, gathered.device):
        from frugal_dist.kernels import sign_bits_triton as tk

        tk.vote_apply([p for p, _ in pairs], [o for _, o in pairs], gathered, alpha, keep)
        return
    if decay != 0.0:
        torch._foreach_mul_([p for p, _ in pairs], keep)
    for p, o in pairs:
        flat = p.view(-1)
        n = flat.numel()
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            block = gathered[:, o + lo // 8 : o + (hi + 7) // 8]
            vote = majority_bytes(block).view(-1)[: hi - lo]
            flat[lo:hi].add_(vote, alpha=-alpha)
