"""Train with FRUGAL through Hugging Face ``transformers.Trainer`` (see docs/hf_trainer.md).

Two ways, both using FRUGAL's param-group rules on the model's own (HF) parameter names --
``model.embed_tokens`` / ``lm_head`` / norms / biases keep AdamW state, the attention and MLP
matrices are split:

1. An optimizer object (no DeepSpeed / FSDP)::

       opt = create_frugal_optimizer(model, lr=1e-3, density=0.25, update_gap=200)
       sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
       Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched)).train()

2. ``FrugalTrainer`` -- a ``Trainer`` whose ``create_optimizer`` builds FRUGAL from
   ``frugal_options``, so the Trainer's own scheduler and ``deepspeed=`` / FSDP paths apply::

       FrugalTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_zero2.json"),
                     train_dataset=ds, frugal_options=dict(lr=1e-3, density=0.25)).train()

   Under DeepSpeed (a config *without* an ``"optimizer"`` section, with
   ``"zero_allow_untested_optimizer": true``) the Trainer hands FRUGAL to ``deepspeed.initialize``
   as a client optimizer; at ``on_train_begin`` ``FrugalTrainer`` binds it to the ZeRO layout
   (``frugal_dist.engines.deepspeed.bind``) so FRUGAL sees each parameter's flat fragment.

``FrugalTrainer`` takes ``lr``, ``weight_decay``, ``betas`` and ``eps`` from the
``TrainingArguments`` (``learning_rate``, ``weight_decay``, ``adam_beta1/2``, ``adam_epsilon``)
unless ``frugal_options`` gives them; as in ``Trainer``, norms and biases (the ``no_decay``
group) get no weight decay. ``create_frugal_optimizer`` takes them as keyword options. Trainer's
gradient clipping (``max_grad_norm``) applies as usual; FRUGAL sees the clipped, averaged
gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from frugal_dist.optim import FRUGAL, build_param_groups, check_param_coverage, pop_group_options


def create_frugal_optimizer(
    model: nn.Module,
    *,
    rules: Sequence[tuple[str, Mapping[str, Any]]] = (),
    **options: Any,
) -> FRUGAL:
    """FRUGAL over ``model``'s trainable parameters with the paper's param-group rules (plus
    user ``rules``: ``(regex on the HF name, group options)``, first match wins)."""
    groups = build_param_groups(model, rules=rules, **pop_group_options(options))
    check_param_coverage(model, groups)
    return FRUGAL(groups, **options)


def trainer_options(args: Any) -> dict[str, Any]:
    """FRUGAL's AdamW-style options from ``transformers.TrainingArguments``."""
    return {"lr": args.learning_rate, "weight_decay": args.weight_decay,
            "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}  # fmt: skip


def _bind_to_deepspeed(trainer: Any) -> None:
    """Once the Trainer has built its DeepSpeed engine, bind FRUGAL to the engine's layout."""
    engine = getattr(trainer, "deepspeed", None)
    frugal = _find_frugal(trainer.optimizer)
    if engine is not None and frugal is not None and frugal.layout is None:
        from frugal_dist.engines.deepspeed import bind

        bind(engine, frugal)


def _find_frugal(opt: Any) -> FRUGAL | None:
    """The FRUGAL inside the Trainer's / accelerate's / DeepSpeed's optimizer wrappers."""
    for _ in range(4):
        if isinstance(opt, FRUGAL):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def _make_trainer_class() -> type:
    from transformers import Trainer, TrainerCallback

    class _BindCallback(TrainerCallback):
        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _bind_to_deepspeed(self.trainer)

    class FrugalTrainer(Trainer):
        """``transformers.Trainer`` that builds FRUGAL (see module doc)."""

        def __init__(self, *args: Any, frugal_options: Mapping[str, Any] | None = None,
                     frugal_rules: Sequence[tuple[str, Mapping[str, Any]]] = (),
                     **kwargs: Any) -> None:  # fmt: skip
            self.frugal_options = dict(frugal_options or {})
            self.frugal_rules = list(frugal_rules)
            super().__init__(*args, **kwargs)
            self.add_callback(_BindCallback(self))

        def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
            if self.optimizer is None:
                options = {**trainer_options(self.args), **self.frugal_options}
                self.optimizer = create_frugal_optimizer(
                    self.model, rules=self.frugal_rules, **options
                )
            return self.optimizer

    return FrugalTrainer


def __getattr__(name: str) -> Any:  # ``FrugalTrainer`` is built on first use (transformers import)
    if name == "FrugalTrainer":
        cls = _make_trainer_class()
        globals()["FrugalTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
