"""``free_scale="matched"`` on CUDA (``kernels="auto"``: matched items leave the Triton apply
kernels for the per-item torch path, ``optim.free_scale``) against the oracle on the same device,
beside a ``fixed`` group that keeps its kernels. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.core.reference import ReferenceFRUGAL
from tests.helpers import clone_params, grad_stream, make_params, max_diff, set_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
SHAPES = [(64, 48), (48, 64), (40, 40)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=1e-2, update_gap=4, weight_decay=0.05, inactive_lr_scale=0.5, density=0.3,
              free_scale="matched", proj_precision="fp32")  # fmt: skip
CASES = {
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "random": dict(subspace="projection", proj_type="random"),
    "svd": dict(subspace="projection", proj_type="svd"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matched_on_cuda_matches_oracle(case):
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    qs = clone_params(ps)
    kw = {**COMMON, **CASES[case]}
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "proj_precision"}
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), random_device="cuda", **ref_kw)
    # float32 GEMM order and the oracle's float64 bases: a few last-bit differences per step
    tol = 1e-4 if case != "columns" else 1e-5
    for step, grads in enumerate(grad_stream(SHAPES, 12)):
        set_grads(ps, [g.cuda() for g in grads])
        set_grads(qs, [g.cuda() for g in grads])
        opt.step()
        ref.step()
        assert max_diff(ps, qs) < tol, (case, step, max_diff(ps, qs))
