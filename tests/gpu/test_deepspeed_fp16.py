"""DeepSpeed fp16 dynamic loss scaling drives FRUGAL correctly (CUDA-only: DeepSpeed refuses fp16
on the CPU; ``tests/distributed/test_nonfinite_dist.py`` covers the float32 overflow path there).

    .venv/bin/python -m pytest -q tests/gpu/test_deepspeed_fp16.py     # on a 1- or 2-GPU machine
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed fp16 needs CUDA"),
]

OPT = dict(lr=1e-2, density=0.4, update_gap=4, weight_decay=0.01, subspace="block")
POISON = 6


def _spawn(fn_name: str, *args) -> list:
    import tempfile

    import torch.multiprocessing as mp

    from tests.distributed.launch import free_port
    from tests.gpu import deepspeed_fp16_workers as w

    world = min(2, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result"
        mp.start_processes(w.entry, args=(world, free_port(), fn_name, args, out), nprocs=world,
                           join=True, start_method="spawn")  # fmt: skip
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_overflow_skips_the_iteration_and_masters_match_reference(stage):
    from tests.gpu import deepspeed_fp16_workers as w

    steps = 12
    res = _spawn("probe", stage, steps, POISON, OPT)
    world = len(res)
    scales = res[0]["scales"]
    start = 2.0**16
    before = [start, *scales[:-1]]
    overflowed = [s for s in range(steps) if scales[s] < before[s]]
    # Scale 2**16 times coefficients up to 31/8 overflows fp16 (max 65504): the first steps skip
    # for real, and the poisoned step skips too; every overflow halves the scale (hysteresis 1).
    assert overflowed[0] == 0 and POISON in overflowed, scales
    assert all(scales[s] == before[s] / 2 for s in overflowed), scales
    assert all(scales[s] == before[s] for s in range(steps) if s not in overflowed), scales
    taken = [s for s in range(steps) if s not in overflowed]
    for r in res:
        assert r["scales"] == scales  # every rank agrees on the scale
        assert r["skipped"] == 0  # DeepSpeed skipped those iterations; FRUGAL never saw an inf
        expected = [sum(1 for t in taken if t <= s) for s in range(steps)]
        assert r["counters"] == expected, (r["counters"], expected)
    ref = w.probe_reference(taken, world, OPT)
    for name, want in ref.items():
        got = res[0]["params"][name]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{name} (ZeRO-{stage})")


@pytest.mark.parametrize("stage", [2, 3])
def test_small_llama_trains_in_fp16(stage):
    steps = 40
    res = _spawn("llama", stage, steps, dict(OPT, lr=3e-3, update_gap=10))
    losses = res[0]["losses"]
    assert all(torch.isfinite(torch.tensor(x)) for x in losses), losses
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert res[0]["scales"][-1] >= 1.0
    assert 0 < res[0]["frugal_steps"] <= steps
