"""``density_final`` / ``density_decay_steps`` (a linearly decaying density,
``optim.density_schedule``): the fast path against the oracle step by step with the size
changing at several refreshes, the sizes themselves, state memory never above refresh 0's,
resume mid-schedule bit for bit, the fingerprint, and what is refused."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.core.subspaces import block_count, coordinate_count, projection_rank
from frugal_dist.optim.density_schedule import density_at
from frugal_dist.optim.kinds.block import Block
from tests.helpers import clone_params, grad_stream, make_params, max_diff, set_grads

SHAPES = [(16, 12), (12, 16), (10, 10), (6, 4), (8, 3), (9, 7)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
# refreshes at steps 0, 3, 6, 9, 12, 15: rho = 0.6, 0.475, 0.35, 0.225, 0.1, 0.1 -- the size
# changes at four refreshes, then holds
COMMON = dict(lr=3e-3, density=0.6, density_final=0.1, density_decay_steps=12, update_gap=3,
              weight_decay=0.05)  # fmt: skip
STEPS = 17
CASES = {
    "block-random": dict(subspace="block", block_order="random"),
    "block-ascending": dict(subspace="block", block_order="ascending"),
    "block-descending": dict(subspace="block", block_order="descending"),
    "block-gradnorm": dict(subspace="block", block_order="gradnorm"),
    "block-keep": dict(subspace="block", block_order="descending", reset_statistics=False),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "rows": dict(subspace="coordinate", coord_choice="rows"),
    "randk": dict(subspace="coordinate", coord_choice="randk"),
    "columns-matched": dict(subspace="coordinate", coord_choice="columns",
                            free_scale="matched"),
    "random": dict(subspace="projection", proj_type="random"),
    "randperm-left": dict(subspace="projection", proj_type="randperm", proj_side="left"),
    "svd": dict(subspace="projection", proj_type="svd"),
    "svd-exact": dict(subspace="projection", proj_type="svd", svd_method="exact"),
    "random-rotate": dict(subspace="projection", proj_type="random", moment_transfer="rotate"),
    # (left svd bases are not used here: on (6, 4) / (8, 3) they span the whole column space at
    # rho 0.6, and the signs of a residual of rounding noise differ between any two codes)
    "svd-rotate": dict(subspace="projection", proj_type="svd", moment_transfer="rotate"),
    "random-rotate-left": dict(subspace="projection", proj_type="random", proj_side="left",
                               moment_transfer="rotate"),
}  # fmt: skip


def _run(kw: dict):
    ps = make_params(SHAPES)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    return ps, opt


@pytest.mark.parametrize("name", list(CASES))
def test_decay_matches_oracle_step_by_step(name):
    kw = {**COMMON, **CASES[name]}
    # svd bases of the two implementations differ in the last bits (float32 subspace iteration
    # of nearby singular values); random bases, coordinates and blocks: the same bits
    tol = 1e-4 if CASES[name].get("proj_type") == "svd" else 1e-5
    ps = make_params(SHAPES)
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
        assert max_diff(ps, qs) < tol, (name, step, max_diff(ps, qs))


def _sizes(opt, ps, key: str = "exp_avg") -> list[int]:
    return [opt.state[p][key].numel() if key in opt.state[p] else 0 for p in ps]


@pytest.mark.parametrize("name", ["columns", "rows", "randk", "random", "svd"])
def test_sizes_follow_the_schedule(name):
    """At each refresh the compact state has the kinds' rounding of rho(k); between refreshes
    it holds; the total never exceeds refresh 0's (the rho0 run's peak)."""
    kw = {**COMMON, **CASES[name]}
    ps, opt = _run(kw)
    group = opt.param_groups[0]
    first = None
    seen = set()
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        opt.step()
        k = step // kw["update_gap"]
        rho = density_at(group, k)
        expect = []
        for shape in SHAPES:
            m, n = shape
            if name == "columns":
                expect.append(m * coordinate_count(n, rho))
            elif name == "rows":
                expect.append(coordinate_count(m, rho) * n)
            elif name == "randk":
                expect.append(coordinate_count(m * n, rho))
            else:
                pt = kw["proj_type"]
                r = projection_rank(shape, rho, "auto", pt)
                expect.append(r * (m if m >= n else n))
        assert _sizes(opt, ps) == expect, (step, rho)
        total = sum(expect)
        first = total if first is None else first
        assert total <= first
        seen.add(total)
    assert len(seen) >= 3  # the size changed at two refreshes at least


def test_density_at_is_the_linear_schedule():
    g = dict(density=0.25, density_final=0.05, density_decay_steps=1000, update_gap=200)
    assert [density_at(g, k) for k in range(7)] == pytest.approx(
        [0.25, 0.21, 0.17, 0.13, 0.09, 0.05, 0.05]
    )
    assert density_at({**g, "density_final": None}, 3) == 0.25
    assert density_at({**g, "density_decay_steps": 1}, 1) == pytest.approx(0.05)


def test_block_counts_follow_the_schedule():
    kw = {**COMMON, **CASES["block-descending"]}
    ps, opt = _run(kw)
    group = opt.param_groups[0]
    counts = []
    for step, grads in enumerate(grad_stream(SHAPES, STEPS)):
        set_grads(ps, grads)
        opt.step()
        active = sum("exp_avg" in opt.state[p] for p in ps)
        assert active == block_count(len(ps), density_at(group, step // kw["update_gap"]))
        counts.append(active)
    assert counts[0] == 4 and counts[-1] == 1 and len(set(counts)) >= 3


def test_off_by_default_and_none_is_bit_identical():
    fixed = {k: v for k, v in COMMON.items() if not k.startswith("density_")}
    out = []
    for extra in ({}, {"density_final": None, "density_decay_steps": None}):
        ps, opt = _run({**fixed, **CASES["columns"], **extra})
        for grads in grad_stream(SHAPES, 8):
            set_grads(ps, grads)
            opt.step()
        out.append(ps)
    assert max_diff(out[0], out[1]) == 0.0
    decayed, opt = _run({**COMMON, **CASES["columns"]})
    for grads in grad_stream(SHAPES, 8):
        set_grads(decayed, grads)
        opt.step()
    assert max_diff(out[0], decayed) > 1e-4


@pytest.mark.parametrize("name", ["block-ascending", "block-gradnorm", "columns", "svd",
                                  "random-rotate"])  # fmt: skip
def test_resume_mid_schedule_is_bit_for_bit(name):
    """Save after step 7 (between refreshes of different sizes), load into a fresh optimizer
    (the sizes are recomputed from the saved step counters) and continue: the same bits as the
    run that never stopped."""
    kw = {**COMMON, **CASES[name]}
    grads = list(grad_stream(SHAPES, STEPS))
    ps, opt = _run(kw)
    for g in grads:
        set_grads(ps, g)
        opt.step()
    qs, opt2 = _run(kw)
    for g in grads[:7]:
        set_grads(qs, g)
        opt2.step()
    saved = copy.deepcopy(opt2.state_dict())
    for v in saved["state"].values():
        assert all(isinstance(x, torch.Tensor) for x in v.values())  # tensors only
    rs = clone_params(qs)
    opt3 = FRUGAL([{"params": rs, "names": NAMES}], **kw)
    opt3.load_state_dict(saved)
    for g in grads[7:]:
        set_grads(rs, g)
        opt3.step()
    assert max_diff(ps, rs) == 0.0


def test_block_fingerprint_includes_the_size():
    group = dict(names=["a", "b", "c", "d"], density=0.5, density_final=0.25,
                 density_decay_steps=2, update_gap=1)  # fmt: skip
    fps = set()
    for g in (group, {**group, "density_final": None}):
        fps.add(Block().fingerprint(SimpleNamespace(group=g, k=3, active=True)))
    assert len(fps) == 2


BAD = [  # with density=0.25
    (dict(density_final=0.5, density_decay_steps=10), "density_final=0.5"),  # above density
    (dict(density_final=-0.1, density_decay_steps=5), "density_final"),
    (dict(density_final=0.1), "density_decay_steps"),
    (dict(density_final=0.1, density_decay_steps=0), "density_decay_steps"),
    (dict(density_final=0.1, density_decay_steps=True), "density_decay_steps"),
    (dict(density_final=0.1, density_decay_steps=2.5), "density_decay_steps"),
    (dict(density_decay_steps=10), "density_final"),
    (dict(density_final=0.1, density_decay_steps=10, block_order="mirror"), "block_order"),
    (dict(density_final=0.1, density_decay_steps=10, block_order="random_pass"), "block_order"),
    (dict(density_final=0.1, density_decay_steps=10, subspace="coordinate",
          reset_statistics=False), "reset_statistics=False"),
    (dict(density_final=0.1, density_decay_steps=10, subspace="projection",
          reset_statistics=False), "reset_statistics=False"),
]  # fmt: skip


@pytest.mark.parametrize("extra,field", BAD)
def test_refused_with_the_field_named(extra, field):
    ps = make_params(SHAPES)
    kw = {"density": 0.25, **extra}
    with pytest.raises(ValueError, match=field):
        FRUGAL([{"params": ps, "names": NAMES}], **kw)
    with pytest.raises(ValueError, match=field):  # as a group's options too
        FRUGAL([{"params": ps, "names": NAMES, **kw}])


def test_block_keep_statistics_is_allowed():
    ps = make_params(SHAPES)
    FRUGAL([{"params": ps, "names": NAMES}], **COMMON, reset_statistics=False)
