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

``refresh_policy="loss"`` (``optim.refresh_schedule``): ``FrugalTrainer`` reports the loss of
every optimizer step with ``FRUGAL.observe_loss`` after the step (at ``on_step_end``) -- the
sum of ``training_step``'s losses over the step's gradient-accumulation micro-batches (each
already divided as Trainer divides it, so their sum is the step's mean loss, the value Trainer
logs), averaged over the processes with ``accelerator.gather`` (an all-gather of 4 B per step,
only with a loss-driven group; every rank then computes the same mean from the same vector).
This also holds for an optimizer passed with ``optimizers=``; a plain ``Trainer`` never reports
the loss (FRUGAL raises ``ValueError`` at the first refresh due).

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

import torch
from torch import nn

from frugal_dist.optim import FRUGAL, build_param_groups, check_param_coverage, pop_group_options
from frugal_dist.optim.refresh_schedule import follows_loss


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


def _observe_step_loss(trainer: Any, step_loss: torch.Tensor | None) -> None:
    """After an optimizer step: the step's loss on this rank (``step_loss``, the sum over its
    micro-batches), averaged over the processes, to FRUGAL's ``observe_loss`` -- only when a
    group follows the loss (the gather is a collective: every rank takes this branch alike)."""
    frugal = _find_frugal(trainer.optimizer)
    if step_loss is None or frugal is None:
        return
    if not any(follows_loss(g) for g in frugal.param_groups):
        return
    gathered = trainer.accelerator.gather(step_loss.detach().float().reshape(1))
    frugal.observe_loss(gathered.mean().item())


def _make_trainer_class() -> type:
    from transformers import Trainer, TrainerCallback

    class _FrugalCallback(TrainerCallback):
        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _bind_to_deepspeed(self.trainer)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _observe_step_loss(self.trainer, self.trainer.take_step_loss())

    class FrugalTrainer(Trainer):
        """``transformers.Trainer`` that builds FRUGAL (see module doc)."""

        def __init__(self, *args: Any, frugal_options: Mapping[str, Any] | None = None,
                     frugal_rules: Sequence[tuple[str, Mapping[str, Any]]] = (),
                     **kwargs: Any) -> None:  # fmt: skip
            self.frugal_options = dict(frugal_options or {})
            self.frugal_rules = list(frugal_rules)
            self._step_loss: torch.Tensor | None = None
            super().__init__(*args, **kwargs)
            self.add_callback(_FrugalCallback(self))

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            """``Trainer.training_step``; its loss (this micro-batch's share of the step's
            loss) is added up for ``refresh_policy="loss"`` (module doc)."""
            loss = super().training_step(*args, **kwargs)
            step = loss.detach()
            self._step_loss = step if self._step_loss is None else self._step_loss + step
            return loss

        def take_step_loss(self) -> torch.Tensor | None:
            """The loss added up since the last call (this rank's, over the micro-batches of
            the optimizer step just taken), and restart the sum."""
            out, self._step_loss = self._step_loss, None
            return out

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
