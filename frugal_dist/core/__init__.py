"""Engine-agnostic math of FRUGAL and RSO. Imports torch only (never torch.distributed).

Modules:
    seeding     -- (base_seed, name, refresh) -> deterministic generator
    subspaces   -- block schedules, coordinate selections, projection bases
    rules       -- state-full (AdamW, SGD-momentum, Lion) and state-free (signSGD, SGD) rules
    reference   -- slow, obviously correct FRUGAL step used as the test oracle
"""

from frugal_dist.core.seeding import derive_seed, make_generator
from frugal_dist.core.subspaces import (
    BlockSchedule,
    CoordinateSelection,
    ProjectionSelection,
    coordinate_selection,
    projection_selection,
)

__all__ = [
    "BlockSchedule",
    "CoordinateSelection",
    "ProjectionSelection",
    "coordinate_selection",
    "derive_seed",
    "make_generator",
    "projection_selection",
]
