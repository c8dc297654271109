"""``frugal_dist.kernels.finite``: the one-launch inf/nan test against ``torch.isfinite``.

Runs on CUDA or under the CPU interpreter (``PYTHONPATH=$PWD:/work/triton_site
TRITON_INTERPRET=1 pytest tests/unit/test_kernels_finite.py``); without either, only the
dispatch tests run. Most tests shrink the tile (``FINITE_BLOCK``) so that many tiles and ragged
tails stay cheap under the interpreter; one keeps the default tile.
"""

from __future__ import annotations

import pytest
import torch

from frugal_dist.kernels.finite import NonfiniteTest, any_nonfinite
from tests.triton_marks import TRITON_RUNS, needs_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BADS = [float("inf"), float("-inf"), float("nan")]
SMALL_BLOCK = 64


@pytest.fixture(params=[True, False], ids=["reduce", "per_element_store"])
def small_tiles(monkeypatch, request):
    """A small tile, with each way a tile reports (``FINITE_REDUCE``)."""
    if not TRITON_RUNS:
        pytest.skip("needs triton with CUDA, or TRITON_INTERPRET=1")
    from frugal_dist.kernels import finite_triton as ft

    monkeypatch.setattr(ft, "FINITE_BLOCK", SMALL_BLOCK)
    monkeypatch.setattr(ft, "FINITE_REDUCE", request.param)
    return SMALL_BLOCK


def _tensors(block: int, seed: int = 0) -> list[torch.Tensor | None]:
    """Mixed sizes (empty, one element, tile +- 1, several tiles with a tail), shapes and
    dtypes in one list, with None between; values up to each dtype's largest finite one."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(0,), (1,), (block - 1,), (block,), (block + 1,), (3, block + 5), (2, 0, 3), (7,)]
    out: list[torch.Tensor | None] = []
    for i, shape in enumerate(sizes):
        dtype = DTYPES[i % 3]
        t = torch.randn(shape, generator=g) * 100
        if t.numel():
            t.view(-1)[0] = torch.finfo(dtype).max  # largest finite: not flagged
            t.view(-1)[-1] = torch.finfo(dtype).tiny / 4  # subnormal: not flagged
        out.append(t.to(dtype).to(DEV))
        if i == 3:
            out.append(None)
    return out


def _expected(tensors) -> bool:
    return any(not bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def _flag(test: NonfiniteTest, tensors) -> bool:
    flag = test(tensors)
    assert flag is not None and flag.dtype == torch.int32 and flag.numel() == 1
    return bool(flag.item())


def test_clean_tensors_pass(small_tiles):
    ts = _tensors(small_tiles)
    test = NonfiniteTest(ts, "triton")
    assert test.fast
    assert _flag(test, ts) is False
    assert any_nonfinite(ts, "triton") is False


@pytest.mark.parametrize("bad", BADS)
def test_every_first_and_last_element_of_every_tensor(small_tiles, bad):
    """inf / -inf / nan at the first and the last element of each tensor (every dtype, every
    tail): the flag agrees with ``torch.isfinite``. One test object for all: the tables are
    built once and reused on new tensors of the same sizes, as a step plan does."""
    ts = _tensors(small_tiles)
    test = NonfiniteTest(ts, "triton")
    cases = 0
    for i, t in enumerate(ts):
        if t is None or not t.numel():
            continue
        for pos in (0, t.numel() - 1):
            poisoned = [None if x is None else x.clone() for x in ts]
            poisoned[i].view(-1)[pos] = bad
            assert _expected(poisoned)
            assert _flag(test, poisoned) is True, (i, pos)
            cases += 1
    assert cases == 12
    assert _flag(test, ts) is False  # the same tables on the clean tensors


@pytest.mark.parametrize("seed", range(4))
def test_random_positions_against_isfinite(small_tiles, seed):
    ts = _tensors(small_tiles, seed)
    test = NonfiniteTest(ts, "triton")
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(6):
        poisoned = [None if x is None else x.clone() for x in ts]
        for t in poisoned:  # each tensor poisoned with probability 1/8
            if t is not None and t.numel() and torch.rand(1, generator=g) < 0.125:
                pos = int(torch.randint(t.numel(), (1,), generator=g))
                t.view(-1)[pos] = BADS[int(torch.randint(3, (1,), generator=g))]
        assert _flag(test, poisoned) is _expected(poisoned)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_default_tile_with_a_ragged_tail(dtype):
    from frugal_dist.kernels import finite_triton as ft

    n = ft.FINITE_BLOCK + 3
    ts = [torch.zeros(n, dtype=dtype, device=DEV), torch.ones(5, dtype=dtype, device=DEV)]
    test = NonfiniteTest(ts, "triton")
    assert _flag(test, ts) is False
    for pos in (0, ft.FINITE_BLOCK - 1, ft.FINITE_BLOCK, n - 1):
        ts[0][pos] = float("nan")
        assert _flag(test, ts) is True, pos
        ts[0][pos] = 0.0


@needs_triton
def test_unsupported_tensors_leave_the_kernel_out():
    """float64, strided tensors, or nothing to check: ``fast`` False (the caller's torch path);
    a tensor that turns strided after the build: None."""
    x = torch.ones(8, 8, device=DEV)
    assert not NonfiniteTest([x.double()], "triton").fast
    assert not NonfiniteTest([x.t()], "triton").fast
    assert not NonfiniteTest([None, torch.ones(0, device=DEV)], "triton").fast
    test = NonfiniteTest([x], "triton")
    assert test.fast and test([x.t()]) is None
    y = x.t().clone()
    y[0, 0] = float("inf")
    assert any_nonfinite([x.double(), y.t()], "triton") is True  # the isfinite fallback


def test_torch_impl_and_auto_on_the_cpu_never_use_the_kernel():
    x = torch.ones(4)
    assert not NonfiniteTest([x], "torch").fast
    assert not NonfiniteTest([x], "auto").fast
    x[1] = float("nan")
    assert any_nonfinite([x], "torch") is True
    with pytest.raises(ValueError, match="impl must be one of"):
        NonfiniteTest([x], "cuda")
