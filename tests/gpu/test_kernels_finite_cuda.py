"""The compiled inf/nan check (``frugal_dist.kernels.finite``) on CUDA: against
``torch.isfinite`` at LLaMA-like sizes (many tiles, ragged tails, 16-bit dtypes, a misaligned
view), no host sync before the flag is read, and FRUGAL's skip / raise through it on plan steps.
Skipped without CUDA or triton."""

from __future__ import annotations

import pytest
import torch

from frugal_dist import FRUGAL
from frugal_dist.kernels.elementwise import triton_available
from frugal_dist.kernels.finite import NonfiniteTest, any_nonfinite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
]
SIZES = [(64, 2048), (40, 5461), (2048,), (7, 3), (0,), (1,), (3, 8193)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tensors(dtype_of):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [
        (torch.randn(s, device="cuda", generator=g) * 1e3).to(dtype_of(i))
        for i, s in enumerate(SIZES)
    ]


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_first_and_last_elements_against_isfinite(dtype, mixed):
    """inf / -inf / nan at the first, the last and a middle element of every tensor; one test
    object, built once, on new tensors of the same sizes (as a step plan)."""
    ts = _tensors(lambda i: DTYPES[i % 3] if mixed else dtype)
    test = NonfiniteTest(ts, "auto")
    assert test.fast
    assert test(ts).item() == 0
    for i, t in enumerate(ts):
        n = t.numel()
        for pos in sorted({0, n // 2, n - 1}) if n else []:
            for bad in (float("inf"), float("-inf"), float("nan")):
                poisoned = [x.clone() for x in ts]
                poisoned[i].view(-1)[pos] = bad
                assert test(poisoned).item() == 1, (i, pos, bad)
    assert test(ts).item() == 0


def test_misaligned_views_and_no_sync_before_the_read():
    base = torch.zeros(3 * 8192 + 7, device="cuda")
    ts = [base[1:8193], base[8193:], torch.zeros(5, device="cuda", dtype=torch.bfloat16)]
    test = NonfiniteTest(ts, "auto")
    assert test.fast
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flag = test(ts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.item() == 0
    base[-1] = float("nan")
    assert test(ts).item() == 1
    assert any_nonfinite(ts, "auto") is True


@pytest.mark.parametrize("bad_step", [0, 2])  # a full step; a plan step (update_gap 3: 1 builds)
def test_frugal_skips_and_raises_through_the_kernel(bad_step):
    shapes = [(256, 512), (512, 256), (1000,)]
    runs = []
    for kernels in ("auto", "torch"):
        torch.manual_seed(0)  # the same start for both runs
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        opt = FRUGAL([{"params": ps, "names": ["a", "b", "c"]}], lr=1e-2, density=0.25,
                     update_gap=3, subspace="block", kernels=kernels)  # fmt: skip
        g = torch.Generator(device="cuda").manual_seed(1)
        for step in range(6):
            grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
            if step == bad_step:
                for p, gr in zip(ps, grads):
                    p.grad = gr.clone()
                ps[1].grad[-1, -1] = float("nan")
                opt.step()
            for p, gr in zip(ps, grads):
                p.grad = gr
            opt.step()
        assert opt.skipped_steps() == 1
        runs.append([p.detach() for p in ps])
    assert max((a - b).abs().max().item() for a, b in zip(*runs)) < 1e-5
    opt = FRUGAL([{"params": ps, "names": ["a", "b", "c"]}], lr=1e-2, nonfinite="raise")
    ps[2].grad = torch.full((1000,), float("inf"), device="cuda")
    with pytest.raises(FloatingPointError, match="'c'"):
        opt.step()
