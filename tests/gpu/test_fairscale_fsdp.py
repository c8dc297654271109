"""FRUGAL on fairscale's FullyShardedDataParallel (CUDA-only; ``flatten_parameters=False``) at up
to 2 GPUs reproduces the single-GPU trajectory. Skipped without CUDA or fairscale.

Two checks: the exact-gradient probe (linear loss, dyadic gradients: the sharded run must equal
the single-GPU run to float32 rounding of the optimizer math, with no feedback), and a tiny LLaMA
that must track the single-GPU run (float32 only: rounding differences flip signSGD signs, and
flips feed back through the gradients, so that comparison is loose by nature).

    .venv/bin/python -m pytest -q tests/gpu/test_fairscale_fsdp.py     # on a 1- or 2-GPU machine
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fairscale")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="fairscale FSDP needs CUDA"),
]

KINDS = {
    "block-descending": dict(subspace="block", block_order="descending"),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    # IEEE fp32 GEMMs: the sharded run's per-item products and the single GPU's batched kernel
    # would round TF32 differently (sign flips of the residual far above float32 rounding)
    "projection": dict(subspace="projection", proj_type="random", proj_precision="fp32"),
}
COMMON = dict(lr=3e-3, density=0.25, update_gap=4, weight_decay=0.01)
STEPS = 10


def _spawn(entry, kw: dict, tmp_path) -> dict:
    import torch.multiprocessing as mp

    from tests.distributed.launch import free_port

    world = min(2, torch.cuda.device_count())
    out = str(tmp_path / "result.pt")
    mp.start_processes(entry, args=(world, free_port(), STEPS, kw, out), nprocs=world, join=True,
                       start_method="spawn")  # fmt: skip
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fairscale_fsdp_probe_matches_single_gpu(kind, tmp_path):
    from tests.gpu import fairscale_fsdp_workers as w

    kw = {**COMMON, **KINDS[kind]}
    got = _spawn(w.probe_entry, kw, tmp_path)["params"]
    ref = w.probe_single(STEPS, min(2, torch.cuda.device_count()), kw)
    assert set(got) == set(ref)
    diffs = [(got[k] - ref[k]).abs() for k in ref]
    worst = max(float(d.max()) for d in diffs)
    if kind == "projection":
        # Sharded projections sum their products in another order: a state-free residual entry
        # within rounding of zero may take the other sign; each flip moves one entry by 2 lr and
        # nothing feeds back, so an entry differs by a flip or two at most.
        mean = sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)
        assert mean < 1e-5 and worst <= 4 * COMMON["lr"], (mean, worst)
    else:  # elementwise on exact gradients: identical up to the last float32 bit
        assert worst <= 1e-6, worst


@pytest.mark.parametrize("kind", list(KINDS))
def test_fairscale_fsdp_llama_tracks_single_gpu(kind, tmp_path):
    from tests.gpu import fairscale_fsdp_workers as w

    kw = {**COMMON, **KINDS[kind]}
    ref = w.single(STEPS, kw)
    got = _spawn(w.entry, kw, tmp_path)
    # float32 only (fairscale FSDP refuses float64: "Expecting FP16 param type in FP32 & MP
    # modes"), so signSGD flips cascade: on 2 x H200 the mean parameter difference after 10
    # steps was 1.3e-4 (block) and the last loss differed by 1.4e-4 relative (projection). The
    # exact comparison is the probe test above; this one checks the real model keeps up.
    assert got["losses"] == pytest.approx(ref["losses"], rel=2e-3)
    diffs = [(got["params"][k] - ref["params"][k]).abs() for k in ref["params"]]
    mean = sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)
    assert mean < 1e-3, mean
