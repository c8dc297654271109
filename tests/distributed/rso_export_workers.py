"""Per-rank function for ``test_rso_export``: a tiny Hugging Face LLaMA trained with RSO under
DDP, saved with ``save_pretrained`` on rank 0 and loaded back as a plain ``LlamaForCausalLM``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests.integration.hf_trainer_workers import SEQ, VOCAB, tiny_llama

STEPS, INNER = 5, 3  # one merge (after step 3), then a B that is not zero


def ddp_train_and_export(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaForCausalLM

    from frugal_dist.optim.rso import build_rso

    model = tiny_llama()
    opt = build_rso(model, density=0.25, inner_steps=INNER, lr=1e-2, seed=0)
    ddp = DDP(model)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        batch = torch.randint(0, VOCAB, (2 * world, SEQ), generator=gen)[2 * rank : 2 * rank + 2]
        ddp(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    probe = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    b_norm = max(m.B.abs().max().item() for n, m in model.named_modules() if hasattr(m, "B"))
    out: dict[str, Any] = {"b_norm": b_norm, "live_keys": sorted(model.state_dict())}
    if rank == 0:
        model.save_pretrained(out_dir)
        loaded, info = LlamaForCausalLM.from_pretrained(out_dir, output_loading_info=True)
        loaded.eval()
        with torch.no_grad():
            out["diff"] = (loaded(input_ids=probe).logits - trained).abs().max().item()
        out["info"] = {k: sorted(v) if isinstance(v, (list, set)) else v for k, v in info.items()}
        out["saved_keys"] = sorted(loaded.state_dict())
    dist.barrier()
    return out
