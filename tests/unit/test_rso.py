"""RSO: the layer's gradients, the merge, activation memory, optimizer state, resume, training."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from frugal_dist import RSO, apply_rso
from frugal_dist.core.rso import rso_projection, rso_rank, rso_seed
from frugal_dist.optim.rso import build_rso, rso_param_groups
from frugal_dist.optim.rso_layers import RSOLinear, rso_layers
from frugal_dist.train.model import DecoderLayer, LlamaConfig, build_model, rope_cache
from frugal_dist.train.optimizers import build_optimizer


def _layer(m=12, n=10, r=4, bias=True, seed=0) -> RSOLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    layer = RSOLinear(lin.weight, lin.bias, r, "lin", seed=5)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def test_projection_is_a_pure_function_of_seed_name_and_outer():
    p = rso_projection(32, 8, rso_seed(1, "a", 0))
    assert torch.equal(p, rso_projection(32, 8, rso_seed(1, "a", 0)))
    assert not torch.equal(p, rso_projection(32, 8, rso_seed(1, "a", 1)))
    assert not torch.equal(p, rso_projection(32, 8, rso_seed(1, "b", 0)))
    q = rso_projection(32, 8, 7, "orthonormal", torch.float64)
    assert torch.allclose(q.t() @ q, torch.eye(8, dtype=torch.float64), atol=1e-12)
    g = rso_projection(4000, 50, 7)  # N(0, 1/r) entries
    assert abs(g.var().item() * 50 - 1.0) < 0.02
    assert rso_rank(172, density=0.25) == 43 and rso_rank(64, rank=100) == 64


@pytest.mark.parametrize("proj_type, ratio", [("gaussian", 1.0), ("orthonormal", 0.5)])
def test_step_on_w_has_the_rms_the_docstring_states(proj_type, ratio):
    """dW = dB P^T for a sign-like Adam step dB (entries +-1): RMS(dW) / RMS(dB) ~ 1 for Gaussian
    N(0, 1/r) P (AdamW's per-entry step at equal lr) and sqrt(r/n) = 1/2 for orthonormal P."""
    n, r, m = 512, 128, 256
    p = rso_projection(n, r, rso_seed(0, "w", 0), proj_type)
    db = torch.randint(0, 2, (m, r), generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    dw = db.double() @ p.double().t()
    assert dw.pow(2).mean().sqrt().item() == pytest.approx(ratio, rel=0.05)


def test_b_gradient_is_the_projected_full_weight_gradient():
    layer = _layer()
    x = torch.randn(3, 7, 10, dtype=torch.float32, requires_grad=True)
    up = torch.randn(3, 7, 12)
    (layer(x) * up).sum().backward()
    p = layer.projection()
    dense = nn.Linear(10, 12)
    with torch.no_grad():
        dense.weight.copy_(layer.weight + layer.B @ p.t())
        dense.bias.copy_(layer.bias)
    x2 = x.detach().clone().requires_grad_(True)
    (dense(x2) * up).sum().backward()
    assert torch.allclose(layer.B.grad, dense.weight.grad @ p, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(layer.bias.grad, dense.bias.grad)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_autocast_bf16_matches_the_dense_layer_under_autocast():
    layer = _layer(m=24, n=32, r=8)
    p = layer.projection()
    dense = nn.Linear(32, 24)
    with torch.no_grad():
        dense.weight.copy_(layer.weight + layer.B @ p.t())
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    up = torch.randn(3, 7, 24)
    saved: list[torch.dtype] = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y2 = dense(x2)
    assert y.dtype == y2.dtype == torch.bfloat16
    assert _rel_err(y, y2) < 2e-2
    (y.float() * up).sum().backward()  # backward outside autocast, as in the training loop
    (y2.float() * up).sum().backward()
    assert saved[0] == torch.bfloat16  # X P, the only activation, is kept in the compute dtype
    assert layer.B.grad.dtype == layer.bias.grad.dtype == x.grad.dtype == torch.float32
    assert layer.weight.grad is None
    # bf16 operands (8-bit mantissa), float32 accumulation: relative errors ~1e-2
    assert _rel_err(layer.B.grad, dense.weight.grad @ p) < 3e-2
    assert _rel_err(x.grad, x2.grad) < 3e-2
    assert _rel_err(layer.bias.grad, dense.bias.grad) < 1e-2
    # without autocast the layer is float32 throughout, as before
    assert layer(x).dtype == torch.float32


def test_autocast_bf16_training_of_a_tiny_llama_with_rso():
    torch.manual_seed(0)
    model = build_model("tiny", max_seq_len=16, n_layers=1)
    opt = build_optimizer(model, "rso", lr=1e-2, inner_steps=5, rank=8)
    x = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x)[1]
        loss.backward()
        assert all(m.B.grad.dtype == torch.float32 for m in rso_layers(model).values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0] - 1.0, losses
    assert opt.outer_iteration() == 2


def test_merge_leaves_the_layer_function_unchanged():
    x = torch.randn(5, 10)
    eager, lazy = _layer(), _layer()
    before = eager(x).detach()
    eager.merge_()  # W += B P_0^T, B = 0, next P
    assert eager.outer == 1 and not eager.B.any()
    assert torch.allclose(eager(x), before, atol=1e-6)
    lazy.target_outer = 1  # as the optimizer marks it under ZeRO: merged at the next forward
    assert torch.allclose(lazy(x), before, atol=1e-6)
    assert lazy.outer == 1 and not lazy.B.any() and torch.equal(lazy.weight, eager.weight)
    assert not torch.equal(lazy.projection(), _layer().projection())  # P_1 != P_0


def _block(dim=64, inter=160, n_heads=4):
    cfg = LlamaConfig(vocab_size=10, dim=dim, n_layers=1, n_heads=n_heads,
                      intermediate_size=inter, max_seq_len=32)  # fmt: skip
    torch.manual_seed(0)
    return DecoderLayer(cfg), cfg


def _saved_bytes(block, cfg, x, inside: tuple[type, ...]):
    """Bytes packed for backward while inside a module of type ``inside``, excluding parameters
    and projections (not activations); and all distinct storages saved by the whole block."""
    cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    cos, sin = cos[: x.shape[1]], sin[: x.shape[1]]
    depth = [0]
    mods = [m for m in block.modules() if isinstance(m, inside)]
    for m in mods:
        m.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1))
        m.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1))
    not_act = {t.untyped_storage().data_ptr() for t in block.parameters()}
    for m in mods:
        if isinstance(m, RSOLinear):
            not_act.add(m.projection(x.dtype).untyped_storage().data_ptr())
    layer_bytes, storages = [0], {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in not_act:
            storages[ptr] = t.untyped_storage().nbytes()
            if depth[0]:
                layer_bytes[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin).sum().backward()
    return layer_bytes[0], sum(storages.values())


def test_saved_activations_of_transformed_layers_shrink_by_r_over_n():
    x = torch.randn(2, 32, 64)
    dense, cfg = _block()
    base_layers, base_total = _saved_bytes(dense, cfg, x, (nn.Linear,))
    layers = apply_rso(dense, density=0.25)
    rso_bytes, rso_total = _saved_bytes(dense, cfg, x, (RSOLinear,))
    tokens = x.shape[0] * x.shape[1]
    assert base_layers == tokens * 4 * sum(m.in_features for m in layers.values())
    assert rso_bytes == tokens * 4 * sum(m.rank for m in layers.values())
    ratio = rso_bytes / base_layers
    assert abs(ratio - 0.25) < 0.01, ratio  # r = round(0.25 n) for n = 64 and 160
    assert rso_total < base_total  # and the block as a whole saves less


def test_optimizer_state_bytes_match_the_prediction():
    model = build_model("tiny", max_seq_len=16, n_layers=1)
    opt = build_rso(model, density=0.25, lr=1e-3, inner_steps=3)
    x = torch.randint(0, 257, (2, 16))
    model(x, labels=x)[1].backward()
    opt.step()
    groups = rso_param_groups(model)
    b_elems = sum(m.out_features * m.rank for m in rso_layers(model).values())
    other = sum(p.numel() for p in groups[1]["params"])
    n_tensors = sum(len(g["params"]) for g in groups)
    assert b_elems == sum(p.numel() for p in groups[0]["params"])
    n_rso = len(groups[0]["params"])  # + the float64 scale c of W's weight decay per B
    assert opt.state_bytes() == 2 * 4 * (b_elems + other) + 3 * 4 * n_tensors + 8 * n_rso
    w_elems = sum(m.weight.numel() for m in rso_layers(model).values())
    assert abs(b_elems / w_elems - 0.25) < 0.01  # Adam state of the targeted layers: r/n of full


def _train(model, opt, start, stop):
    losses = []
    for step in range(start, stop):
        x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = model(x, labels=x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _fresh(seed_model=0, **kw):
    torch.manual_seed(seed_model)
    model = build_model("tiny", max_seq_len=16, n_layers=1)
    return model, build_rso(model, **{"lr": 1e-2, "inner_steps": 3, "density": 0.25, **kw})


@pytest.mark.parametrize("wd", [0.0, 0.1])  # weight decay: RSO layers' W decay through c
@pytest.mark.parametrize("cut", [4, 6])  # mid outer iteration 1; right after the merge at 6
def test_resume_mid_outer_iteration_is_exact(cut, wd):
    model, opt = _fresh(prox=0.05, weight_decay=wd)
    _train(model, opt, 0, cut)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    _train(model, opt, cut, 10)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = _fresh(seed_model=9, prox=0.05, lr=0.5)  # other weights; lr, wd from checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.outer_iteration() == cut // 3
    _train(model2, opt2, cut, 10)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_with_moments_kept_over_merges_is_exact():
    model, opt = _fresh(reset_statistics=False)
    _train(model, opt, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    _train(model, opt, 4, 10)  # merges after steps 6 and 9 with the moments carried over
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = _fresh(seed_model=9)  # reset_statistics comes from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    _train(model2, opt2, 4, 10)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_checkpoint_from_before_the_new_options_loads_with_the_defaults():
    model, opt = _fresh()
    _train(model, opt, 0, 2)
    sd = copy.deepcopy(opt.state_dict())  # shares no tensor with opt
    for g in sd["param_groups"]:  # a checkpoint written before the two options existed
        del g["proj_params_lr_scale"], g["reset_statistics"]
    model2, opt2 = _fresh(proj_params_lr_scale=3.0, reset_statistics=False)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    for g in opt2.param_groups:
        assert g["proj_params_lr_scale"] == 1.0 and g["reset_statistics"] is True
    assert _train(model2, opt2, 2, 5) == _train(model, opt, 2, 5)


def _one_step(model, opt, step):
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(step))
    model(x, labels=x)[1].backward()
    grads = {
        id(p): p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None
    }
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads


def test_proj_params_lr_scale_multiplies_only_the_b_step():
    """s_p = 2: B's first Adam step (lr * s_p * g / (|g| + eps)) doubles; the AdamW parameters
    (embeddings, head, norms) take the same step as with s_p = 1."""
    (m1, o1), (m2, o2) = _fresh(), _fresh(proj_params_lr_scale=2.0)
    _one_step(m1, o1, 0)
    _one_step(m2, o2, 0)
    for g1, g2 in zip(o1.param_groups, o2.param_groups):
        for p1, p2 in zip(g1["params"], g2["params"]):
            if g1["rso"]:
                assert p1.abs().max() > 0
                torch.testing.assert_close(p2, 2.0 * p1, rtol=1e-6, atol=0)
            else:
                assert torch.equal(p1, p2)


@pytest.mark.parametrize("reset", [True, False])
def test_reset_statistics_decides_whether_adam_restarts_at_a_merge(reset):
    """K = 3: step 4 is the first of outer iteration 1. B restarts from 0 either way; with
    reset_statistics=False m, v and t continue (m = b1 m + (1 - b1) g, t = 4), with True they
    restart (m = (1 - b1) g, t = 1) -- the update of the module docstring in both cases."""
    model, opt = _fresh(reset_statistics=reset)
    for step in range(3):
        _one_step(model, opt, step)
    group = next(g for g in opt.param_groups if g["rso"])
    p = group["params"][0]
    st = opt.state[p]
    m0, v0 = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    g = _one_step(model, opt, 3)[id(p)]
    (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
    if not reset:
        m, v, t = b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g, 4
    else:
        m, v, t = (1 - b1) * g, (1 - b2) * g * g, 1
    assert int(st["adam_step"].item()) == t and int(st["outer"].item()) == 1
    torch.testing.assert_close(st["exp_avg"], m)
    torch.testing.assert_close(st["exp_avg_sq"], v)
    b = -lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)  # from B = 0
    torch.testing.assert_close(p.detach(), b)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lazy_merge_from_master_copies_equals_eager(wd):
    """An engine that keeps fp32 masters (ZeRO) copies B into the module after step(); the layer
    then merges at its next forward. Same trajectory as the eager merge."""
    model, opt = _fresh(weight_decay=wd)
    eager = _train(model, opt, 0, 8)
    lazy_model, _ = _fresh(weight_decay=wd)
    groups = rso_param_groups(lazy_model)
    masters = [[p.detach().clone() for p in g["params"]] for g in groups]
    lazy_opt = RSO([{**g, "params": m} for g, m in zip(groups, masters)],
                   layers=rso_layers(lazy_model), lr=1e-2, inner_steps=3,
                   weight_decay=wd)  # fmt: skip
    lazy = []
    for step in range(8):
        x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = lazy_model(x, labels=x)[1]
        loss.backward()
        for g, ms in zip(groups, masters):
            for p, m in zip(g["params"], ms):
                m.grad = p.grad
        lazy_opt.step()
        with torch.no_grad():  # the engine's copy back
            for g, ms in zip(groups, masters):
                for p, m in zip(g["params"], ms):
                    p.copy_(m)
                    p.grad = None
        lazy.append(loss.item())
    assert lazy == pytest.approx(eager, abs=1e-6)
    assert rso_layers(lazy_model)["layers.0.mlp.up_proj"].outer == 2  # merged after 3 and 6


def test_tiny_llama_trains_through_build_optimizer():
    torch.manual_seed(0)
    model = build_model("tiny", max_seq_len=16, n_layers=1)
    opt = build_optimizer(model, "rso", lr=1e-2, inner_steps=5, rank=8, proj_type="orthonormal")
    assert all(m.rank == 8 for m in rso_layers(model).values())
    x = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(x, labels=x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert opt.outer_iteration() == 3


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"density": 1.5}, "density"),
        ({"rank": 0}, "rank"),
        ({"proj_type": "svd"}, "proj_type"),
        ({"inner_steps": 0}, "inner_steps"),
        ({"prox": -1.0}, "prox"),
        ({"proj_params_lr_scale": 0.0}, "proj_params_lr_scale"),
        ({"reset_statistics": "no"}, "reset_statistics"),
        ({"update_gap": 5}, "unknown arguments"),
        ({"targets": ["nope"]}, "no nn.Linear"),
    ],
)
def test_bad_options_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        build_rso(build_model("tiny", max_seq_len=16), **kw)


def test_apply_twice_and_deepcopy_keep_working():
    model = build_model("tiny", max_seq_len=16)
    opt = build_rso(model, inner_steps=2)
    layers = rso_layers(model)
    assert len(layers) == 14 and not layers["layers.1.mlp.down_proj"].weight.requires_grad
    clone = copy.deepcopy(model)
    x = torch.randint(0, 257, (2, 16))
    assert torch.equal(model(x)[0], clone(x)[0])
    assert isinstance(opt, RSO)
