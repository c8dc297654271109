"""Data-parallel ranks simulated in one process (``simulate_ranks`` = W): the quality of
``residual_comm="sign"`` / ``"hierarchical"`` measured on one GPU.

Each step, simulated rank r (r < W) trains on the rows a real rank r of a W-rank run reads
(``data.batch(step, batch_size, r, W)``; the W ranks' rows together are the single-process
batch of ``batch_size x W`` sequences, so the run sees the tokens of a real W-rank run):

    for r < W:  loss_r = model(batch_r); backward; clip g_r to grad_clip (its own norm, as
                each real rank clips its local gradient before FRUGAL reduces it)
    FRUGAL.step_ranks([g_0, ..., g_{W-1}], node_size)     (``optim.simulated_ranks``)
    logged loss = (sum_r loss_r) / W                      (float32, as the all-reduced loss)

so a run computes what rank 0 of the real run with ``engine=ddp``, ``optimizer.
reduce_gradients=true`` and the same ``residual_comm`` computes (the gloo test
``tests/distributed/test_simulated_ranks.py`` checks it against one). Evaluation reads the
same validation rows as the real run: ``eval_batches`` batches of ``batch_size x W``.
Costs: W forward/backward passes of ``batch_size`` sequences per step, W gradients kept at
once, and the optimizer's full (uncached) step path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from frugal_dist.train.config import TrainConfig


def simulated_step(
    cfg: TrainConfig, model: torch.nn.Module, optimizer: Any, data: Any, step: int,
    device: torch.device, compute_context: Any,
) -> float:  # fmt: skip
    """One optimizer step over ``cfg.simulate_ranks`` simulated ranks (module docstring);
    returns the mean of their losses. ``compute_context(cfg, device)``: the loop's autocast."""
    world = cfg.simulate_ranks
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rank_grads = []
    losses = []
    for r in range(world):
        batch = data.batch(step, cfg.batch_size, r, world).to(device)
        with compute_context(cfg, device):
            _, loss = model(batch, labels=batch)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        rank_grads.append([p.grad for p in params])
        for p in model.parameters():
            p.grad = None
        losses.append(loss.item())
    optimizer.step_ranks(rank_grads, node_size=cfg.simulate_node_size)
    optimizer.zero_grad(set_to_none=True)
    return float(torch.tensor(losses, dtype=torch.float32).sum() / world)
