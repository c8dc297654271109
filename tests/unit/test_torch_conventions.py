"""torch.optim habits (issue 20 items 6-7): positional lr, extra param-group keys kept and
ignored (typos of option names still refused), and load_state_dict refusing another algorithm."""

from __future__ import annotations

import logging

import pytest
import torch

from frugal_dist import FRUGAL

SHAPES = [(8, 6), (6, 4), (4,)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _train(opt: FRUGAL, params: list[torch.nn.Parameter], steps: int = 4) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _group(params, **extra):
    return [{"params": params[:2], "names": ["a", "b"], **extra},
            {"params": params[2:], "names": ["c"], "algorithm": "adamw"}]  # fmt: skip


def test_positional_lr_is_the_learning_rate():
    opt = FRUGAL(_group(_params()), 3e-3, density=0.5, update_gap=2, seed=0)
    assert all(g["lr"] == 3e-3 for g in opt.param_groups)


def test_extra_group_keys_are_kept_and_ignored():
    ref_params, params = _params(), _params()
    ref = FRUGAL(_group(ref_params), lr=1e-2, density=0.5, update_gap=2, seed=0)
    opt = FRUGAL(_group(params, lr_mult=0.1, layer_id=3), lr=1e-2, density=0.5, update_gap=2,
                 seed=0)  # fmt: skip
    assert opt.param_groups[0]["lr_mult"] == 0.1 and opt.param_groups[0]["layer_id"] == 3
    _train(ref, ref_params)
    _train(opt, params)
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("typo", "meant"), [("densty", "density"), ("updte_gap", "update_gap"),
                                              ("subspce", "subspace")])  # fmt: skip
def test_a_typo_of_an_option_name_is_refused(typo, meant):
    with pytest.raises(ValueError, match=rf"{typo}.*did you mean '{meant}'"):
        FRUGAL(_group(_params(), **{typo: 0.5}), lr=1e-2)


@pytest.mark.parametrize(("field", "value"), [("density", 0.25), ("subspace", "coordinate"),
                                               ("state_free", "sgd")])  # fmt: skip
def test_load_state_dict_refuses_another_algorithm(field, value):
    params = _params()
    saved = FRUGAL(_group(params), lr=1e-2, density=0.5, subspace="block", seed=0)
    _train(saved, params, 2)
    other = {"density": 0.5, "subspace": "block", **{field: value}}
    opt = FRUGAL(_group(_params()), lr=1e-2, seed=0, **other)
    with pytest.raises(ValueError, match=rf"{field}=.*Build the optimizer with {field}="):
        opt.load_state_dict(saved.state_dict())


def test_load_state_dict_takes_the_saved_seed_with_a_notice(caplog):
    params = _params()
    saved = FRUGAL(_group(params), lr=1e-2, density=0.5, seed=7)
    _train(saved, params, 2)
    opt = FRUGAL(_group(_params()), lr=1e-2, density=0.5, seed=1)
    with caplog.at_level(logging.INFO, logger="frugal_dist"):
        opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["seed"] == 7
    assert "seed=7" in caplog.text and "seed=1" in caplog.text
