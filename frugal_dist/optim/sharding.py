"""ZeRO-1-style ownership of state-full buffers for replicated parameters (DDP, plain torchrun).

Each parameter gets one owner rank, chosen by longest-processing-time-first: parameters sorted by
their state-full bytes (ties by name) go one by one to the least-loaded rank. The plan is a pure
function of the parameter names, shapes and options, so every rank computes the same plan with no
communication.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPlan:
    owner: dict[str, int]
    load: tuple[int, ...]  # expected state bytes per rank

    @property
    def imbalance(self) -> float:
        """max / mean of the per-rank state bytes (1.0 is perfect)."""
        mean = sum(self.load) / max(1, len(self.load))
        return max(self.load) / mean if mean > 0 else 1.0


def assign_owners(weights: dict[str, int], world: int) -> ShardPlan:
    """Owner rank of each name, balancing the summed ``weights`` (bytes) over ``world`` ranks."""
    heap = [(0, r) for r in range(world)]
    owner: dict[str, int] = {}
    load = [0] * world
    for name, w in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0])):
        cur, r = heapq.heappop(heap)
        owner[name] = r
        load[r] = cur + w
        heapq.heappush(heap, (cur + w, r))
    return ShardPlan(owner, tuple(load))
