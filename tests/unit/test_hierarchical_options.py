"""``residual_comm="hierarchical"`` options: every bad input is refused with an error naming the
field and the fix (one process, no collectives)."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.comm.topology import resolve_node_size


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3))]


def test_node_size_from_option_env_and_refusals(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_node_size(2, 8) == 2
    assert resolve_node_size(None, 1) == 1  # one process: nothing to split
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE is not set.*node_groups="):
        resolve_node_size(None, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_node_size(None, 6) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two' is not an integer"):
        resolve_node_size(None, 4)
    with pytest.raises(ValueError, match="node_groups=3: 3 ranks per node does not divide"):
        resolve_node_size(3, 4)
    with pytest.raises(ValueError, match="does not divide"):
        resolve_node_size(0, 4)
    for bad in ("2", 2.0, True):
        with pytest.raises(ValueError, match="node_groups must be None"):
            resolve_node_size(bad, 4)


def test_optimizer_refuses_what_it_would_ignore():
    with pytest.raises(ValueError, match="needs reduce_gradients=True"):
        FRUGAL(_params(), residual_comm="hierarchical")
    with pytest.raises(ValueError, match="node_groups is only read by residual_comm='hierarch"):
        FRUGAL(_params(), reduce_gradients=True, residual_comm="sign", node_groups=2)
    with pytest.raises(ValueError, match="residual_comm must be one of"):
        FRUGAL(_params(), residual_comm="hierarchy")
    with pytest.raises(ValueError, match="state_free='sgd' cannot use"):
        FRUGAL(_params(), reduce_gradients=True, residual_comm="hierarchical", state_free="sgd")


def test_bound_layout_is_refused_naming_the_fix():
    opt = FRUGAL(_params(), reduce_gradients=True, residual_comm="hierarchical", node_groups=1)
    with pytest.raises(ValueError, match="residual_comm='hierarchical'.*FSDP2.*HSDP"):
        opt.bind_layout(object())


def test_one_process_steps_as_plain_frugal():
    """World size 1: nothing is reduced; the step equals exact mode's."""
    a, b = _params(), _params()
    b[0].data.copy_(a[0].data)
    hier = FRUGAL(a, lr=0.1, reduce_gradients=True, residual_comm="hierarchical", node_groups=1)
    exact = FRUGAL(b, lr=0.1, reduce_gradients=True)
    for p in (a[0], b[0]):
        p.grad = torch.arange(12.0).reshape(4, 3) - 5
    hier.step()
    exact.step()
    assert torch.equal(a[0], b[0])
    assert hier.node_groups().nodes == 1
    assert hier.comm_stats()["last_step"] == {}


def test_bad_inter_backend_is_refused_before_any_collective():
    from frugal_dist.comm.topology import build_node_groups

    with pytest.raises(ValueError, match="inter_backend='mpi'.*choose None.*'gloo'"):
        build_node_groups(None, 2, inter_backend="mpi")
