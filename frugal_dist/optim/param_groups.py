"""Param-group rules: which parameters are split by FRUGAL and which are state-full whole.

Every trainable parameter lands in exactly one group. Defaults (the paper's and upstream's): 2-D+
weights of linear/conv layers are split (``algorithm="frugal"``); embeddings, the output heads --
the LM head ("logits") and classification heads, nested ones included (RoBERTa's
``classifier.dense`` / ``classifier.out_proj``, ``score``, ``pooler``) -- norms and biases are
state-full on the whole tensor. Their rule is the optimizer's ``state_full`` rule
(``algorithm="state_full"``: AdamW, SGDM or Lion, as upstream), or AdamW whatever the split rule
with ``non_split="adamw"``. User ``rules`` -- ``(regex, options)`` pairs matched against the
parameter's name, first match wins -- come before the defaults (torchtitan-style).

GPT-2's ``transformers.pytorch_utils.Conv1D`` stores its weight as (in, out), the transpose of
``nn.Linear``'s, so "columns" / "rows" and "left" / "right" would select the other dimension than
for a Linear. Such weights are marked (``IN_OUT_ATTR``) and ``FRUGAL`` refuses, naming the
parameter, the orientation-dependent choices for them (``coord_choice`` columns / rows,
``proj_side`` left / right); block, randk and ``proj_side="auto"`` do not depend on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from frugal_dist.optim.engine_hooks import logical_shape, name_prefixes

# Wrapper modules whose names must not leak into parameter names: subspaces are seeded by name, so
# the same model must have the same names under every engine. torch's own wrappers here; the
# engines' (FSDP1) through ``engine_hooks.register_name_prefix``.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``name`` without activation-checkpointing / torch.compile / engine wrapper components."""
    for prefix in WRAPPER_PREFIXES + name_prefixes():
        name = name.replace(prefix, "")
    return name


# The output layer itself, or any parameter under a head module (nested heads: RoBERTa's
# ``classifier.dense`` and ``classifier.out_proj``, BERT's ``pooler.dense``, HF's ``score``).
# ``output`` only as the last module (torchtitan's LM head), never ``...output.dense`` (BERT FFN).
HEAD_NAME = re.compile(
    r"(^|\.)(lm_head|logits|head|classifier|score|pooler)(\.|$)|(^|\.)output(\.weight|\.bias)?$"
)
NON_SPLIT = ("state_full", "adamw")
IN_OUT_ATTR = "_frugal_in_out"  # set on (in, out)-stored Conv1D weights by build_param_groups


def _stores_in_out(module: nn.Module | None) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out))."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


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
        elif module is not None and "norm" in type(module).__name__.lower():
            roles[name] = "norm"  # also a norm inside a head: no weight decay
        elif HEAD_NAME.search(clean_name(name)):
            roles[name] = "head"
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
    non_split: str = "state_full",
) -> list[dict[str, Any]]:
    """Named param groups for ``FRUGAL`` (each group has ``params``, ``names`` and ``name``).

    Groups, in this order, empty ones left out: one per user rule; ``split`` (frugal);
    ``state_full`` (embeddings, heads); ``no_decay`` (weight_decay 0: norms, biases). The last two
    run ``algorithm=non_split``: ``"state_full"`` (default, upstream's behaviour) = the
    optimizer's ``state_full`` rule (AdamW, SGDM or Lion) on the whole tensor; ``"adamw"`` = AdamW
    whatever that rule is. Groups that do not set an option inherit it from the optimizer's
    arguments. Conv1D weights stored (in, out) are marked with ``IN_OUT_ATTR`` (module doc).
    """
    if non_split not in NON_SPLIT:
        raise ValueError(
            f"non_split must be one of {list(NON_SPLIT)} (the rule of the embeddings, heads, norms "
            f"and biases: the optimizer's state_full rule, or AdamW), got {non_split!r}"
        )
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
    bucket("state_full", {"algorithm": non_split, **wd, **(state_full_options or {})})
    bucket("no_decay", {"algorithm": non_split, **(state_full_options or {}), "weight_decay": 0.0})
    for module in model.modules():
        if _stores_in_out(module) and getattr(module, "weight", None) is not None:
            setattr(module.weight, IN_OUT_ATTR, True)

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


def pop_group_options(options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the ``build_param_groups`` keywords (``non_split``) found in a dict of
    optimizer options (a config section), so the rest can go to ``FRUGAL(...)``."""
    return {key: options.pop(key) for key in ("non_split",) if key in options}


ORIENTATION_FIX = (
    "Use coord_choice='randk', proj_side='auto' or subspace='block' for it, or put "
    "it in its own group (build_param_groups rules) with the transposed choice"
)


def refuse_in_out(group: Mapping[str, Any], where: str, choice: str,
                  fix: str = ORIENTATION_FIX) -> None:  # fmt: skip
    """Refuse ``choice`` (an orientation-dependent option, e.g. ``coord_choice='columns'`` or
    ``state_free='swan'``) for the group's weights stored (in, out) (see module doc), with
    ``fix`` as the way out. The subspace kinds say which of their choices depend on the
    orientation (``SubspaceKind.check_group``)."""
    for name, p in zip(group["names"], group["params"]):
        if getattr(p, IN_OUT_ATTR, False):
            raise ValueError(
                f"{choice} (in {where}) depends on nn.Linear's (out, in) orientation, but "
                f"{name!r} is a Conv1D weight stored (in, out), the transpose, so it would act "
                f"on the other dimension. {fix}"
            )


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
