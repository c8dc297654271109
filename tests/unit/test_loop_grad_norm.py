"""The training loop hands the clip's total norm to FRUGAL's ``step(grad_norm=...)``
(``train.engine_setup.clip_gradients`` / ``step_grad_norm``), and to no optimizer without
that keyword; without clipping nothing is passed."""

from __future__ import annotations

import types

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.optim import RSO
from frugal_dist.train.config import build_config
from frugal_dist.train.engine_setup import clip_gradients, step_grad_norm
from frugal_dist.train.loop import train

RAW = {"model": "tiny", "seq_len": 32, "batch_size": 2, "max_steps": 3, "warmup_steps": 1,
       "log_every": 1, "eval_every": 0, "eval_batches": 1, "engine": "single",
       "data": {"source": "embedded", "max_bytes": 100_000}}  # fmt: skip


def _spy_steps(monkeypatch, cls) -> list[dict]:
    """Record the keyword arguments of every ``cls.step`` call (the step still runs)."""
    calls: list[dict] = []
    original = cls.step

    def step(self, *args, **kwargs):
        calls.append(dict(kwargs))
        if getattr(self, "clip_pending", False):  # FRUGAL.clip_grad_norm_ recorded the clip
            calls[-1]["pending_clip"] = True
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", step)
    return calls


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_frugal_gets_the_clip_norm_and_nothing_without_clipping(grad_clip, monkeypatch):
    calls = _spy_steps(monkeypatch, FRUGAL)
    norms: list[torch.Tensor] = []
    real_clip = torch.nn.utils.get_total_norm

    def recorded(*args, **kwargs):
        norms.append(real_clip(*args, **kwargs))
        return norms[-1]

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", recorded)
    cfg = build_config({**RAW, "grad_clip": grad_clip,
                        "optimizer": {"lr": 3e-3, "density": 0.25, "update_gap": 2}})  # fmt: skip
    summary = train(cfg)
    assert len(calls) == RAW["max_steps"]
    if grad_clip > 0:  # single engine: FRUGAL.clip_grad_norm_, its norm kept for the step
        assert len(norms) == RAW["max_steps"]
        for kw, norm in zip(calls, norms):
            assert kw == {"pending_clip": True} and norm.dim() == 0 and torch.isfinite(norm)
    else:
        assert norms == [] and all(kw == {} for kw in calls)
    assert all(loss == loss for loss in summary["losses"])  # no nan


@pytest.mark.parametrize(
    "cls, optimizer",
    [(torch.optim.AdamW, {"name": "adamw", "lr": 3e-3}),
     (RSO, {"name": "rso", "lr": 3e-3, "density": 0.25, "inner_steps": 2})],
    ids=["adamw", "rso"],
)  # fmt: skip
def test_optimizers_without_the_keyword_get_no_grad_norm(cls, optimizer, monkeypatch):
    calls = _spy_steps(monkeypatch, cls)
    train(build_config({**RAW, "grad_clip": 1.0, "optimizer": optimizer}))
    assert calls == [{}] * RAW["max_steps"]
    assert step_grad_norm(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]),
                          torch.tensor(1.0), 1) == {}  # fmt: skip


def _frugal(**kw) -> FRUGAL:
    p = torch.nn.Parameter(torch.zeros(4, 4))
    return FRUGAL([{"params": [p], "names": ["w"]}], lr=1e-3, **kw)


def test_step_grad_norm_for_frugal_oss_and_local_norms():
    norm = torch.tensor(2.0)
    opt = _frugal()
    assert step_grad_norm(opt, norm, 2) == {"grad_norm": norm}
    assert step_grad_norm(opt, None, 1) == {}
    oss = types.SimpleNamespace(optim=opt)  # fairscale's OSS: step(**kwargs) passes them on
    assert step_grad_norm(oss, norm, 2) == {"grad_norm": norm}
    # reduce_gradients: the clip saw unreduced, per-rank gradients; its norm is local
    reducing = _frugal(reduce_gradients=True)
    assert step_grad_norm(reducing, norm, 2) == {}
    assert step_grad_norm(reducing, norm, 1) == {"grad_norm": norm}


def test_clip_gradients_returns_the_total_norm_and_clips_as_torch_does():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    for m in (model, ref):
        (m(x) ** 2).sum().mul(10).backward()
    norm = clip_gradients("single", model, None, 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert torch.equal(norm, ref_norm) and norm > 0.5
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_clip_gradients_uses_frugal_clip_and_steps_as_after_torch_clip():
    """single engine + FRUGAL: ``clip_gradients`` records the clip in the optimizer (gradients
    not scaled), and clip + step equals torch's clip + step bit for bit."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
        opt = FRUGAL([{"params": list(model.parameters()),
                       "names": [n for n, _ in model.named_parameters()]}],
                     lr=1e-2, density=0.5, update_gap=2)  # fmt: skip
        x = torch.randn(5, 8)
        for _ in range(4):
            (model(x) ** 2).sum().mul(10).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            if fused:
                norm = clip_gradients("single", model, opt, 0.5)
                assert opt.clip_pending and norm > 0.5
                assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
                assert step_grad_norm(opt, norm, 1) == {}
                opt.step()
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step(grad_norm=norm)
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
