"""The packed-vote apply (``kernels.vote_apply`` through ``fast_apply.run_voted``) against the
float32 vote and ``apply_one`` (the path before it), on 4 gloo processes: sign mode (4 voters:
ties) and hierarchical mode (2 nodes of 2: 2 voters, ties), inactive blocks (with s_p, s_i),
all blocks inactive (density 0), a signSGD group and rho = 0 columns / projections (with s_p),
weight decay 0.1. With ``kernels="auto"`` on the CPU both take the
torch path: equal bit for bit. With ``kernels="triton"`` (under ``PYTHONPATH=$PWD:/work/triton_site
TRITON_INTERPRET=1``; skipped otherwise) the interpreter rounds every operation (no FMA
contraction): also bit for bit. One 4-process launch per kernels option."""

from __future__ import annotations

import os

import pytest
import torch

from frugal_dist.kernels.elementwise import triton_available
from tests.distributed import vote_apply_workers as vw
from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed

WORLD, STEPS = 4, 4
INTERPRET = triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = [
    "auto",
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET=1")),
]


@pytest.fixture(scope="module", params=KERNELS)
def runs(request):
    return run_distributed(vw.run_paths, WORLD, STEPS, request.param, deadline_s=600)


@pytest.mark.parametrize("mode", list(vw.MODES))
@pytest.mark.parametrize("case", list(vw.CASES))
def test_packed_vote_apply_is_the_float_vote_bit_for_bit(runs, case, mode):
    for r in range(WORLD):
        packed, calls = runs[r][case, mode, "packed"]
        floats, float_calls = runs[r][case, mode, "float"]
        assert calls > 0 and float_calls == 0, (calls, float_calls)  # each path really ran
        for s in range(STEPS):
            for a, b, c in zip(packed[s], floats[s], runs[0][case, mode, "packed"][0][s]):
                assert torch.equal(a, b), (case, mode, r, s)
                assert torch.equal(a, c), (case, mode, r, s)  # every rank the same
    # the parameters moved (the comparison is not of two no-ops)
    packed = runs[0][case, mode, "packed"][0]
    assert packed[-1][0].ne(packed[0][0]).any()
