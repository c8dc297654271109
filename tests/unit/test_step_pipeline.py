"""The step pipeline's seams: subspace kinds, the step cache, the engine hooks."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.rules import state_full_keys
from frugal_dist.optim import engine_hooks
from frugal_dist.optim.kinds import KINDS, WHOLE_FREE, WHOLE_STATE_FULL, kind_for
from tests.helpers import SHAPES, grad_stream, make_params, set_grads

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
CASES = [
    dict(subspace="block", block_order="random", density=0.4),
    dict(subspace="coordinate", coord_choice="rows", density=0.5),
    dict(subspace="coordinate", coord_choice="randk", density=0.3),
    dict(subspace="projection", proj_type="svd", density=0.5),
    dict(subspace="projection", proj_type="random", proj_side="left", density=0.5),
    dict(algorithm="state_full", state_full="sgdm"),
]


def _run(opts: dict, steps: int, invalidate: bool) -> tuple[list, dict]:
    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES, **opts}], lr=1e-2, update_gap=3)
    for grads in grad_stream(SHAPES, steps):
        set_grads(ps, grads)
        if invalidate:
            opt.reset_caches()
        opt.step()
    return [p.detach().clone() for p in ps], opt.state_dict()["state"]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_dropping_every_cache_before_each_step_changes_nothing(opts):
    pa, sa = _run(opts, 8, invalidate=False)
    pb, sb = _run(opts, 8, invalidate=True)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_kind_state_bytes_are_what_the_step_allocates(opts):
    """``expected_state_bytes`` (the ``shard_state`` weight) equals the float32 buffers the step
    keeps for every parameter that has state-full buffers."""
    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES, **opts}], lr=1e-2, update_gap=3)
    for grads in grad_stream(SHAPES, 2):
        set_grads(ps, grads)
        opt.step()
    group = opt.param_groups[0]
    kind = kind_for(group)
    keys = state_full_keys(kind.rule(group))
    holding = 0
    for p in ps:
        st = opt.state[p]
        if keys[0] not in st:
            continue
        holding += 1
        got = sum(st[k].numel() * st[k].element_size() for k in keys)
        assert got == kind.expected_state_bytes(tuple(p.shape), group)
    assert holding > 0


def test_kind_for_maps_algorithms_and_subspaces():
    g = dict(algorithm="frugal", subspace="coordinate")
    assert kind_for(g) is KINDS["coordinate"]
    assert kind_for({**g, "algorithm": "adamw"}) is WHOLE_STATE_FULL
    assert kind_for({**g, "algorithm": "state_full"}) is WHOLE_STATE_FULL
    assert kind_for({**g, "algorithm": "signsgd"}) is WHOLE_FREE
    assert WHOLE_FREE.expected_state_bytes((4, 5), {"algorithm": "sgd"}) == 0


def test_engine_hooks_logical_shape_and_partition():
    p = torch.nn.Parameter(torch.zeros(12))
    assert engine_hooks.logical_shape(p) == (12,)
    engine_hooks.record_logical_shape(p, (3, 4))  # an adapter that flattened p itself
    assert engine_hooks.logical_shape(p) == (3, 4)
    assert engine_hooks.logical_shape(torch.nn.Parameter(torch.zeros(12))) == (12,)
    assert engine_hooks.local_partition(p) is None  # no engine partitions a plain tensor


def test_selection_api_gives_the_current_coordinate_set():
    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES, "subspace": "coordinate"}], update_gap=2)
    for grads in grad_stream(SHAPES, 3):
        set_grads(ps, grads)
        opt.step()
    group = opt.param_groups[0]
    view = opt.views(group)[0]
    k, used = opt.selections_in_use()[NAMES[0]]
    assert k == 1  # the third step is the first of refresh 1
    assert torch.equal(opt.selection(view, group).index, used.index)
    assert opt.state_role(group, view, "step") == "counter"
    assert opt.state_role(group, view, "exp_avg") == "coordinate"
