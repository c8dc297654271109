"""frugal_dist: FRUGAL and RSO memory-efficient optimizers for distributed LLM pre-training."""

import frugal_dist.engines  # noqa: F401  (registers the engine hooks optim/ needs)
from frugal_dist.optim import (
    FRUGAL,
    FRUGAL_DEFAULTS,
    RSO,
    apply_rso,
    build_param_groups,
    build_rso,
    check_param_coverage,
    classify_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "FRUGAL",
    "FRUGAL_DEFAULTS",
    "RSO",
    "apply_rso",
    "__version__",
    "build_param_groups",
    "build_rso",
    "check_param_coverage",
    "classify_parameters",
]
