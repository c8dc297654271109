"""``import frugal_dist.deepspeed as deepspeed_frugal``: see ``frugal_dist.engines.deepspeed``."""

from frugal_dist.engines.deepspeed import bind, frugal_options, initialize, mpi_environment

__all__ = ["bind", "frugal_options", "initialize", "mpi_environment"]
