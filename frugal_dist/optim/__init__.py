"""torch.optim front-ends: FRUGAL (and, later, RSO), param-group rules, validation."""

from frugal_dist.optim.frugal import FRUGAL, FRUGAL_DEFAULTS
from frugal_dist.optim.param_groups import (
    build_param_groups,
    check_param_coverage,
    classify_parameters,
)

__all__ = [
    "FRUGAL",
    "FRUGAL_DEFAULTS",
    "build_param_groups",
    "check_param_coverage",
    "classify_parameters",
]
