"""A DeepSpeed training script as users write it, with one changed line: the import.

    deepspeed --num_gpus 2 ds_conventional_script.py --deepspeed --deepspeed_config ds.json \
        --result out.json

Rank 0 writes what the test checks: the losses, the optimizer DeepSpeed steps, its layout and
options, and that ``args`` still holds the config path.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import frugal_dist.deepspeed as deepspeed  # was: import deepspeed


def main() -> None:
    parser = argparse.ArgumentParser(description="conventional DeepSpeed script")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--result", required=True)
    parser = deepspeed.add_config_arguments(parser)  # DeepSpeed's own: --deepspeed(_config)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")  # forwarded to DeepSpeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1))  # fmt: skip
    engine, optimizer, _, _ = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters()
    )
    gen = torch.Generator().manual_seed(1 + engine.global_rank)
    x = torch.randn(64, 16, generator=gen)
    y = x[:, :1] * 2 - x[:, 1:2]
    losses = []
    for _ in range(12):
        i = torch.randint(0, 64, (8,), generator=gen)
        loss = nn.functional.mse_loss(engine(x[i]), y[i])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    frugal = getattr(optimizer, "optimizer", optimizer)  # inside DeepSpeed's ZeRO wrapper
    if engine.global_rank == 0:
        with open(args.result, "w") as fh:
            json.dump({"losses": losses, "optimizer": type(frugal).__name__,
                       "layout": getattr(frugal.layout, "name", None),
                       "density": frugal.defaults["density"], "lr": frugal.defaults["lr"],
                       "deepspeed_config": args.deepspeed_config,
                       "world": deepspeed.comm.get_world_size()}, fh)  # fmt: skip


if __name__ == "__main__":
    main()
