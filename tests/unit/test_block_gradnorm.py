"""``block_order="gradnorm"`` (block selection by gradient norm, issue 19): the fast path against
the oracle step by step, the choice written out on one step, ties, resume between refreshes,
the simulated ranks, and what is refused. Engines: tests/distributed (ddp_core, flat_layout,
deepspeed, fsdp2)."""

from __future__ import annotations

import copy

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.core.reference_selection import ref_gradnorm_blocks
from frugal_dist.core.subspaces import BlockSchedule, top_blocks
from tests.helpers import SHAPES, clone_params, grad_stream, make_params, max_diff, set_grads

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=3e-3, density=0.4, update_gap=4, weight_decay=0.05, block_order="gradnorm",
              inactive_lr_scale=0.5)  # fmt: skip
STEPS = 11  # refreshes at 0, 4, 8; steps between them replay the cached step plan


def _pair(kw: dict, **step_options):
    ps = make_params()
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw, **step_options)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    return ps, qs, opt, ref


def _active(opt: FRUGAL, params) -> set[int]:
    return {i for i, p in enumerate(params) if opt.state[p]["block_active"].item() == 1.0}


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(state_full="lion"), dict(reset_statistics=False), dict(density=0.6),
     dict(state_free="sgd", fused=True)],
    ids=["adamw", "lion", "no-reset", "rho0.6", "sgd-fused"],
)  # fmt: skip
def test_gradnorm_matches_oracle_step_by_step(extra):
    kw = {**COMMON, **extra}
    fused = kw.pop("fused", None)  # the optimizer's whole-tensor AdamW kernel on the CPU
    ps, qs, opt, ref = _pair(kw, fused=fused)
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        assert max_diff(ps, qs) < 1e-6, (step, max_diff(ps, qs))
        assert _active(opt, ps) == ref.gradnorm_active, step


def test_choice_written_out_on_one_step():
    """The a = round(0.4 * 5) = 2 tensors of largest sum of squares are active (Adam moments),
    the others take the state-free step; gradients scaled so the order is known."""
    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES}], **COMMON)
    scales = [1.0, 3.0, 0.5, 2.0, 0.1]  # per-entry scale; sizes 24, 24, 25, 24, 24
    grads = [torch.full(s, c) for s, c in zip(SHAPES, scales)]
    set_grads(ps, grads)
    opt.step()
    assert _active(opt, ps) == {1, 3}
    assert {i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]} == {1, 3}


def test_ties_go_to_the_lower_position_and_are_not_normalised_by_size():
    # equal sums of squares: the lower positions win, in both implementations
    sums = torch.tensor([4.0, 9.0, 9.0, 1.0, 9.0], dtype=torch.float64)
    assert top_blocks(sums, 2) == {1, 2}
    grads = [torch.full((3,), v) for v in (2.0, 3.0, 3.0, 1.0, 3.0)]
    assert ref_gradnorm_blocks(grads, 0.4) == {1, 2}
    # a large tensor of small entries beats a small tensor of large ones (not per entry)
    big, small = torch.full((100,), 0.5), torch.full((2,), 2.0)  # sums 25 and 8
    assert ref_gradnorm_blocks([small, big], 0.5) == {1}
    assert top_blocks(torch.tensor([8.0, 25.0]), 1) == {1}
    # NaN ranks last; a missing gradient counts 0
    assert top_blocks(torch.tensor([float("nan"), 0.0, 1.0]), 2) == {1, 2}
    assert ref_gradnorm_blocks([torch.tensor([float("nan")]), None, torch.ones(1)], 0.67) == {1, 2}


def test_ties_match_the_oracle_in_a_run():
    """Every tensor the same size and gradient magnitude: every sum equal, the lowest positions
    are active at every refresh (the same in both)."""
    shapes = [(4, 4)] * 5
    ps = make_params(shapes)
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **COMMON)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **COMMON)
    for step in range(6):
        grads = [torch.full(s, (-1.0) ** (i + step)) for i, s in enumerate(shapes)]
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        assert _active(opt, ps) == ref.gradnorm_active == {0, 1}
        assert max_diff(ps, qs) < 1e-6


def test_resume_between_refreshes_continues_the_choice():
    """A checkpoint taken mid-period (steps 0-5, refresh at 4) resumes into a fresh optimizer
    with the blocks chosen at step 4, bit for bit the uninterrupted run."""
    grads = list(grad_stream(SHAPES, STEPS))
    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES}], **COMMON)
    for g in grads[:6]:
        set_grads(ps, g)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    qs = clone_params(ps)
    for g in grads[6:]:
        set_grads(ps, g)
        opt.step()
    resumed = FRUGAL([{"params": qs, "names": NAMES}], **COMMON)
    resumed.load_state_dict(saved)
    flag = resumed.state[qs[0]]["block_active"]
    assert flag.device.type == "cpu" and flag.dtype == torch.float32
    for g in grads[6:]:
        set_grads(qs, g)
        resumed.step()
    assert max_diff(ps, qs) == 0.0


def test_differs_from_the_static_orders():
    out = {}
    for order in ("gradnorm", "descending"):
        ps = make_params()
        opt = FRUGAL([{"params": ps, "names": NAMES}], **{**COMMON, "block_order": order})
        for g in grad_stream(SHAPES, 6):
            set_grads(ps, g)
            opt.step()
        out[order] = ps
    assert max_diff(out["gradnorm"], out["descending"]) > 1e-4


@pytest.mark.parametrize("mode", ["exact", "sign", "hierarchical"])
def test_simulated_ranks_choose_by_the_mean_gradient(mode):
    """``step_ranks``: the choice is that of the mean of the ranks' gradients (the oracle with
    p.grad = the mean; voters: the ranks' gradients for sign, the 2 node means of 2 x 2 for
    hierarchical), and the copies' all-reduce is counted at refreshes only."""
    world, node = (4, 2) if mode == "hierarchical" else (2, None)
    ps = make_params()
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], residual_comm=mode, reduce_gradients=True,
                 **COMMON)  # fmt: skip
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **COMMON)
    streams = [list(grad_stream(SHAPES, 6, seed=10 + r)) for r in range(world)]
    for step in range(6):
        rank_grads = [[g * 64 // 1 / 64 for g in streams[r][step]] for r in range(world)]
        means = [sum(gs[i] for gs in rank_grads) / world for i in range(len(SHAPES))]
        set_grads(qs, means)
        voters = None
        if mode == "sign":
            voters = {n: [rank_grads[r][i].clone() for r in range(world)]
                      for i, n in enumerate(NAMES)}  # fmt: skip
        elif mode == "hierarchical":
            voters = {n: [(rank_grads[2 * k][i] + rank_grads[2 * k + 1][i]) / 2 for k in (0, 1)]
                      for i, n in enumerate(NAMES)}  # fmt: skip
        opt.step_ranks(rank_grads, node)  # (reuses the lists' tensors as its buffers)
        ref.step(voters)
        assert _active(opt, ps) == ref.gradnorm_active, step
        assert max_diff(ps, qs) < 1e-6, step
        stats = opt.comm_stats()["last_step"]
        refresh = step % COMMON["update_gap"] == 0
        assert (stats.get("block_gradnorm_grads", 0) > 0) == refresh, (step, stats)


def test_refused_outside_block_and_static_schedule():
    ps = make_params()
    with pytest.raises(ValueError, match="block_order='gradnorm'.*subspace='block'"):
        FRUGAL([{"params": ps, "names": NAMES}], subspace="coordinate", block_order="gradnorm")
    with pytest.raises(ValueError, match="block_order must be one of"):
        FRUGAL([{"params": ps, "names": NAMES}], block_order="gradnorms")
    # an AdamW group ignores the block options it inherits from the defaults
    FRUGAL([{"params": ps, "names": NAMES, "algorithm": "adamw"}], block_order="gradnorm")
    with pytest.raises(ValueError, match="chosen from the gradient"):
        BlockSchedule(5, 0.4, "gradnorm", 0)


def test_refused_under_a_layout_holding_part_of_a_group():
    """fairscale OSS's layout (``schedule_names``: each rank steps a subset) is refused when
    bound; a step() that sees only part of the group (ZeRO-3 sub-groups) raises at the refresh."""
    from frugal_dist.core.fragments import RowSpan
    from frugal_dist.core.subspaces import matrix_shape
    from frugal_dist.layouts.base import ParamView

    class Subset:
        name = "subset"
        process_group = None

        def __init__(self, keep: int, oss: bool) -> None:
            self.keep = keep
            if oss:
                self.schedule_names = lambda optimizer, group: list(group["names"])

        def views(self, optimizer, group, all_holders=False):
            out = []
            for i, (p, n) in enumerate(zip(group["params"], group["names"])):
                if i >= self.keep:
                    continue
                m, k = matrix_shape(p.shape)
                out.append(ParamView(n, i, tuple(p.shape), RowSpan(m, k, 0, p.numel()), p,
                                     p.grad, optimizer.state[p]))  # fmt: skip
            return out

        def split_rows(self, name):
            return []

    ps = make_params()
    opt = FRUGAL([{"params": ps, "names": NAMES}], **COMMON)
    with pytest.raises(ValueError, match="gradnorm.*fairscale OSS"):
        opt.bind_layout(Subset(5, oss=True))
    opt = FRUGAL([{"params": ps, "names": NAMES}], **COMMON)
    opt.bind_layout(Subset(3, oss=False))
    set_grads(ps, next(iter(grad_stream(SHAPES, 1))))
    with pytest.raises(ValueError, match="sees 3 of its 5 tensors.*sub_group_size"):
        opt.step()


def test_train_config_takes_it_and_the_builder_refuses_it_off_block():
    from frugal_dist.train.config import build_config
    from frugal_dist.train.model import LlamaConfig, build_model
    from frugal_dist.train.optimizers import build_optimizer

    cfg = build_config({"optimizer": {"name": "frugal", "block_order": "gradnorm"}})
    assert cfg.optimizer["block_order"] == "gradnorm"
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=19, dim=8, n_layers=1, n_heads=2,
                                    intermediate_size=12, max_seq_len=8))  # fmt: skip
    opt = build_optimizer(model, "frugal", block_order="gradnorm", update_gap=2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    split = [g for g in opt.param_groups if g["algorithm"] == "frugal"][0]
    flags = [opt.state[p]["block_active"].item() for p in split["params"]]
    assert sum(flags) == round(0.25 * len(flags))
    with pytest.raises(ValueError, match="block_order='gradnorm'.*subspace='projection'"):
        build_optimizer(model, "galore", block_order="gradnorm")
