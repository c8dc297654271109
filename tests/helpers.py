"""Small test utilities shared by unit and distributed tests."""

from __future__ import annotations

import torch
from torch import nn

SHAPES = [(6, 4), (4, 6), (5, 5), (3, 8), (8, 3)]


def make_params(shapes=SHAPES, seed: int = 0, dtype=torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone_params(params) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def grad_stream(shapes, steps: int, seed: int = 1):
    """A fixed sequence of synthetic gradients (independent of the weights)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield [torch.randn(s, generator=gen) for s in shapes]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone().to(p.dtype)


def max_diff(a, b) -> float:
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b))
