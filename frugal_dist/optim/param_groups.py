"""Param-group rules: which parameters are split by FRUGAL and which keep full AdamW state.

Every trainable parameter lands in exactly one group. Defaults (the paper's): 2-D+ weights of
linear/conv layers are split (``algorithm="frugal"``); embeddings, the LM head ("logits"), norms and
biases keep state-full AdamW. User ``rules`` -- ``(regex, options)`` pairs matched against the
parameter's name, first match wins -- come before the defaults (torchtitan-style).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

# Wrapper modules whose names must not leak into parameter names: subspaces are seeded by name, so
# the same model must have the same names under every engine.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``name`` without FSDP1 / activation-checkpointing / torch.compile wrapper components."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


HEAD_NAME = re.compile(r"(^|\.)(lm_head|output|logits|head|classifier)(\.weight|\.bias)?$")


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """Role of every trainable parameter: split | embedding | head | norm | bias."""
    roles: dict[str, str] = {}
    owner: dict[int, nn.Module] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = owner.get(id(p))
        if isinstance(module, nn.Embedding):
            roles[name] = "embedding"
        elif HEAD_NAME.search(name):
            roles[name] = "head"
        elif module is not None and "norm" in type(module).__name__.lower():
            roles[name] = "norm"
        elif len(logical_shape(p)) < 2:
            roles[name] = "bias"
        else:
            roles[name] = "split"
    return roles


def build_param_groups(
    model: nn.Module,
    *,
    weight_decay: float | None = None,
    rules: Sequence[tuple[str, Mapping[str, Any]]] = (),
    split_options: Mapping[str, Any] | None = None,
    state_full_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Named param groups for ``FRUGAL`` (each group has ``params``, ``names`` and ``name``).

    Groups, in this order, empty ones left out: one per user rule; ``split`` (frugal);
    ``state_full`` (AdamW: embeddings, LM head); ``no_decay`` (AdamW, weight_decay 0: norms,
    biases). Groups that do not set an option inherit it from the optimizer's arguments.
    """
    compiled = [(re.compile(pattern), dict(opts)) for pattern, opts in rules]
    roles = classify_parameters(model)
    buckets: dict[str, dict[str, Any]] = {}

    def bucket(key: str, opts: Mapping[str, Any]) -> dict[str, Any]:
        if key not in buckets:
            buckets[key] = {"name": key, "params": [], "names": [], **opts}
        return buckets[key]

    for i, (pattern, opts) in enumerate(compiled):
        bucket(f"rule{i}:{pattern.pattern}", opts)
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    bucket("split", {"algorithm": "frugal", **wd, **(split_options or {})})
    bucket("state_full", {"algorithm": "adamw", **wd, **(state_full_options or {})})
    bucket("no_decay", {"algorithm": "adamw", **(state_full_options or {}), "weight_decay": 0.0})

    for raw, p in model.named_parameters():
        name = clean_name(raw)
        if not p.requires_grad:
            continue
        target = None
        for i, (pattern, _) in enumerate(compiled):
            if pattern.search(name):
                target = buckets[f"rule{i}:{pattern.pattern}"]
                break
        if target is None:
            role = roles[raw]
            key = {"split": "split", "embedding": "state_full", "head": "state_full"}.get(
                role, "no_decay"
            )
            target = buckets[key]
        target["params"].append(p)
        target["names"].append(name)
    return [g for g in buckets.values() if g["params"]]


def check_param_coverage(model: nn.Module, param_groups: Iterable[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` naming each trainable parameter not in exactly one group."""
    seen: dict[int, int] = {}
    for group in param_groups:
        for p in group["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    twice = [n for n, p in model.named_parameters() if seen.get(id(p), 0) > 1]
    if missing:
        raise ValueError(
            f"trainable parameters in no optimizer group: {missing}. Add them to a group or set "
            "requires_grad=False."
        )
    if twice:
        raise ValueError(f"parameters in more than one optimizer group: {twice}")


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape, also under ``deepspeed.zero.Init`` (data of shape (0,)) and
    FSDP1 (1-D shards; the adapter records the shape in ``_frugal_shape``)."""
    return tuple(getattr(p, "_frugal_shape", None) or getattr(p, "ds_shape", p.shape))
