"""``residual_comm="hierarchical"`` and ``"sign"`` on NCCL with the Triton sign kernels: the
gloo test's checks (``tests/distributed/test_hierarchical.py``) on 4 GPUs as 2 nodes x 2, or on
2 GPUs as 2 nodes x 1 (where the sliced cross-node path is not used).

    .venv/bin/python -m pytest -q tests/gpu/test_hierarchical_nccl.py     # 2 or 4 GPUs
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import hierarchical_workers as hw
from tests.distributed import test_hierarchical as gloo_test

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
STEPS = 5
WORLD = 4 if torch.cuda.device_count() >= 4 else 2


@pytest.fixture(scope="module")
def runs():
    import tempfile

    import torch.multiprocessing as mp

    from tests.distributed.launch import free_port
    from tests.gpu import hierarchical_nccl_workers as w

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        ctx = mp.start_processes(w.entry, args=(WORLD, free_port(), STEPS, out), nprocs=WORLD,
                                 join=False, start_method="spawn")  # fmt: skip
        for _ in range(600):
            if ctx.join(timeout=1.0):
                break
        else:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("hierarchical NCCL run did not finish in 600 s")
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(hw.CASES))
def test_nccl_matches_the_vote_simulation(runs, case):
    gloo_test.check_against_simulation(runs, case, WORLD, WORLD // 2, STEPS)


@pytest.mark.parametrize("case", list(hw.CASES))
def test_nccl_special_cases(runs, case):
    gloo_test.check_special_cases(runs, case, WORLD, STEPS)
