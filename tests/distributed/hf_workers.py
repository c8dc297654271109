"""Per-rank functions for the Hugging Face LLaMA tests: a tiny ``transformers.LlamaForCausalLM``
(random init from a tiny ``LlamaConfig``, nothing downloaded), single process vs FSDP2."""

from __future__ import annotations

from typing import Any

import torch

from frugal_dist import FRUGAL, build_param_groups

GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 96


def make_hf_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=SEQ, tie_word_embeddings=False)  # fmt: skip
    cfg._attn_implementation = "eager"
    # float64 (as in fsdp_workers): gradient averages agree with the full-batch mean to ~1e-16.
    return LlamaForCausalLM(cfg).double()


def _batches(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(steps)]


def _run(model, opt, steps: int, rank: int, world: int) -> list[float]:
    import torch.distributed as dist

    losses = []
    per = GLOBAL_BATCH // world
    for batch in _batches(steps):
        local = batch[rank * per : (rank + 1) * per]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
            t /= world
        losses.append(t.item())
    return losses


def _full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}  # fmt: skip


def hf_single(steps: int, opt_kw: dict) -> dict[str, Any]:
    model = make_hf_model()
    groups = build_param_groups(model)
    opt = FRUGAL(groups, **opt_kw)
    losses = _run(model, opt, steps, 0, 1)
    return {
        "losses": losses,
        "params": _full(model),
        "groups": {g["name"]: g["names"] for g in groups},
    }


def hf_fsdp2(rank: int, world: int, steps: int, opt_kw: dict) -> dict[str, Any]:
    from frugal_dist.engines.fsdp2 import default_mesh, shard_model, transformer_blocks

    model = make_hf_model()
    n_blocks = len(transformer_blocks(model))
    shard_model(model, mesh=default_mesh())
    opt = FRUGAL(build_param_groups(model), **opt_kw)
    losses = _run(model, opt, steps, rank, world)
    return {"losses": losses, "params": _full(model), "n_blocks": n_blocks}
