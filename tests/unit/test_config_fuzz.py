"""Property tests of configuration validation (hypothesis, derandomized: the same examples on
every run, so CI is deterministic).

* FRUGAL keyword configurations: every valid one builds the optimizer and trains a tiny LLaMA
  for a few steps (crossing a subspace refresh) with finite parameters; every invalid one (one
  field broken: out of range, unknown choice, wrong type, unknown key) raises ``ValueError`` /
  ``TypeError`` naming that field.
* ``TrainConfig`` dicts: the same for ``build_config`` (and valid optimizer sections also build
  and step).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugal_dist import FRUGAL, build_param_groups
from frugal_dist.core.rules import STATE_FREE_RULES, STATE_FULL_RULES
from frugal_dist.core.subspaces import (
    BLOCK_ORDERS,
    COORD_CHOICES,
    PROJ_SIDES,
    PROJ_TYPES,
    block_count,
)
from frugal_dist.optim.free_scale import FREE_SCALES
from frugal_dist.optim.group_setup import FRUGAL_DEFAULTS
from frugal_dist.optim.moment_transfer import MOMENT_TRANSFERS
from frugal_dist.optim.validation import SUBSPACES
from frugal_dist.train.config import DTYPES, ENGINES, FIELDS, build_config
from frugal_dist.train.config_validation import frugal_keywords
from frugal_dist.train.model import LlamaConfig, build_model
from frugal_dist.train.optimizers import PRESETS, build_optimizer

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=_HEALTH)  # fmt: skip
FUZZ_STEPS = settings(FUZZ, max_examples=25)  # examples that build an optimizer and step it
MICRO = LlamaConfig(vocab_size=19, dim=8, n_layers=1, n_heads=2, intermediate_size=12,
                    max_seq_len=8)  # fmt: skip
NAN, INF = float("nan"), float("inf")
MICRO_SPLIT = sum(len(g["params"]) for g in build_param_groups(build_model(MICRO))
                  if g.get("algorithm", "frugal") == "frugal")  # fmt: skip

# ----------------------------------------------------------------------------- FRUGAL options
VALID_FRUGAL: dict[str, st.SearchStrategy] = {
    "lr": st.floats(0.0, 0.05),
    "density": st.floats(0.0, 1.0),
    "update_gap": st.integers(1, 3),
    "subspace": st.sampled_from(SUBSPACES),
    "block_order": st.sampled_from(BLOCK_ORDERS),
    "coord_choice": st.sampled_from(COORD_CHOICES),
    "proj_type": st.sampled_from(PROJ_TYPES),
    "proj_side": st.sampled_from(PROJ_SIDES),
    "state_full": st.sampled_from(STATE_FULL_RULES),
    "state_free": st.sampled_from(STATE_FREE_RULES),
    "inactive_lr_scale": st.floats(0.0, 2.0),
    "proj_params_lr_scale": st.floats(0.0, 2.0),
    "reset_statistics": st.booleans(),
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.999)),
    "eps": st.floats(1e-12, 1e-3),
    "weight_decay": st.floats(0.0, 0.1),
    "seed": st.integers(0, 2**62),
}
_NOT_NUMBER = st.sampled_from(["0.1", None, [0.1], True])
_NOT_INT = st.sampled_from([1.5, "2", None, True, 2.0])
_NOT_CHOICE = st.one_of(st.text(max_size=8), st.sampled_from([None, 1, ["block"]]))
INVALID_FRUGAL: dict[str, st.SearchStrategy] = {
    "lr": st.one_of(st.floats(max_value=-1e-9), st.sampled_from([NAN, INF]), _NOT_NUMBER),
    "density": st.one_of(
        st.floats(min_value=1.0 + 1e-9), st.floats(max_value=-1e-9), st.just(NAN), _NOT_NUMBER
    ),  # fmt: skip
    "update_gap": st.one_of(st.integers(max_value=0), _NOT_INT),
    "subspace": _NOT_CHOICE.filter(lambda v: v not in SUBSPACES),
    "block_order": _NOT_CHOICE.filter(lambda v: v not in BLOCK_ORDERS),
    "coord_choice": _NOT_CHOICE.filter(lambda v: v not in COORD_CHOICES),
    "proj_type": _NOT_CHOICE.filter(lambda v: v not in PROJ_TYPES),
    "proj_side": _NOT_CHOICE.filter(lambda v: v not in PROJ_SIDES),
    "state_full": _NOT_CHOICE.filter(lambda v: v not in STATE_FULL_RULES),
    "state_free": _NOT_CHOICE.filter(lambda v: v not in STATE_FREE_RULES),
    "inactive_lr_scale": st.one_of(st.floats(max_value=-1e-9), st.just(INF), _NOT_NUMBER),
    "reset_statistics": st.sampled_from([1, 0, "yes", None]),
    "betas": st.one_of(
        st.tuples(st.floats(min_value=1.0), st.floats(0.0, 0.9)),
        st.tuples(st.floats(0.0, 0.9), st.floats(max_value=-1e-9)),
        st.sampled_from([(0.9,), (0.9, 0.99, 0.999), "0.9", (NAN, 0.9), (0.9, None), 0.9]),
    ),
    "eps": st.one_of(st.floats(max_value=0.0), st.sampled_from([NAN, INF]), _NOT_NUMBER),
    "weight_decay": st.one_of(st.floats(max_value=-1e-9), st.sampled_from([NAN, INF])),
    "seed": st.sampled_from([1.5, "0", True, [0]]),
    "moment_transfer": _NOT_CHOICE.filter(lambda v: v not in MOMENT_TRANSFERS),
    "free_scale": _NOT_CHOICE.filter(lambda v: v not in FREE_SCALES),
}
UNKNOWN_KEYS = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
    lambda k: k not in VALID_FRUGAL and k not in frugal_keywords() and k not in FIELDS
)


def _gradnorm_ok(opts: dict[str, Any], subspace: str = "block") -> bool:
    """block_order="gradnorm" is refused outside subspace="block" (``subspace``: the default)."""
    return opts.get("block_order") != "gradnorm" or opts.get("subspace", subspace) == "block"


def _swan_ok(opts: dict[str, Any], subspace: str = "block") -> bool:
    """state_free="swan" is refused with subspace="coordinate" (``optim.matrix_free``)."""
    return opts.get("state_free") != "swan" or opts.get("subspace", subspace) != "coordinate"


def _mirror_ok(opts: dict[str, Any]) -> bool:
    """block_order="mirror" needs an even active count round(density x tensors) over the micro
    model's split tensors (refused when the group is added, naming block_order)."""
    if opts.get("block_order") != "mirror" or opts.get("subspace", "block") != "block":
        return True
    return block_count(MICRO_SPLIT, opts.get("density", FRUGAL_DEFAULTS["density"])) % 2 == 0


def valid_frugal() -> st.SearchStrategy[dict[str, Any]]:
    return (
        st.fixed_dictionaries({}, optional=VALID_FRUGAL)
        .filter(_gradnorm_ok)
        .filter(_mirror_ok)
        .filter(_swan_ok)
    )


def _micro_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MICRO)


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """``steps`` optimizer steps (crossing a refresh when update_gap <= 2) on gradients of
    one real forward/backward, then synthetic ones with exact zeros (as unused embedding rows
    have) and one huge entry per tensor."""
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, MICRO.vocab_size, (2, 8), generator=gen)
    _, loss = model(batch, labels=batch)
    loss.backward()
    opt.step()
    for _ in range(steps - 1):
        for p in model.parameters():
            g = torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) > 0.3)
            g.view(-1)[0] = 1e4
            p.grad = g
        opt.step()
    opt.zero_grad(set_to_none=True)


def _assert_finite(model: torch.nn.Module, what: Any) -> None:
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite after steps with {what!r}"


@FUZZ_STEPS
@given(valid_frugal())
def test_valid_frugal_options_build_and_step(opts):
    model = _micro_model()
    opt = FRUGAL(build_param_groups(model), **opts)
    _train_steps(model, opt)
    _assert_finite(model, opts)
    assert all(isinstance(v, torch.Tensor) for st_ in opt.state.values() for v in st_.values())


@FUZZ
@given(valid_frugal(), st.data())
def test_invalid_frugal_option_names_the_field(opts, data):
    key = data.draw(st.sampled_from(sorted(INVALID_FRUGAL)), label="field")
    bad = data.draw(INVALID_FRUGAL[key], label="value")
    with pytest.raises((ValueError, TypeError)) as info:
        FRUGAL(build_param_groups(_micro_model()), **{**opts, key: bad})
    assert key in str(info.value), (key, bad, str(info.value))


@FUZZ
@given(valid_frugal(), UNKNOWN_KEYS)
def test_unknown_frugal_option_is_refused(opts, key):
    with pytest.raises(ValueError, match=f"unknown option '{key}'"):
        FRUGAL(build_param_groups(_micro_model()), **{**opts, key: 1})


@FUZZ
@given(valid_frugal(), st.data())
def test_invalid_option_in_a_param_group_names_the_field(opts, data):
    key = data.draw(st.sampled_from(sorted(INVALID_FRUGAL)), label="field")
    bad = data.draw(INVALID_FRUGAL[key], label="value")
    groups = build_param_groups(_micro_model())
    groups[0][key] = bad
    with pytest.raises((ValueError, TypeError)) as info:
        FRUGAL(groups, **opts)
    assert key in str(info.value) and "param group 0" in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- TrainConfig
def _section_ok(section: dict[str, Any]) -> bool:
    """The cross-field rules above, with the subspace of the section's preset as default."""
    subspace = PRESETS.get(section["name"], {}).get("subspace", "block")
    return _gradnorm_ok(section, subspace) and _swan_ok(section, subspace)


def _optimizer_section() -> st.SearchStrategy[dict[str, Any]]:
    frugal = st.builds(
        lambda name, o: {"name": name, **o},
        st.sampled_from(["frugal", "galore", "badam", "signsgd"]),
        valid_frugal(),
    ).filter(_section_ok)
    adamw = st.fixed_dictionaries(
        {"name": st.just("adamw")},
        optional={k: VALID_FRUGAL[k] for k in ("lr", "betas", "eps", "weight_decay")},
    )  # fmt: skip
    return st.one_of(frugal, adamw)


VALID_TRAIN: dict[str, st.SearchStrategy] = {
    "model": st.just("tiny"),
    "seq_len": st.integers(1, 512),
    "batch_size": st.integers(1, 64),
    "grad_accum": st.integers(1, 8),
    "max_steps": st.integers(1, 10**6),
    "warmup_steps": st.integers(0, 1000),
    "min_lr_ratio": st.floats(0.0, 1.0),
    "grad_clip": st.floats(0.0, 10.0),
    "eval_every": st.integers(0, 1000),
    "eval_batches": st.integers(1, 16),
    "log_every": st.integers(1, 1000),
    "seed": st.integers(0, 2**63 - 1),
    "engine": st.sampled_from([e for e in ENGINES if e != "deepspeed"]),  # that needs a JSON
    "dtype": st.sampled_from(DTYPES),
    "collective_timeout_s": st.one_of(st.floats(1e-3, 1e5), st.integers(1, 10**5)),
    "output_dir": st.one_of(st.none(), st.just("runs/x")),
    "data": st.fixed_dictionaries({}, optional={"max_bytes": st.integers(1, 10**7)}),
    "optimizer": _optimizer_section(),
}
_BAD_POS_INT = st.one_of(st.integers(max_value=0), _NOT_INT)
_BAD_NONNEG_INT = st.one_of(st.integers(max_value=-1), _NOT_INT)
INVALID_TRAIN: dict[str, tuple[str, st.SearchStrategy]] = {  # key -> (name in message, values)
    **{k: (k, _BAD_POS_INT) for k in ("seq_len", "batch_size", "grad_accum", "max_steps",
                                      "eval_batches", "log_every")},  # fmt: skip
    **{k: (k, _BAD_NONNEG_INT) for k in ("warmup_steps", "eval_every")},
    "model": ("model", st.sampled_from(["giant", "", None, 7, "TINY"])),
    "min_lr_ratio": ("min_lr_ratio", st.one_of(st.floats(min_value=1.0 + 1e-9),
                     st.floats(max_value=-1e-9), st.sampled_from([NAN, "0.1", None, True]))),
    "grad_clip": ("grad_clip", st.one_of(st.floats(max_value=-1e-9),
                  st.sampled_from([NAN, INF, "1", None]))),  # fmt: skip
    "seed": ("seed", st.sampled_from([-1, 2**63, 1.5, "0", True, None])),
    "engine": ("engine", _NOT_CHOICE.filter(lambda v: v not in ENGINES)),
    "dtype": ("dtype", st.sampled_from(["float16", "fp32", None, 32])),
    "collective_timeout_s": ("collective_timeout_s", st.one_of(
        st.floats(max_value=0.0), st.sampled_from([NAN, INF, "600", True, None]))),
    "output_dir": ("output_dir", st.sampled_from([1, ["runs"], True])),
    "deepspeed_config": ("deepspeed_config", st.sampled_from([1, {"zero": 2}, False])),
    "optimizer": ("optimizer", st.sampled_from([5, "frugal", [1], True])),
    "data": ("data", st.sampled_from([5, "embedded", [1]])),
}  # fmt: skip


def valid_train() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=VALID_TRAIN).filter(
        lambda r: r.get("warmup_steps", 20) <= r.get("max_steps", 200)  # a longer warm-up: refused
    )


@FUZZ_STEPS
@given(valid_train())
def test_valid_train_config_builds_and_its_optimizer_steps(raw):
    cfg = build_config(raw)
    for key, value in raw.items():
        if key not in ("optimizer", "data"):
            assert getattr(cfg, key) == value or (isinstance(value, float) and math.isnan(value))
    opts = dict(cfg.optimizer)
    name = opts.pop("name")
    model = _micro_model()
    opt = build_optimizer(model, name, **opts)
    _train_steps(model, opt, steps=2)
    _assert_finite(model, cfg.optimizer)


@FUZZ
@given(valid_train(), st.data())
def test_invalid_train_config_field_names_the_field(raw, data):
    key = data.draw(st.sampled_from(sorted(INVALID_TRAIN)), label="field")
    name, values = INVALID_TRAIN[key]
    bad = data.draw(values, label="value")
    with pytest.raises((ValueError, TypeError)) as info:
        build_config({**raw, key: bad})
    assert name in str(info.value), (key, bad, str(info.value))


@FUZZ
@given(valid_train(), st.data())
def test_invalid_optimizer_option_in_train_config_names_the_field(raw, data):
    key = data.draw(st.sampled_from(sorted(INVALID_FRUGAL)), label="field")
    bad = data.draw(INVALID_FRUGAL[key], label="value")
    section = {"name": data.draw(st.sampled_from(["frugal", "galore", "badam"])), key: bad}
    with pytest.raises((ValueError, TypeError)) as info:
        build_config({**raw, "optimizer": section})
    assert key in str(info.value) and "optimizer" in str(info.value), str(info.value)


@FUZZ
@given(valid_train(), UNKNOWN_KEYS, st.booleans())
def test_unknown_keys_are_refused_with_the_key(raw, key, in_optimizer):
    if in_optimizer:
        raw = {**raw, "optimizer": {"name": "frugal", key: 1}}
    else:
        raw = {**raw, key: 1}
    with pytest.raises(ValueError, match=f"unknown (config key|option) '{key}'"):
        build_config(raw)


def test_invalid_optimizer_name_data_bytes_and_adamw_option_name_the_field():
    with pytest.raises(ValueError, match="optimizer.name must be one of"):
        build_config({"optimizer": {"name": "adamx"}})
    with pytest.raises(ValueError, match="max_bytes"):
        build_config({"data": {"max_bytes": 0}})
    with pytest.raises(ValueError, match="optimizer 'adamw'|unknown option 'density'"):
        build_config({"optimizer": {"name": "adamw", "density": 0.5}})
