"""Subspace determinism, refresh timing, reset semantics, state bytes, checkpoints, validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from frugal_dist import FRUGAL, build_param_groups, check_param_coverage
from frugal_dist.core.subspaces import (
    BlockSchedule,
    block_count,
    coordinate_count,
    coordinate_selection,
    projection_rank,
    projection_selection,
)
from tests.helpers import SHAPES, grad_stream, make_params, max_diff, set_grads

NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]


def _opt(ps, **kw):
    return FRUGAL([{"params": ps, "names": NAMES[: len(ps)]}], **kw)


def _run(opt, ps, steps, seed=1):
    for grads in grad_stream([tuple(p.shape) for p in ps], steps, seed):
        set_grads(ps, grads)
        opt.step()


# ------------------------------------------------------------------------- subspace selection
@pytest.mark.parametrize("choice", ["columns", "rows", "randk"])
def test_coordinate_selection_sizes_and_determinism(choice):
    a = coordinate_selection((10, 20), 0.25, choice, seed=123)
    b = coordinate_selection((10, 20), 0.25, choice, seed=123)
    c = coordinate_selection((10, 20), 0.25, choice, seed=124)
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    expected = {"columns": 10 * 5, "rows": 2 * 20, "randk": 50}[choice]  # rows: int(2.5) = 2
    assert a.numel == expected == int(a.dense_mask().sum())
    g = torch.randn(10, 20)
    assert torch.equal(a.gather(g).reshape(-1), g[a.dense_mask()])  # compact = row-major order


@pytest.mark.parametrize("proj_type", ["svd", "random", "randperm"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_projection_is_orthonormal_and_splits_the_gradient(proj_type, shape):
    g = torch.randn(shape)
    sel = projection_selection(shape, 0.5, proj_type, "auto", seed=5, grad=g)
    r = projection_rank(shape, 0.5)
    assert sel.basis.shape == (min(shape), r)  # auto projects the smaller dimension
    eye = sel.basis.T @ sel.basis
    assert torch.allclose(eye, torch.eye(r), atol=1e-5)
    g_sf = sel.down(g)
    residual = g - sel.up(g_sf)
    assert torch.allclose(sel.up(g_sf) + residual, g)
    # The residual is what the subspace does not see: its projection is zero.
    assert sel.down(residual).abs().max() < 1e-5


@pytest.mark.parametrize("order", ["ascending", "descending", "mirror", "random_pass", "strided"])
def test_block_schedule_visits_every_tensor_each_pass(order):
    # rho 0.25 of 10 tensors: round(2.5) = 2 (half to even, as upstream), so 5 windows a pass.
    # (Before issue 16 this was 3 active with a clamped last window; see test_faithful_names.)
    sched = BlockSchedule(10, 0.25, order, seed=3)
    assert sched.num_active == 2 and sched.windows_per_pass == 5
    for p in range(3):
        seen: set[int] = set()
        for j in range(5):
            act = sched.active(p * 5 + j)
            assert len(act) == 2
            seen |= act
        assert seen == set(range(10))
    if order == "descending":
        assert sched.active(0) == {9, 8} and sched.active(5) == {9, 8}
    if order == "ascending":
        assert sched.active(0) == {0, 1} and sched.active(4) == {8, 9}
    if order == "mirror":
        assert sched.active(0) == {0, 9} and sched.active(4) == {4, 5}
    if order == "strided":  # ordering 0 5 | 1 6 | 2 7 | 3 8 | 4 9: windows spread over the model
        assert sched.active(0) == {0, 5} and sched.active(1) == {1, 6}


def test_strided_windows_are_spread_over_the_model():
    """LLaMA-1B-like: 24 layers x 7 matrices, rho 0.25. Every strided window touches both halves
    (and every quarter) of the model; descending windows sit in one contiguous quarter."""
    n = 24 * 7
    strided = BlockSchedule(n, 0.25, "strided", 0)
    descending = BlockSchedule(n, 0.25, "descending", 0)
    for k in range(strided.windows_per_pass):
        quarters = {i * 4 // n for i in strided.active(k)}
        assert quarters == {0, 1, 2, 3}, (k, quarters)
        assert len({i * 4 // n for i in descending.active(k)}) == 1


def test_rounding_follows_upstream():
    # blocks and projection ranks: Python round (half to even); coordinates: floor
    assert block_count(10, 0.25) == 2 and block_count(6, 0.25) == 2 and block_count(2, 0.25) == 0
    assert coordinate_count(10, 0.25) == 2 and coordinate_count(7, 0.5) == 3
    assert projection_rank((20, 10), 0.25) == 2 and projection_rank((20, 14), 0.25) == 4


@pytest.mark.parametrize("kind", ["block", "coordinate", "projection"])
def test_same_seed_same_subspaces_in_independent_instances(kind):
    runs = []
    for _ in range(2):
        ps = make_params()
        opt = _opt(
            ps, subspace=kind, update_gap=3, seed=42, proj_type="random", block_order="random"
        )
        _run(opt, ps, 7)
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert max_diff(pa, pb) == 0.0
    if kind != "block":
        for name in NAMES:
            sa, sb = oa.selections_in_use()[name][1], ob.selections_in_use()[name][1]
            ta = sa.index if kind == "coordinate" else sa.basis
            tb = sb.index if kind == "coordinate" else sb.basis
            assert torch.equal(ta, tb)
    other = make_params()
    oc = _opt(other, subspace=kind, update_gap=3, seed=43, proj_type="random", block_order="random")
    _run(oc, other, 7)
    assert max_diff(pa, other) > 0.0


@pytest.mark.parametrize("kind", ["coordinate", "projection"])
def test_refresh_happens_exactly_every_update_gap(kind):
    ps = make_params()
    gap = 4
    opt = _opt(ps, subspace=kind, update_gap=gap)
    seen = []
    for s, grads in enumerate(grad_stream(SHAPES, 13)):
        set_grads(ps, grads)
        opt.step()
        st = opt.state[ps[0]]
        assert opt.selections_in_use()[NAMES[0]][0] == s // gap
        assert int(st["sf_step"]) == s % gap + 1  # bias correction restarts at each refresh
        seen.append(opt.selections_in_use()[NAMES[0]][1])
    changed = [i for i in range(1, 13) if seen[i] is not seen[i - 1]]
    assert changed == [4, 8, 12]


def test_reset_statistics_false_keeps_moments():
    ps = make_params()
    opt = _opt(ps, subspace="coordinate", update_gap=3, reset_statistics=False)
    _run(opt, ps, 3)
    before = opt.state[ps[0]]["exp_avg"].clone()
    grads = [torch.zeros(s) for s in SHAPES]
    set_grads(ps, grads)
    opt.step()  # refresh with a zero gradient: moments decay instead of restarting
    st = opt.state[ps[0]]
    assert int(st["sf_step"]) == 4
    assert torch.allclose(st["exp_avg"], 0.9 * before)


def test_reset_statistics_true_restarts_moments():
    ps = make_params()
    opt = _opt(ps, subspace="coordinate", update_gap=3)
    _run(opt, ps, 3)
    grads = [torch.ones(s) for s in SHAPES]
    set_grads(ps, grads)
    opt.step()
    st = opt.state[ps[0]]
    assert int(st["sf_step"]) == 1
    assert torch.allclose(st["exp_avg"], torch.full_like(st["exp_avg"], 0.1))


# ------------------------------------------------------------------------- state bytes
def _closed_form(kind: str, rho: float, shapes, proj_type="random") -> int:
    f32 = 4
    total = 0
    n = len(shapes)
    active = BlockSchedule(n, rho, "descending", 0).active(0)
    for i, (m, c) in enumerate(shapes):
        total += f32  # "step"
        if kind == "block":
            if i in active:
                total += f32 + 2 * f32 * m * c
            continue
        total += f32  # "sf_step"
        if kind == "coordinate":
            total += 2 * f32 * m * int(c * rho)  # columns (floor, as upstream)
        else:
            r = projection_rank((m, c), rho)
            total += 2 * f32 * r * max(m, c)
            if proj_type == "svd":
                total += f32 * min(m, c) * r  # the svd basis is state (it depends on a gradient)
    return total


@pytest.mark.parametrize("kind", ["block", "coordinate", "projection"])
@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5])
def test_state_bytes_match_closed_form(kind, rho):
    shapes = [(16, 32), (32, 16), (24, 24), (8, 40)]
    for proj_type in ["random", "svd"] if kind == "projection" else ["random"]:
        ps = make_params(shapes)
        opt = _opt(ps, subspace=kind, density=rho, proj_type=proj_type)
        _run(opt, ps, 2)
        assert opt.state_bytes() == _closed_form(kind, rho, shapes, proj_type)


def test_coordinate_quarter_density_keeps_a_quarter_of_adamw_state():
    shapes = [(64, 128), (128, 64)]
    ps = make_params(shapes)
    opt = _opt(ps, subspace="coordinate", density=0.25)
    _run(opt, ps, 1)
    adamw_bytes = sum(8 * m * n for m, n in shapes)
    moments = sum(st["exp_avg"].nbytes + st["exp_avg_sq"].nbytes for st in opt.state.values())
    assert moments == adamw_bytes // 4


# ------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "kw",
    [
        dict(subspace="block", block_order="random"),
        dict(subspace="coordinate", coord_choice="randk"),
        dict(subspace="projection", proj_type="svd"),
        dict(subspace="projection", proj_type="random", reset_statistics=False),
        dict(subspace="coordinate", state_full="lion"),
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_resume_from_state_dict_is_exact(kw):
    steps, cut = 25, 11
    ps = make_params()
    opt = _opt(ps, update_gap=4, density=0.4, **kw)
    _run(opt, ps, steps)

    qs = make_params()
    o1 = _opt(qs, update_gap=4, density=0.4, **kw)
    stream = list(grad_stream(SHAPES, steps))
    for grads in stream[:cut]:
        set_grads(qs, grads)
        o1.step()
    saved_state = copy.deepcopy(o1.state_dict())
    saved_params = [q.detach().clone() for q in qs]

    rs = make_params(seed=99)  # a fresh model: every value comes from the checkpoint
    with torch.no_grad():
        for r, w in zip(rs, saved_params):
            r.copy_(w)
    o2 = _opt(rs, update_gap=4, density=0.4, **{**kw, "seed": 7})  # the saved seed must win
    o2.load_state_dict(saved_state)
    for grads in stream[cut:]:
        set_grads(rs, grads)
        o2.step()
    assert max_diff(ps, rs) == 0.0


def test_state_dict_holds_tensors_only():
    ps = make_params()
    opt = _opt(ps, subspace="projection", proj_type="svd")
    _run(opt, ps, 2)
    for st in opt.state_dict()["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in st.values())


def test_load_refuses_a_checkpoint_of_another_model():
    ps = make_params()
    opt = _opt(ps)
    _run(opt, ps, 1)
    sd = opt.state_dict()
    other = FRUGAL([{"params": make_params(), "names": [f"x{i}" for i in range(len(SHAPES))]}])
    with pytest.raises(ValueError, match="layers.0.w"):
        other.load_state_dict(sd)


def test_bf16_state_survives_load():
    ps = make_params(dtype=torch.bfloat16)
    opt = _opt(ps, subspace="coordinate")
    _run(opt, ps, 2)
    o2 = _opt(ps, subspace="coordinate")
    o2.load_state_dict(opt.state_dict())
    st = o2.state[ps[0]]
    assert st["exp_avg"].dtype == torch.float32 and st["sf_step"].device.type == "cpu"


@pytest.mark.parametrize("kind", ["block", "coordinate", "projection"])
def test_zero_grad_lr_zero_step_creates_state_and_changes_nothing(kind):
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    opt = _opt(ps, subspace=kind, lr=0.0, weight_decay=0.1, proj_type="svd")
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert max_diff(ps, before) == 0.0
    assert len(opt.state) == len(ps) and opt.state_bytes() > 0


# ------------------------------------------------------------------------- validation
BAD = [
    (dict(density=1.5), "density"),
    (dict(density=-0.1), "density"),
    (dict(update_gap=0), "update_gap"),
    (dict(update_gap=2.5), "update_gap"),
    (dict(subspace="rows"), "subspace"),
    (dict(block_order="reverse"), "block_order"),
    (dict(coord_choice="cols"), "coord_choice"),
    (dict(proj_type="qr"), "proj_type"),
    (dict(proj_side="top"), "proj_side"),
    (dict(state_full="adam"), "state_full"),
    (dict(state_free="sign_sgd"), "state_free"),
    (dict(lr=-1.0), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(inactive_lr_scale=-1.0), "inactive_lr_scale"),
    (dict(reset_statistics="yes"), "reset_statistics"),
    (dict(algorithm="adam"), "algorithm"),
    (dict(densty=0.3), "density"),  # typo -> unknown option, with a suggestion
]


@pytest.mark.parametrize("kw,field", BAD, ids=[f for _, f in BAD])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        FRUGAL(make_params(), **kw)
    with pytest.raises(ValueError, match=field):  # the same check on a param group
        FRUGAL([{"params": make_params(), **kw}])


def test_projection_on_a_vector_is_refused():
    with pytest.raises(ValueError, match="projection"):
        FRUGAL([{"params": [nn.Parameter(torch.randn(5))], "names": ["norm.weight"]}],
               subspace="projection")  # fmt: skip


# ------------------------------------------------------------------------- param groups
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_build_param_groups_assigns_every_parameter_once():
    model = _Tiny()
    groups = build_param_groups(model, weight_decay=0.1)
    by_name = {g["name"]: g["names"] for g in groups}
    assert by_name["split"] == ["proj.weight"]
    assert by_name["state_full"] == ["embed_tokens.weight", "lm_head.weight"]
    assert by_name["no_decay"] == ["proj.bias", "norm.weight", "norm.bias"]
    check_param_coverage(model, groups)
    opt = FRUGAL(groups)
    # issue 16: the non-split groups run the state_full rule (AdamW by default), as upstream
    assert [g["algorithm"] for g in opt.param_groups] == ["frugal", "state_full", "state_full"]
    assert opt.param_groups[2]["weight_decay"] == 0.0
    kept = build_param_groups(model, non_split="adamw")
    assert [g["algorithm"] for g in kept] == ["frugal", "adamw", "adamw"]


def test_wrapper_components_are_not_part_of_parameter_names():
    # subspaces are seeded by name: FSDP1's wrapper (registered by frugal_dist.engines),
    # activation checkpointing and torch.compile must not change a parameter's name
    from frugal_dist.optim.param_groups import clean_name

    raw = "_orig_mod.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.q.weight"
    assert clean_name(raw) == "layers.0.attn.q.weight"


def test_a_layout_resharding_state_by_rows_refuses_rows_and_randk():
    class ByRows:  # what FSDP2's DTensorLayout declares: checkpoints reshard state by rows
        reshards_state_by_rows = True
        process_group = None

    p = nn.Parameter(torch.zeros(4, 6))
    for choice in ("rows", "randk"):
        opt = FRUGAL([p], subspace="coordinate", coord_choice=choice)
        with pytest.raises(ValueError, match=f"coord_choice='{choice}' is not supported with"):
            opt.bind_layout(ByRows())
        assert opt.layout is None
    opt = FRUGAL([p], subspace="coordinate", coord_choice="columns")  # (m, k): row-aligned
    opt.bind_layout(ByRows())
    assert isinstance(opt.layout, ByRows)


def test_rules_come_first_and_coverage_errors_name_the_parameter():
    model = _Tiny()
    groups = build_param_groups(model, rules=[(r"^proj\.", {"algorithm": "signsgd"})])
    assert groups[0]["names"] == ["proj.weight", "proj.bias"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        check_param_coverage(model, [g for g in groups if g["name"] != "state_full"])


def test_mirror_with_an_odd_active_count_is_refused_when_the_group_is_added():
    """round(density x tensors) odd: a ValueError naming block_order at construction and at
    add_param_group (which leaves the optimizer as it was), not at the first step."""
    with pytest.raises(ValueError, match="block_order='mirror'.*even"):
        FRUGAL(make_params()[:3], density=1.0, block_order="mirror")
    opt = FRUGAL(make_params()[:2], density=1.0, block_order="mirror")
    with pytest.raises(ValueError, match="param group 1.*block_order='mirror'"):
        opt.add_param_group({"params": make_params()[:3]})
    assert len(opt.param_groups) == 1
