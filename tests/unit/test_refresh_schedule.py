"""``refresh_policy="loss"`` (the loss-driven refresh interval, ``optim.refresh_schedule``): the
fast path against the oracle step by step while T grows, the refresh steps themselves, the
step plan between refreshes, resume mid-interval bit for bit, what is refused, and that the
fixed policy is untouched."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.optim.refresh_schedule import SCHEDULE_KEYS, fold_fingerprint
from tests.helpers import clone_params, grad_stream, make_params, max_diff, set_grads

SHAPES = [(16, 12), (12, 16), (10, 10), (6, 4), (8, 3), (9, 7)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=3e-3, density=0.5, update_gap=2, weight_decay=0.05, refresh_policy="loss",
              update_gap_max=8, refresh_threshold=0.02)  # fmt: skip
STEPS = 40
CASES = {
    "block-descending": dict(subspace="block", block_order="descending"),
    "block-random": dict(subspace="block", block_order="random"),
    "block-gradnorm": dict(subspace="block", block_order="gradnorm"),
    "block-keep": dict(subspace="block", block_order="ascending", reset_statistics=False),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "randk": dict(subspace="coordinate", coord_choice="randk"),
    "random": dict(subspace="projection", proj_type="random"),
    "svd": dict(subspace="projection", proj_type="svd"),
    "random-rotate": dict(subspace="projection", proj_type="random", moment_transfer="rotate"),
}


def loss_at(t: int) -> float:
    """A loss that falls fast, then flattens (dyadic: exact in any order of summation)."""
    return 4.0 + 8.0 * 0.5 ** (t // 2)


def _opt(kw: dict, params=None):
    ps = make_params(SHAPES) if params is None else params
    return ps, FRUGAL([{"params": ps, "names": NAMES}], **kw)


def _refresh_steps(opt, p, seen: list[int], before: int) -> int:
    k = int(opt.state[p]["refresh_k"].item())
    if k != before:
        seen.append(int(opt.state[p]["step"].item()) - 1)
    return k


@pytest.mark.parametrize("name", list(CASES))
def test_loss_policy_matches_oracle_step_by_step(name):
    kw = {**COMMON, **CASES[name]}
    tol = 1e-4 if CASES[name].get("proj_type") == "svd" else 1e-5
    ps = make_params(SHAPES)
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    fast, oracle = [], []
    k = -1
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        if ref.refresh_due(NAMES[0])[0]:
            oracle.append(step)
        opt.step()
        ref.step()
        k = _refresh_steps(opt, ps[0], fast, k)
        opt.observe_loss(loss_at(step))
        ref.observe_loss(loss_at(step))
        assert max_diff(ps, qs) < tol, (name, step, max_diff(ps, qs))
    assert fast == oracle
    gaps = {b - a for a, b in zip(fast, fast[1:])}
    assert gaps == {2, 4, 8}, fast  # T grew twice and hit the cap


def test_refresh_steps_follow_the_rule():
    """T0 = 2 while the loss falls fast, then 4, then the cap 8: the steps are the rule's."""
    ps, opt = _opt({**COMMON, **CASES["columns"]})
    steps, k = [], -1
    plans = 0
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        opt.step()
        k = _refresh_steps(opt, ps[0], steps, k)
        plans += opt.step_plan() is not None
        opt.observe_loss(loss_at(step))
    # by hand from the docstring's rule: the interval means are 12, 8, 6, 5, 4.5, 4.25, 4.125,
    # 4.0625, ...; the gains decided at steps 4 ... 14 are 1/3, 1/4, 1/6, 1/10, 1/18, 1/34
    # (>= 0.02: T stays 2); at step 16, 4.0625 vs 4.125 gives 1/66 < 0.02 -> T = 4; every
    # later gain is smaller: T = 8 from step 20, then the cap
    assert steps == [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 28, 36], steps
    assert plans > 0  # steps between refreshes replay the cached plan
    st = opt.state[ps[0]]
    assert int(st["refresh_gap"].item()) == 8 and int(st["refresh_next"].item()) == 44


def test_fixed_is_the_default_and_bit_identical():
    base = {k: v for k, v in COMMON.items() if k not in ("refresh_policy", "update_gap_max",
                                                          "refresh_threshold")}  # fmt: skip
    out = []
    for extra in ({}, {"refresh_policy": "fixed"}):
        ps, opt = _opt({**base, **CASES["svd"], **extra})
        for step, grads in enumerate(grad_stream(SHAPES, 12)):
            set_grads(ps, grads)
            opt.step()
            opt.observe_loss(loss_at(step))  # a no-op without a loss-driven group
        assert not any(key in opt.state[ps[0]] for key in SCHEDULE_KEYS)
        out.append(ps)
    assert max_diff(out[0], out[1]) == 0.0


def test_until_the_first_decision_loss_equals_fixed():
    """Before T first grows, the loss policy refreshes exactly as the fixed one: same bits."""
    base = {k: v for k, v in COMMON.items() if k not in ("refresh_policy", "update_gap_max",
                                                          "refresh_threshold")}  # fmt: skip
    out = []
    for extra in ({}, {"refresh_policy": "loss", "update_gap_max": 8}):
        ps, opt = _opt({**base, **CASES["random"], **extra})
        for step, grads in enumerate(grad_stream(SHAPES, 16)):
            set_grads(ps, grads)
            opt.step()
            opt.observe_loss(loss_at(step))
        out.append(ps)
    assert max_diff(out[0], out[1]) == 0.0


@pytest.mark.parametrize("name", ["block-gradnorm", "columns", "svd", "random-rotate"])
@pytest.mark.parametrize("stop", [9, 18, 23])  # mid-interval, at T = 2, 4 and 8
def test_resume_mid_interval_is_bit_for_bit(name, stop):
    """Save between refreshes (losses accumulated in the interval), load into a fresh optimizer
    through torch.save and continue: the same bits and refresh steps as the run that never
    stopped; the saved state is tensors only."""
    kw = {**COMMON, **CASES[name]}
    grads = list(grad_stream(SHAPES, STEPS))
    ps, opt = _opt(kw)
    for step, g in enumerate(grads):
        set_grads(ps, g)
        opt.step()
        opt.observe_loss(loss_at(step))
    qs, opt2 = _opt(kw)
    for step, g in enumerate(grads[:stop]):
        set_grads(qs, g)
        opt2.step()
        opt2.observe_loss(loss_at(step))
    assert opt2.state[qs[0]]["loss_count"].item() > 0  # a partial interval is saved
    buf = io.BytesIO()
    torch.save(copy.deepcopy(opt2.state_dict()), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    for v in saved["state"].values():
        assert all(isinstance(x, torch.Tensor) for x in v.values())
    rs = clone_params(qs)
    _, opt3 = _opt(kw, rs)
    opt3.load_state_dict(saved)
    assert opt3.state[rs[0]]["loss_sum"].dtype == torch.float64
    for step, g in enumerate(grads[stop:], start=stop):
        set_grads(rs, g)
        opt3.step()
        opt3.observe_loss(loss_at(step))
    assert max_diff(ps, rs) == 0.0
    for p, r in zip(ps, rs):
        for key in SCHEDULE_KEYS:
            a, b = opt.state[p][key], opt3.state[r][key]
            assert a.item() == b.item() or (math.isnan(a.item()) and math.isnan(b.item())), key


def test_resume_of_a_fixed_checkpoint_continues_the_fixed_schedule():
    """A checkpoint without schedule state (a fixed run's) resumed with the loss policy
    starts from the fixed schedule's position: the next refresh is the fixed one's."""
    base = {k: v for k, v in COMMON.items() if k not in ("refresh_policy", "update_gap_max",
                                                          "refresh_threshold")}  # fmt: skip
    ps, opt = _opt({**base, **CASES["columns"]})
    grads = list(grad_stream(SHAPES, 12))
    for g in grads[:5]:
        set_grads(ps, g)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group.pop("refresh_policy")  # as written before the option existed
    rs = clone_params(ps)
    _, opt2 = _opt({**COMMON, **CASES["columns"]}, rs)
    opt2.load_state_dict(saved)
    set_grads(rs, grads[5])
    opt2.step()  # step 5: no refresh; the schedule state starts here
    st = opt2.state[rs[0]]
    assert (int(st["refresh_k"].item()), int(st["refresh_next"].item())) == (2, 6)


def test_nonfinite_losses_are_not_counted():
    ps, opt = _opt({**COMMON, **CASES["columns"]})
    set_grads(ps, next(grad_stream(SHAPES, 1)))
    opt.step()
    for value in (float("nan"), float("inf"), torch.tensor(3.0), 5.0):
        opt.observe_loss(value)
    st = opt.state[ps[0]]
    assert st["loss_count"].item() == 2 and st["loss_sum"].item() == 8.0


def test_a_refresh_without_observed_loss_is_refused_and_nothing_moves():
    ps, opt = _opt({**COMMON, **CASES["columns"]})
    grads = list(grad_stream(SHAPES, 3))
    for g in grads[:2]:
        set_grads(ps, g)
        opt.step()
    before = [p.detach().clone() for p in ps]
    set_grads(ps, grads[2])
    with pytest.raises(ValueError, match="observe_loss"):
        opt.step()  # step 2 is due to refresh: no loss was reported
    assert max_diff(ps, before) == 0.0
    assert int(opt.state[ps[0]]["step"].item()) == 2


def test_decision_is_in_the_refresh_fingerprint():
    group = dict(refresh_policy="loss", algorithm="frugal")
    fps = {fold_fingerprint(group, {"refresh_next": torch.tensor(float(n))}, 12345)
           for n in (4, 8, 16)}  # fmt: skip
    assert len(fps) == 3 and all(-(2**63) <= f < 2**63 for f in fps)
    assert fold_fingerprint({**group, "refresh_policy": "fixed"}, {}, 7) == 7


BAD = [
    (dict(refresh_policy="lossy"), "refresh_policy"),
    (dict(refresh_policy="loss", update_gap=4, update_gap_max=2), "update_gap_max=2"),
    (dict(refresh_policy="loss", update_gap_max=0), "update_gap_max"),
    (dict(refresh_policy="loss", update_gap_max=6.5), "update_gap_max"),
    (dict(refresh_policy="loss", refresh_threshold=-0.1), "refresh_threshold"),
    (dict(refresh_policy="loss", refresh_threshold=float("nan")), "refresh_threshold"),
    (dict(update_gap_max=16), "update_gap_max=16.*refresh_policy='loss'"),
    (dict(refresh_threshold=0.1), "refresh_threshold=0.1.*refresh_policy='loss'"),
    (dict(refresh_policy="loss", density_final=0.1, density_decay_steps=10), "density_final"),
]


@pytest.mark.parametrize("extra,field", BAD)
def test_refused_with_the_field_named(extra, field):
    ps = make_params(SHAPES)
    with pytest.raises(ValueError, match=field):
        FRUGAL([{"params": ps, "names": NAMES}], **extra)
    with pytest.raises(ValueError, match=field):  # as a group's options too
        FRUGAL([{"params": ps, "names": NAMES, **extra}])


def test_other_algorithms_ignore_the_policy():
    """Groups that are not split (AdamW embeddings) take the optimizer-wide options too and
    never refresh: no schedule state, no observe_loss needed."""
    ps = make_params(SHAPES)
    opt = FRUGAL([{"params": ps, "names": NAMES, "algorithm": "adamw"}], refresh_policy="loss")
    for grads in grad_stream(SHAPES, 5):
        set_grads(ps, grads)
        opt.step()
    assert not any(key in opt.state[ps[0]] for key in SCHEDULE_KEYS)


def test_train_loop_feeds_the_logged_loss(monkeypatch):
    """``launchers/train.py``'s loop reports each step's logged (all-reduced) loss with
    ``observe_loss`` after the step; the config's optimizer section takes the options. A
    threshold no gain reaches doubles T at every decision: 1, 2, 4 (the cap)."""
    from frugal_dist.train.config import build_config
    from frugal_dist.train.loop import train

    seen: list[float] = []
    original = FRUGAL.observe_loss

    def spy(self, loss):
        seen.append(float(loss))
        return original(self, loss)

    monkeypatch.setattr(FRUGAL, "observe_loss", spy)
    built: list[FRUGAL] = []
    init = FRUGAL.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(FRUGAL, "__init__", keep)
    raw = {"model": "tiny", "seq_len": 32, "batch_size": 2, "max_steps": 9, "warmup_steps": 1,
           "log_every": 1, "eval_every": 0, "eval_batches": 1, "engine": "single",
           "data": {"source": "embedded", "max_bytes": 100_000},
           "optimizer": {"lr": 3e-3, "density": 0.25, "update_gap": 1, "subspace": "coordinate",
                         "refresh_policy": "loss", "update_gap_max": 4,
                         "refresh_threshold": 1e9}}  # fmt: skip
    summary = train(build_config(raw))
    assert seen == summary["losses"]  # the very values logged, one per step
    (opt,) = built
    split = [g for g in opt.param_groups if g["algorithm"] == "frugal"]
    st = opt.state[split[0]["params"][0]]
    # refreshes at steps 0, 1, 2 (T 1, the first decision at 2 doubles), 4 (T 4 from 4), 8
    assert (int(st["refresh_k"].item()), int(st["refresh_gap"].item())) == (4, 4)


def test_consolidated_export_import_keeps_the_schedule():
    """The world-size-free consolidated state (``optim.consolidate``, what resharding resumes
    load) carries the schedule state as counters, float64 kept: the continuation is bit-equal."""
    from frugal_dist.optim.consolidate import export_state, import_state

    kw = {**COMMON, **CASES["columns"]}
    grads = list(grad_stream(SHAPES, 30))
    ps, opt = _opt(kw)
    for step, g in enumerate(grads):
        set_grads(ps, g)
        opt.step()
        opt.observe_loss(loss_at(step))
    qs, opt2 = _opt(kw)
    for step, g in enumerate(grads[:19]):
        set_grads(qs, g)
        opt2.step()
        opt2.observe_loss(loss_at(step))
    blob = copy.deepcopy(export_state(opt2))
    rs = clone_params(qs)
    _, opt3 = _opt(kw, rs)
    import_state(opt3, blob)
    assert opt3.state[rs[0]]["loss_sum"].dtype == torch.float64
    for step, g in enumerate(grads[19:], start=19):
        set_grads(rs, g)
        opt3.step()
        opt3.observe_loss(loss_at(step))
    assert max_diff(ps, rs) == 0.0
