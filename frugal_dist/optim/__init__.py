"""torch.optim front-ends: FRUGAL (and, later, RSO), param-group rules, validation."""

from frugal_dist.optim.frugal import FRUGAL, FRUGAL_DEFAULTS
from frugal_dist.optim.param_groups import (
    build_param_groups,
    check_param_coverage,
    classify_parameters,
    pop_group_options,
)
from frugal_dist.optim.rso import RSO, RSO_DEFAULTS, build_rso, rso_param_groups
from frugal_dist.optim.rso_layers import RSOLinear, apply_rso, rso_layers

__all__ = [
    "FRUGAL",
    "FRUGAL_DEFAULTS",
    "RSO",
    "RSO_DEFAULTS",
    "RSOLinear",
    "apply_rso",
    "build_rso",
    "rso_layers",
    "rso_param_groups",
    "build_param_groups",
    "check_param_coverage",
    "classify_parameters",
    "pop_group_options",
]
