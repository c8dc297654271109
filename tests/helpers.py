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


def count_matched_launches(monkeypatch) -> dict[str, int]:
    """From now on, count ``kernels.projection_matched.launch_fix`` launches (``"fix"``) and
    per-item projection applies (``"item"``, ``Projection.apply_one``) in the returned dict:
    which path a ``free_scale="matched"`` projection step took (needs triton)."""
    from frugal_dist.kernels import projection_matched as pm
    from frugal_dist.optim.kinds.projection import Projection

    calls = {"fix": 0, "item": 0}
    fix, item = pm.launch_fix, Projection.apply_one

    def count_fix(*a, **k):
        calls["fix"] += 1
        return fix(*a, **k)

    def count_item(self, it, ctx):
        calls["item"] += 1
        return item(self, it, ctx)

    monkeypatch.setattr(pm, "launch_fix", count_fix)
    monkeypatch.setattr(Projection, "apply_one", count_item)
    return calls
