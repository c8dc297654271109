"""Where the Triton kernels can run in tests, and the skip marks that say so.

``TRITON_RUNS``: triton imports and there is CUDA, or ``TRITON_INTERPRET=1`` (the CPU
interpreter: ``PYTHONPATH=$PWD:/work/triton_site TRITON_INTERPRET=1 pytest ...``).
``INTERPRETED``: the CPU interpreter only (tests that run the kernels on CPU tensors).
"""

from __future__ import annotations

import os

import pytest
import torch

from frugal_dist.kernels.elementwise import triton_available

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and triton_available()
TRITON_RUNS = triton_available() and (torch.cuda.is_available() or INTERPRETED)
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="needs triton with CUDA, or TRITON_INTERPRET=1 (CPU interpreter)"
)
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton"
)
