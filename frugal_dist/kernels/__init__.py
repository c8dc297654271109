"""Fused kernels for the FRUGAL step's hot paths (Triton on CUDA, plain torch elsewhere).

Modules:
    elementwise         -- free_apply_, adamw_apply_, coordinate_adamw_apply_ (public API, torch
                           path, integration contract)
    elementwise_triton  -- their Triton kernels (imported lazily, only when a kernel runs)
"""

from frugal_dist.kernels.elementwise import (
    adamw_apply_,
    coordinate_adamw_apply_,
    coordinate_positions,
    free_apply_,
    triton_available,
)

__all__ = [
    "adamw_apply_",
    "coordinate_adamw_apply_",
    "coordinate_positions",
    "free_apply_",
    "triton_available",
]
