"""How a logical parameter maps to local storage (the only place that knows).

    base     ParamView (a parameter's fragment on this rank), Layout protocol, PrefixedState
    flat     ZeRO-1/2 fragments, ZeRO-3 ds_tensor slices, FSDP1 flat slices: views into flat
             partitions from a (name, flat tensor, offset, logical start, numel) table
    dtensor  FSDP2 / HSDP: DTensor params sharded by rows (Shard(0) on one mesh dim, Replicate
             on the others); state stored as DTensors; tensor parallelism refused

The dense layout (single process, DDP, fairscale OSS) is FRUGAL's default and needs no object.
"""

from frugal_dist.layouts.base import Layout, ParamView, PrefixedState

__all__ = ["Layout", "ParamView", "PrefixedState"]
