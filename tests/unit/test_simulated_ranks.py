"""``FRUGAL.step_ranks`` and the trainer's ``simulate_ranks`` on one process: argument and
config errors name the field; one rank is ``step()``; exact mode is the step on the mean
gradient. (Against real gloo ranks: ``tests/distributed/test_simulated_ranks.py``.)"""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.train.config import build_config
from tests.distributed import workers

STEPS = 4


def _opt(**kw):
    split, full = workers.named_params()
    kw = {"lr": 1e-2, "update_gap": 2, "seed": 3, "density": 0.4, **kw}
    opt = FRUGAL(workers.groups(split, full), **kw)
    return opt, split + full


def _grads(step: int, world: int, params) -> list[list[torch.Tensor]]:
    shapes = [tuple(p.shape) for p in params]
    return [workers.rank_grads(step, r, shapes) for r in range(world)]


def test_one_rank_is_step():
    a, pa = _opt(reduce_gradients=True, residual_comm="sign")
    b, pb = _opt(reduce_gradients=True, residual_comm="sign")
    for s in range(STEPS):
        a.step_ranks(_grads(s, 1, pa))
        for p, g in zip(pb, _grads(s, 1, pb)[0]):
            p.grad = g
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


def test_exact_mode_is_the_step_on_the_mean_gradient():
    """Dyadic gradients: the mean of 4 is exact, so the runs agree bit for bit."""
    a, pa = _opt(reduce_gradients=True, residual_comm="exact")
    b, pb = _opt()
    for s in range(STEPS):
        grads = _grads(s, 4, pa)
        for i, p in enumerate(pb):
            p.grad = sum(g[i] for g in grads) / 4
        a.step_ranks(grads)  # after: it overwrites the lists' tensors (its buffers)
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


def test_sign_mode_votes():
    """Two ranks of opposite nonzero gradients tie on every entry: F = 0, the state-free
    parameters stay; one rank alone (its own signs) moves every one of them."""
    a, pa = _opt(reduce_gradients=True, residual_comm="sign", density=0.0)
    before = [p.detach().clone() for p in pa]
    g = [x.masked_fill(x == 0, 1.0) for x in _grads(0, 1, pa)[0]]  # no zero: 0 >= 0 on both
    a.step_ranks([[x.clone() for x in g], [-x for x in g]])
    split = len(workers.SHAPES)
    assert all(torch.equal(x, y) for x, y in zip(pa[:split], before[:split]))
    a.step_ranks([[x.clone() for x in g]])
    assert all(not torch.equal(x, y) for x, y in zip(pa[:split], before[:split]))


@pytest.mark.parametrize(
    "kw,call,match",
    [
        ({}, {}, "reduce_gradients=True"),
        ({"reduce_gradients": True, "residual_comm": "sign"}, {"node_size": 2}, "node_size"),
        ({"reduce_gradients": True, "residual_comm": "hierarchical"}, {}, "needs node_size"),
        ({"reduce_gradients": True, "residual_comm": "hierarchical"}, {"node_size": 3},
         "dividing"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_field(kw, call, match):
    opt, params = _opt(**kw)
    with pytest.raises(ValueError, match=match):
        opt.step_ranks(_grads(0, 4, params), **call)


def test_bad_gradient_lists_are_refused():
    opt, params = _opt(reduce_gradients=True, residual_comm="sign")
    grads = _grads(0, 2, params)
    with pytest.raises(ValueError, match=r"rank_grads\[1\] has"):
        opt.step_ranks([grads[0], grads[1][:-1]])
    grads[1][0] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        opt.step_ranks(grads)
    grads = _grads(0, 2, params)
    grads[1][2] = None
    with pytest.raises(ValueError, match="every rank"):
        opt.step_ranks(grads)


def _raw(**kw):
    opt = {"name": "frugal", "reduce_gradients": True, "residual_comm": "sign"}
    opt.update(kw.pop("optimizer", {}))
    return {"model": "tiny", "simulate_ranks": 2, "optimizer": opt, **kw}


@pytest.mark.parametrize(
    "raw,match",
    [
        (_raw(optimizer={"reduce_gradients": False}), "reduce_gradients=true"),
        (_raw(optimizer={"name": "adamw", "reduce_gradients": None}), "optimizer.name"),
        (_raw(grad_accum=2), "grad_accum=1"),
        (_raw(engine="ddp"), "engine must be single"),
        (_raw(simulate_node_size=2), "simulate_node_size is for"),
        (_raw(optimizer={"residual_comm": "hierarchical"}, simulate_ranks=4), "simulate_node_size"),
        (_raw(optimizer={"residual_comm": "hierarchical"}, simulate_ranks=4,
              simulate_node_size=3), "dividing"),
        ({"simulate_node_size": 2}, "needs simulate_ranks > 1"),
    ],
)  # fmt: skip
def test_bad_simulation_config_names_the_field(raw, match):
    if raw.get("optimizer", {}).get("reduce_gradients", 0) is None:
        del raw["optimizer"]["reduce_gradients"]
        del raw["optimizer"]["residual_comm"]
    with pytest.raises(ValueError, match=match):
        build_config(raw)


def test_good_simulation_config_builds():
    cfg = build_config(_raw(optimizer={"residual_comm": "hierarchical"}, simulate_ranks=4,
                            simulate_node_size=2))  # fmt: skip
    assert cfg.tokens_per_step_per_rank == 4 * cfg.batch_size * cfg.seq_len
