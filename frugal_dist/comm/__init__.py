"""Communication primitives for FRUGAL: each is a no-op (no collective at all) at world size 1.

stats        -- CommStats: payload bytes handed to collectives, per kind, per step
bits         -- 1-bit sign packing (8 signs per byte) and majority vote
collectives  -- coalesced mean all-reduce, sign majority vote, owner broadcasts, seed
                agreement, selection fingerprint check
ddp_hooks    -- a DDP comm hook that leaves gradient reduction to FRUGAL
preflight    -- start-of-run agreement: ranks compare versions, settings, parameter names/shapes
timeouts     -- collective timeouts as errors naming the phase (gloo; NCCL behaviour documented)
"""

from frugal_dist.comm.ddp_hooks import defer_to_optimizer_hook
from frugal_dist.comm.stats import CommStats

__all__ = ["CommStats", "defer_to_optimizer_hook"]
