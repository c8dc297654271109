"""Thin engine adapters (no math): they shard the model the engine's way and bind FRUGAL to the
engine's layout. ``fsdp2``: torch FSDP2 (``fully_shard``)."""
