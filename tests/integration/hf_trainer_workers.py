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

    return TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=3e-3, warmup_steps=2, lr_scheduler_type="cosine",
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True,
                             **extra)  # fmt: skip


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
