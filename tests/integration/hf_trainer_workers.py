"""Helpers for the Hugging Face Trainer tests: a tiny random LlamaForCausalLM and a small fixed
dataset it can learn (nothing downloaded)."""

from __future__ import annotations

from typing import Any

import torch

VOCAB, SEQ = 64, 32


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=SEQ, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


class Repeating(torch.utils.data.Dataset):
    """16 sequences of short repeating patterns: a few steps visibly lower the loss."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(16):
            period = int(torch.randint(2, 6, (1,), generator=gen))
            pattern = torch.randint(0, VOCAB, (period,), generator=gen)
            rows.append(pattern.repeat(SEQ // period + 1)[:SEQ])
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def args(out: str, steps: int, **extra: Any):
    from transformers import TrainingArguments

    kw = dict(output_dir=out, per_device_train_batch_size=4, max_steps=steps,
              learning_rate=3e-3, warmup_steps=2, lr_scheduler_type="cosine", logging_steps=1,
              report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
              disable_tqdm=True)  # fmt: skip
    return TrainingArguments(**{**kw, **extra})


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def optimizer_state_bytes(opt) -> int:
    while not hasattr(opt, "state") or not isinstance(getattr(opt, "state", None), dict):
        opt = opt.optimizer
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))  # fmt: skip


def deepspeed_zero2(rank: int, world: int, out: str, steps: int) -> dict[str, Any]:
    """FrugalTrainer with ``deepspeed=`` (ZeRO-2, fp32, CPU / gloo) in one process."""
    from frugal_dist.integrations.hf_trainer import FrugalTrainer, _find_frugal

    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
          "zero_allow_untested_optimizer": True,
          "zero_force_ds_cpu_optimizer": False}  # fmt: skip
    trainer = FrugalTrainer(model=tiny_llama(), args=args(out, steps, deepspeed=ds),
                            train_dataset=Repeating(),
                            frugal_options=dict(density=0.25, update_gap=5))  # fmt: skip
    trainer.train()
    frugal = _find_frugal(trainer.optimizer)
    return {"losses": losses(trainer), "layout": getattr(frugal.layout, "name", None),
            "state_bytes": frugal.state_bytes()}  # fmt: skip


# refresh_policy="loss" with T0 = 2 and tau = 1: the gain of a positive loss is below 1, so T
# doubles at every decision (refreshes at 0, 2, 4, 8 in 12 steps) whatever the loss's last bits.
LOSS_DRIVEN = dict(subspace="coordinate", density=0.25, update_gap=2, refresh_policy="loss",
                   update_gap_max=8, refresh_threshold=1.0)  # fmt: skip


def loss_driven(rank: int, world: int, out: str, steps: int, accum: int) -> dict[str, Any]:
    """FrugalTrainer with ``refresh_policy="loss"`` and ``accum`` gradient-accumulation steps
    on ``world`` processes (each its own slice of the data): the values FRUGAL observed, the
    logged losses, this rank's own step losses and each split matrix's schedule state."""
    from frugal_dist import FRUGAL
    from frugal_dist.integrations.hf_trainer import FrugalTrainer, _find_frugal

    observed: list[float] = []
    original = FRUGAL.observe_loss

    def spy(self: FRUGAL, loss: Any) -> None:
        observed.append(float(loss))
        original(self, loss)

    FRUGAL.observe_loss = spy  # type: ignore[method-assign]
    try:
        trainer = FrugalTrainer(model=tiny_llama(), train_dataset=Repeating(),
                                args=args(out, steps, per_device_train_batch_size=4 // world,
                                          gradient_accumulation_steps=accum),
                                frugal_options=LOSS_DRIVEN)  # fmt: skip
        take, local = trainer.take_step_loss, []

        def take_and_record() -> Any:  # this rank's own step losses, before the average
            value = take()
            local.append(float(value))
            return value

        trainer.take_step_loss = take_and_record
        trainer.train()
    finally:
        FRUGAL.observe_loss = original  # type: ignore[method-assign]
    frugal = _find_frugal(trainer.optimizer)
    split = next(g for g in frugal.param_groups if g["name"] == "split")
    schedule = {name: (int(frugal.state[p]["refresh_k"]), int(frugal.state[p]["refresh_gap"]))
                for p, name in zip(split["params"], split["names"])}  # fmt: skip
    return {"observed": observed, "losses": losses(trainer), "schedule": schedule,
            "local": local, "processes": trainer.accelerator.num_processes}  # fmt: skip
