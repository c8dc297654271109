"""DDP communication hook for models whose gradients FRUGAL reduces itself.

``model.register_comm_hook(None, defer_to_optimizer_hook)`` makes DDP skip its all-reduce and
hand each rank its local gradient; ``FRUGAL(..., reduce_gradients=True)`` then communicates only
what the algorithm needs (see ``FRUGAL``'s communication schedule). Use it when you want DDP's
other services (buffer broadcast, unused-parameter detection, ``no_sync``) but FRUGAL's smaller
gradient traffic. Without DDP, simply don't wrap the model.

(No ``from __future__ import annotations`` here: DDP checks the hook's real annotations.)
"""

from typing import Any

import torch
import torch.distributed as dist


def defer_to_optimizer_hook(
    state: Any, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Return the bucket's local gradients unchanged (no collective)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut
