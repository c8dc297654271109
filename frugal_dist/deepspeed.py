"""``import frugal_dist.deepspeed as deepspeed``: the ``deepspeed`` module, with FRUGAL.

A training script written for DeepSpeed runs unchanged after this one import line:

    parser = deepspeed.add_config_arguments(parser)      # --deepspeed, --deepspeed_config
    args = parser.parse_args()
    engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model,
                                                   model_parameters=model.parameters())

Overridden here: ``initialize`` -- ``deepspeed.initialize`` that builds FRUGAL (or RSO) from a
``"optimizer": {"type": "FRUGAL", "params": {...}}`` section of the config and binds it to the
engine's ZeRO layout; the config comes, as in DeepSpeed, from ``config=`` / ``config_params=``
or from ``args.deepspeed_config`` (giving both is an error). Also ``bind``, ``frugal_options``,
``mpi_environment`` and ``frugal_optimizer(engine)`` (the FRUGAL the engine steps, e.g. for
``observe_loss``; ``frugal_dist.engines.deepspeed``). Every other attribute
(``add_config_arguments``, ``init_distributed``, ``zero``, ``comm``, ``DeepSpeedEngine``, ...)
is DeepSpeed's own, imported on first use.
"""

from __future__ import annotations

from typing import Any

from frugal_dist.engines.deepspeed import (
    bind,
    frugal_optimizer,
    frugal_options,
    initialize,
    mpi_environment,
)

__all__ = ["bind", "frugal_optimizer", "frugal_options", "initialize", "mpi_environment"]


def __getattr__(name: str) -> Any:
    """Forward what frugal_dist does not override to the ``deepspeed`` package."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        import deepspeed
    except ImportError as exc:
        raise AttributeError(
            f"frugal_dist.deepspeed.{name} is DeepSpeed's, and deepspeed is not installed: "
            'pip install "frugal-dist[deepspeed]" (or pip install deepspeed)'
        ) from exc
    return getattr(deepspeed, name)


def __dir__() -> list[str]:
    try:
        import deepspeed

        return sorted(set(__all__) | set(dir(deepspeed)))
    except ImportError:
        return sorted(__all__)
