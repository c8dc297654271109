"""Issue 16: options under the paper's names compute the paper's / upstream's algorithm.

Each table row pins one behaviour of the upstream FRUGAL code (fzmushko/FRUGAL) that this project
used to compute differently: block orders (mirror pairs, wrapping windows, random per refresh),
rounding of every count, the state-full rule on the non-split parameters, nested classification
heads, GPT-2's (in, out) Conv1D weights. The selection oracle (``core.reference_selection``) is
checked against the fast path over many sizes.
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from torch import Tensor, nn

from frugal_dist import FRUGAL, build_param_groups
from frugal_dist.core import reference, reference_selection
from frugal_dist.core.reference import ReferenceFRUGAL
from frugal_dist.core.reference_selection import (
    ref_active_blocks,
    ref_coordinate_mask,
    ref_projection,
)
from frugal_dist.core.seeding import derive_seed, make_generator
from frugal_dist.core.subspaces import (
    STATIC_BLOCK_ORDERS,
    BlockSchedule,
    block_count,
    coordinate_count,
    coordinate_selection,
    projection_rank,
    projection_selection,
)
from frugal_dist.train.config_validation import validate_optimizer_section
from frugal_dist.train.optimizers import build_optimizer
from tests.helpers import SHAPES, clone_params, grad_stream, make_params, max_diff, set_grads


def _schedule(n: int, rho: float, order: str, refreshes: int, seed: int = 0) -> list[set[int]]:
    sched = BlockSchedule(n, rho, order, seed)
    return [set(sched.active(k)) for k in range(refreshes)]


# ------------------------------------------------------------------------ block schedules
SCHEDULES = [
    # (n, rho, order, expected active sets at refreshes 0, 1, 2, ...) -- upstream's schedules
    (16, 0.25, "mirror",
     [{0, 1, 14, 15}, {2, 3, 12, 13}, {4, 5, 10, 11}, {6, 7, 8, 9}, {0, 1, 14, 15}]),
    (16, 0.25, "ascending", [{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15},
                             {0, 1, 2, 3}]),
    (16, 0.25, "descending", [{12, 13, 14, 15}, {8, 9, 10, 11}, {4, 5, 6, 7}, {0, 1, 2, 3},
                              {12, 13, 14, 15}]),
    # a = round(0.3 * 14) = 4 does not divide 14: windows wrap around modulo n
    (14, 0.3, "ascending", [{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 0, 1},
                            {2, 3, 4, 5}]),
    (14, 0.3, "descending", [{10, 11, 12, 13}, {6, 7, 8, 9}, {2, 3, 4, 5}, {0, 1, 12, 13},
                             {8, 9, 10, 11}]),
    (14, 0.3, "mirror", [{0, 1, 12, 13}, {2, 3, 10, 11}, {4, 5, 8, 9}, {6, 0, 7, 13},
                         {1, 2, 11, 12}]),
    # odd n: the middle tensor is never in a mirror pair (as upstream)
    (5, 0.4, "mirror", [{0, 4}, {1, 3}, {0, 4}]),
    # strided (project addition): ascending over the interleaved order 0 4 8 12 | 1 5 9 13 | ...
    (14, 0.3, "strided", [{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 3}, {7, 11, 0, 4}]),
]  # fmt: skip


@pytest.mark.parametrize("n,rho,order,expected", SCHEDULES)
def test_block_schedules_are_upstreams(n, rho, order, expected):
    assert _schedule(n, rho, order, len(expected)) == expected
    assert [ref_active_blocks(n, rho, order, 0, k) for k in range(len(expected))] == expected


@pytest.mark.parametrize("n,rho", [(10, 0.3), (16, 0.3125), (7, 0.15)])
def test_mirror_needs_an_even_active_count(n, rho):
    assert block_count(n, rho) % 2 == 1
    with pytest.raises(ValueError, match="block_order='mirror'.*density"):
        BlockSchedule(n, rho, "mirror", 0)
    ps = make_params([(3, 3)] * n)
    with pytest.raises(ValueError, match="block_order='mirror'"):  # when the group is added
        FRUGAL(ps, density=rho, block_order="mirror")


def test_random_is_an_independent_draw_per_refresh():
    """``random``: randperm(n)[:a] at every refresh, seeded by (schedule seed, refresh) -- not
    one permutation cut into windows (that is ``random_pass``)."""
    n, rho, seed = 16, 0.25, 1234
    sched = BlockSchedule(n, rho, "random", seed)
    for k in range(40):
        gen = make_generator(derive_seed(seed, "block-random", k))
        assert set(sched.active(k)) == set(torch.randperm(n, generator=gen)[:4].tolist())
    # the same sets whatever the order of the queries (a pure function of (seed, refresh))
    again = BlockSchedule(n, rho, "random", seed)
    assert [again.active(k) for k in reversed(range(40))] == [
        sched.active(k) for k in reversed(range(40))
    ]
    # independent draws: some pass of 4 refreshes leaves a tensor out (a partition never does)
    passes = [set().union(*(sched.active(4 * p + j) for j in range(4))) for p in range(10)]
    assert any(len(s) < n for s in passes)
    # random_pass keeps the old per-pass partition
    rp = BlockSchedule(n, rho, "random_pass", seed)
    for p in range(5):
        assert set().union(*(rp.active(4 * p + j) for j in range(4))) == set(range(n))


# ------------------------------------------------------------------------------- rounding
ROUNDING = [
    # (what, value computed now, upstream's value) -- at .5 Python rounds half to even
    ("blocks n=10 rho=0.25", lambda: block_count(10, 0.25), 2),
    ("blocks n=6 rho=0.25", lambda: block_count(6, 0.25), 2),
    ("blocks n=14 rho=0.25", lambda: block_count(14, 0.25), 4),
    ("blocks n=2 rho=0.2 (no forced 1)", lambda: block_count(2, 0.2), 0),
    ("columns n=10 rho=0.25", lambda: coordinate_count(10, 0.25), 2),
    ("rows m=7 rho=0.5", lambda: coordinate_count(7, 0.5), 3),
    ("randk 3x3 rho=0.1 (floor, no forced 1)", lambda: coordinate_count(9, 0.1), 0),
    ("rank (40, 10) rho=0.25", lambda: projection_rank((40, 10), 0.25), 2),
    ("rank (10, 40) rho=0.25", lambda: projection_rank((10, 40), 0.25), 2),
    ("rank (40, 14) rho=0.25", lambda: projection_rank((40, 14), 0.25), 4),
    ("rank right of (10, 40) rho=0.25", lambda: projection_rank((10, 40), 0.25, "right"), 10),
    ("svd rank capped at min(m, n)", lambda: projection_rank((10, 60), 0.25, "right", "svd"), 10),
    ("schedule n=10 rho=0.25", lambda: len(BlockSchedule(10, 0.25, "descending", 0).active(0)), 2),
    ("selection columns (4, 10)",
     lambda: coordinate_selection((4, 10), 0.25, "columns", 0).index.numel(), 2),
    ("basis (40, 10)", lambda: projection_selection((40, 10), 0.25, "random", "auto", 0).rank, 2),
]  # fmt: skip


@pytest.mark.parametrize("what,got,want", ROUNDING, ids=[r[0] for r in ROUNDING])
def test_counts_round_as_upstream(what, got, want):
    assert got() == want


def test_rounding_reaches_the_optimizer_state():
    """n=10 tensors, rho=0.25: 2 active blocks (not 3); a (6, 10) matrix keeps 2 columns."""
    ps = make_params([(6, 10)] * 10)
    opt = FRUGAL(ps, density=0.25)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert sum("exp_avg" in opt.state[p] for p in ps) == 2
    q = make_params([(6, 10)])
    opt = FRUGAL(q, density=0.25, subspace="coordinate")
    q[0].grad = torch.ones_like(q[0])
    opt.step()
    assert tuple(opt.state[q[0]]["exp_avg"].shape) == (6, 2)


# -------------------------------------------------------------------------- the oracle
def test_reference_does_not_use_the_fast_path_selection():
    tree = ast.parse(inspect.getsource(reference))
    imported = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert not any(mod == "frugal_dist.core.subspaces" for mod, _ in imported), imported
    src = inspect.getsource(reference_selection)
    assert "core.subspaces" not in src.replace("``core.subspaces``", "")


@pytest.mark.parametrize("order", STATIC_BLOCK_ORDERS)  # gradnorm: test_block_gradnorm
def test_block_schedule_matches_the_oracle(order):
    for n in range(1, 18):
        for rho in (0.1, 0.25, 0.3, 0.5, 0.75, 1.0):
            a = round(n * rho)
            if order == "mirror" and a % 2:
                with pytest.raises(ValueError):
                    BlockSchedule(n, rho, order, 7)
                continue
            sched = BlockSchedule(n, rho, order, 7)
            for k in range(2 * n + 3):
                assert set(sched.active(k)) == ref_active_blocks(n, rho, order, 7, k), (n, rho, k)


@pytest.mark.parametrize("choice", ["columns", "rows", "randk"])
@pytest.mark.parametrize("shape", [(4, 10), (7, 3), (1, 9), (5, 5)])
@pytest.mark.parametrize("rho", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_coordinate_selection_matches_the_oracle(choice, shape, rho):
    sel = coordinate_selection(shape, rho, choice, seed=11)
    assert torch.equal(sel.dense_mask(), ref_coordinate_mask(shape, rho, choice, seed=11))


@pytest.mark.parametrize("proj_type", ["random", "randperm", "svd"])
@pytest.mark.parametrize("side", ["auto", "left", "right"])
@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (8, 8)])
@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5, 1.0])
def test_projection_selection_matches_the_oracle(proj_type, side, shape, rho):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    sel = projection_selection(shape, rho, proj_type, side, seed=5, grad=grad)
    ref_side, basis = ref_projection(shape, rho, proj_type, side, seed=5, grad=grad)
    assert sel.side == ref_side and sel.basis.shape == basis.shape
    assert torch.allclose(sel.basis, basis, atol=1e-6)


@pytest.mark.parametrize("order", ["descending", "ascending", "mirror", "random", "strided"])
def test_fourteen_tensors_follow_the_oracle_past_the_wrap(order):
    """A 2-layer LLaMA has 14 split tensors; a = 4 does not divide 14. Before issue 16 the
    trajectories split from upstream's at the third refresh (clamped windows)."""
    shapes = [(4, 3)] * 14
    names = [f"layers.{i}.w" for i in range(14)]
    kw = dict(lr=1e-2, density=0.3, update_gap=2, block_order=order)
    ps = make_params(shapes)
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": names}], **kw)
    ref = ReferenceFRUGAL(list(zip(names, qs)), **kw)
    for grads in grad_stream(shapes, 14):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
    assert max_diff(ps, qs) < 1e-6


# ---------------------------------------------- the state-full rule on the non-split params
class _Lm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm_head(self.norm(self.proj(self.embed_tokens(ids))))


def _train(model: nn.Module, opt, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 5), generator=gen)
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, 11), ids.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "rule,non_split,keys",
    [
        ("lion", "state_full", {"exp_avg"}),
        ("sgdm", "state_full", {"momentum_buffer"}),
        ("adamw", "state_full", {"exp_avg", "exp_avg_sq"}),
        ("lion", "adamw", {"exp_avg", "exp_avg_sq"}),  # the explicit opt-out
        ("sgdm", "adamw", {"exp_avg", "exp_avg_sq"}),
    ],
)
def test_state_full_rule_reaches_the_non_split_parameters(rule, non_split, keys):
    model = _Lm()
    opt = FRUGAL(build_param_groups(model, non_split=non_split), state_full=rule, lr=1e-2)
    _train(model, opt)
    for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "proj.bias"):
        st = opt.state[dict(model.named_parameters())[name]]
        assert set(st) - {"step", "sf_step"} == keys, (name, set(st))


@pytest.mark.parametrize("rule", ["lion", "sgdm", "adamw"])
def test_state_full_groups_match_the_reference(rule):
    names = [f"extra.{i}" for i in range(len(SHAPES))]
    kw = dict(lr=1e-2, state_full=rule, betas=(0.9, 0.99), weight_decay=0.1)
    ps = make_params()
    qs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": names, "algorithm": "state_full"}], **kw)
    ref = ReferenceFRUGAL(list(zip(names, qs)), algorithm="state_full", **kw)
    for grads in grad_stream(SHAPES, 12):
        set_grads(ps, grads)
        set_grads(qs, grads)
        opt.step()
        ref.step()
    assert max_diff(ps, qs) < 1e-6


def test_lion_on_an_embedding_is_lion():
    """Two steps of Lion written out: W -= lr * sign(b1 m + (1 - b1) g), m <- b2 m + (1 - b2) g."""
    model = _Lm()
    emb = model.embed_tokens.weight
    w0 = emb.detach().clone()
    opt = FRUGAL(build_param_groups(model), state_full="lion", lr=1e-2, betas=(0.9, 0.99))
    g1, g2 = torch.randn(11, 8), torch.randn(11, 8)
    for g in (g1, g2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        emb.grad = g.clone()
        opt.step()
    m1 = 0.01 * g1
    expect = w0 - 1e-2 * torch.sign(0.1 * g1) - 1e-2 * torch.sign(0.9 * m1 + 0.1 * g2)
    assert torch.allclose(emb.detach(), expect, atol=1e-7)


def test_non_split_is_validated():
    with pytest.raises(ValueError, match="non_split must be one of"):
        build_param_groups(_Lm(), non_split="lion")
    with pytest.raises(ValueError, match="optimizer.non_split"):
        validate_optimizer_section({"name": "frugal", "non_split": "sgd"})
    validate_optimizer_section({"name": "frugal", "non_split": "adamw", "state_full": "lion"})
    opt = build_optimizer(_Lm(), "frugal", state_full="lion", non_split="adamw")
    assert [g["algorithm"] for g in opt.param_groups] == ["frugal", "adamw", "adamw"]


# ------------------------------------------------------------------------- nested heads
class _Encoder(nn.Module):
    """Names as in RoBERTa / BERT / HF *ForSequenceClassification."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleDict(
            {"attention": nn.ModuleDict({"output": nn.ModuleDict({"dense": nn.Linear(8, 8)})}),
             "output": nn.ModuleDict({"dense": nn.Linear(8, 8)})}
        )  # fmt: skip
        self.pooler = nn.ModuleDict({"dense": nn.Linear(8, 8)})
        self.classifier = nn.ModuleDict({"dense": nn.Linear(8, 8), "out_proj": nn.Linear(8, 3)})
        self.score = nn.Linear(8, 3, bias=False)


def test_nested_heads_stay_state_full():
    groups = {g["name"]: g["names"] for g in build_param_groups(_Encoder())}
    assert groups["split"] == ["layer.attention.output.dense.weight", "layer.output.dense.weight"]
    for head in ("pooler.dense.weight", "classifier.dense.weight", "classifier.out_proj.weight",
                 "score.weight"):  # fmt: skip
        assert head in groups["state_full"], (head, groups)


def test_roberta_classifier_is_not_split():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=40, num_labels=3)  # fmt: skip
    model = transformers.RobertaForSequenceClassification(cfg)
    groups = {g["name"]: g["names"] for g in build_param_groups(model)}
    assert "classifier.dense.weight" in groups["state_full"]
    assert "classifier.out_proj.weight" in groups["state_full"]
    assert "roberta.encoder.layer.0.output.dense.weight" in groups["split"]


# -------------------------------------------------------------------- GPT-2 Conv1D weights
def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize(
    "opts",
    [
        dict(subspace="coordinate", coord_choice="columns"),
        dict(subspace="coordinate", coord_choice="rows"),
        dict(subspace="projection", proj_side="left"),
        dict(subspace="projection", proj_side="right"),
    ],
)
def test_conv1d_refuses_orientation_dependent_subspaces(opts):
    model = _gpt2()
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight'.*Conv1D"):
        FRUGAL(build_param_groups(model), **opts)


@pytest.mark.parametrize(
    "opts",
    [
        dict(subspace="block"),
        dict(subspace="coordinate", coord_choice="randk"),
        dict(subspace="projection", proj_side="auto"),
    ],
)
def test_conv1d_orientation_free_subspaces_train(opts):
    model = _gpt2()
    opt = FRUGAL(build_param_groups(model), lr=1e-3, update_gap=2, **opts)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------- RSO: weight decay on W too
def _rso_layer(wd: float):
    from frugal_dist import RSO
    from frugal_dist.optim.rso_layers import RSOLinear

    torch.manual_seed(0)
    lin = nn.Linear(10, 12, bias=False)
    w0 = lin.weight.detach().clone()
    layer = RSOLinear(lin.weight, None, 4, "lin", seed=5)
    opt = RSO([{"params": [layer.B], "names": ["lin.B"], "rso": True}], layers={"lin": layer},
              lr=0.1, weight_decay=wd, inner_steps=3)  # fmt: skip
    return layer, opt, w0


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_rso_weight_decay_reaches_the_frozen_weight(wd):
    """With zero gradients Adam moves nothing, so only decoupled weight decay acts: the effective
    weight c W + B P^T must be (1 - lr wd)^t W0 after t steps, before and after the merges (as
    AdamW on a full weight). Before issue 16 the RSO layers' W never decayed."""
    layer, opt, w0 = _rso_layer(wd)
    x = torch.randn(5, 10)
    for t in range(1, 8):
        layer.B.grad = torch.zeros_like(layer.B)
        opt.step()
        expect = (1 - 0.1 * wd) ** t * w0
        assert torch.allclose(layer(x), x @ expect.T, atol=1e-6), t
    assert layer.outer == 2  # merged after steps 3 and 6: W itself now carries the decay
    assert torch.allclose(layer.weight, (1 - 0.1 * wd) ** 6 * w0, atol=1e-6)


def test_rso_input_gradient_uses_the_decayed_weight():
    layer, opt, _ = _rso_layer(0.5)
    layer.B.grad = torch.randn_like(layer.B)
    opt.step()
    assert layer.w_scale == pytest.approx(0.95) and layer.B.abs().sum() > 0
    x = torch.randn(5, 10, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    w_eff = 0.95 * layer.weight + layer.B @ layer.projection().T
    assert torch.allclose(y, x @ w_eff.T, atol=1e-6)
    assert torch.allclose(gx, torch.ones(5, 12) @ w_eff, atol=1e-6)


# ------------------------------------------------------- counts of 0 are empty subspaces
@pytest.mark.parametrize(
    "kw",
    [
        dict(subspace="block", density=0.2),  # round(0.2 * 2) = 0 blocks (was forced to 1)
        dict(subspace="coordinate", coord_choice="columns", density=0.1),  # int(0.4) = 0
        dict(subspace="coordinate", coord_choice="randk", density=0.01),
        dict(subspace="projection", proj_type="random", density=0.1),  # round(0.3) = 0
        dict(subspace="projection", proj_type="svd", density=0.1),
    ],
    ids=["block", "columns", "randk", "random", "svd"],
)
def test_empty_subspaces_at_positive_density_are_the_state_free_rule(kw):
    shapes = [(3, 4), (4, 3)]
    names = ["a.w", "b.w"]
    ps = make_params(shapes)
    qs = clone_params(ps)
    rs = clone_params(ps)
    opt = FRUGAL([{"params": ps, "names": names}], lr=1e-2, update_gap=3, **kw)
    ref = ReferenceFRUGAL(list(zip(names, qs)), lr=1e-2, update_gap=3, **kw)
    free = FRUGAL([{"params": rs, "names": names, "algorithm": "signsgd"}], lr=1e-2)
    for grads in grad_stream(shapes, 7):
        for group in (ps, qs, rs):
            set_grads(group, grads)
        opt.step()
        ref.step()
        free.step()
    assert max_diff(ps, qs) < 1e-6 and max_diff(ps, rs) < 1e-6
