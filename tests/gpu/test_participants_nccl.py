"""One-rank FRUGAL under NCCL (issue 17, item 3; the gloo version is
``tests/distributed/test_one_rank.py``): a replicated optimizer with ``check_agreement=False``
steps on rank 0 alone with no collective, and the default agreement check raises
``ParticipantsError`` within ``FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S`` (NCCL's ``work.wait(timeout)``).

    .venv/bin/python -m pytest -q tests/gpu/test_participants_nccl.py     # on a 2-GPU machine
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
TIMEOUT_S = 5.0


def test_rank0_only_on_nccl_never_hangs(monkeypatch):
    import tempfile

    import torch.multiprocessing as mp

    from tests.distributed.launch import free_port
    from tests.gpu import participants_workers as w

    monkeypatch.setenv("FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S", str(TIMEOUT_S))
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        ctx = mp.start_processes(w.entry, args=(2, free_port(), 40.0, out), nprocs=2, join=False,
                                 start_method="spawn")  # fmt: skip
        for _ in range(120):
            if ctx.join(timeout=1.0):
                break
        else:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("rank-0-only FRUGAL hung under NCCL")
        got = torch.load(f"{out}.0", weights_only=False)
    assert got["local"]["error"] is None, got["local"]
    assert got["local"]["s"] < TIMEOUT_S, got["local"]
    assert got["agreement"]["error"] == "ParticipantsError", got["agreement"]
    assert got["agreement"]["s"] < TIMEOUT_S + 30, got["agreement"]
