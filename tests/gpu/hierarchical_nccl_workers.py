"""Per-rank entry of ``test_hierarchical_nccl``: ``hierarchical_workers.run_modes`` on CUDA
tensors over NCCL (the Triton pack / vote kernels under ``kernels="auto"``)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def entry(rank: int, world: int, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    from tests.distributed import hierarchical_workers as hw

    result = hw.run_modes(rank, world, steps, device="cuda")
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
