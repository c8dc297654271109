"""``block_order="gradnorm"`` on CUDA (``kernels="auto"``: active blocks through the fused
Triton AdamW apply, inactive ones through the state-free kernel; the per-block float64 sums on the
device) against the oracle on the same device, step by step across refreshes, and the choice
equal to the oracle's at each refresh. Skipped without CUDA."""

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
SHAPES = [(64, 48), (48, 64), (40, 40), (96, 32), (32, 96), (50, 50)]
NAMES = [f"layers.{i}.w" for i in range(len(SHAPES))]
COMMON = dict(lr=1e-2, update_gap=4, weight_decay=0.05, inactive_lr_scale=0.5, density=0.34,
              block_order="gradnorm")  # fmt: skip


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_gradnorm_on_cuda_matches_oracle(rule):
    ps = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    qs = clone_params(ps)
    kw = {**COMMON, "state_full": rule}
    opt = FRUGAL([{"params": ps, "names": NAMES}], **kw)
    ref = ReferenceFRUGAL(list(zip(NAMES, qs)), **kw)
    for step, grads in enumerate(grad_stream(SHAPES, 13)):
        set_grads(ps, [g.cuda() for g in grads])
        set_grads(qs, [g.cuda() for g in grads])
        opt.step()
        ref.step()
        chosen = {i for i, p in enumerate(ps) if opt.state[p]["block_active"].item() == 1.0}
        assert chosen == ref.gradnorm_active, (rule, step)
        assert max_diff(ps, qs) < 1e-5, (rule, step, max_diff(ps, qs))
