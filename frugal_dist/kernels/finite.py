"""One-launch inf/nan test of many tensors (the ``nonfinite`` check of ``optim.nonfinite``).

``NonfiniteTest(tensors, impl)`` is built once for tensors of fixed sizes, dtypes and device (a
step plan keeps it until the next refresh); calling it on tensors of those sizes returns an int32
device tensor of one element, nonzero when some element is inf or nan:

    flag = any_i any_j not isfinite(tensors[i][j])

Triton (``elementwise_triton``-style tables, ``finite_triton``): one launch per dtype (float32,
bfloat16, float16) reads every byte once -- 4 B per float32 element, 2 B per 16-bit one -- plus
one pinned, non-blocking host-to-device copy per call of 8 B per tensor (its data pointer) and
8 B for the zeroed flag; no device sync. Host work per call: two C-level maps over the tensors
(pick the non-empty ones, read their data pointers) and the copy; no per-tensor Python.

``impl``: ``"auto"`` uses Triton on CUDA when it imports (the caller keeps its torch path
elsewhere: ``NonfiniteTest.fast`` is False); ``"triton"`` also runs on the CPU under
``TRITON_INTERPRET=1`` (and raises where Triton cannot run at all); ``"torch"`` never uses it.
The kernel applies when every non-empty tensor is a contiguous float32 / bfloat16 / float16
tensor on one device (else ``fast`` is False, whatever ``impl``). ``None`` and empty tensors
are skipped.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from frugal_dist.kernels.elementwise import use_triton

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NonfiniteTest:
    """The check's fixed arguments for tensors shaped like ``tensors`` (module docstring)."""

    def __init__(self, tensors: Sequence[Tensor | None], impl: str = "auto") -> None:
        keep = [i for i, t in enumerate(tensors) if t is not None and t.numel()]
        self.fast = False
        if not keep:
            return
        device = tensors[keep[0]].device
        if not use_triton(impl, device):
            return
        groups: dict[torch.dtype, list[int]] = {}
        for i in keep:
            t = tensors[i]
            if t.device != device or t.dtype not in _DTYPES or not t.is_contiguous():
                return  # not for the kernel (another dtype, device, a strided tensor)
            groups.setdefault(t.dtype, []).append(i)
        from frugal_dist.kernels import finite_triton as ft

        order = [i for idx in groups.values() for i in idx]
        self._order = order
        self._pick = operator.itemgetter(*order) if len(order) > 1 else _one(order[0])
        self._launches = []
        offset = 0
        for dtype, idx in groups.items():
            launch = ft.finite_launch(tuple(tensors[i].numel() for i in idx), dtype, device)
            self._launches.append((offset, launch))
            offset += len(idx)
        self._count = offset
        self._device = device
        self._upload = ft.upload
        self.fast = True

    def __call__(self, tensors: Sequence[Tensor | None]) -> Tensor | None:
        """int32 flag (one element, nonzero: some inf/nan) of ``tensors`` (the sizes, dtypes
        and device of the build), or None when one of them is no longer contiguous (the caller
        takes its torch path). Needs ``fast``."""
        picked = self._pick(tensors)
        if not all(map(Tensor.is_contiguous, picked)):
            return None
        ptrs = list(map(Tensor.data_ptr, picked))
        aligned = functools.reduce(operator.or_, ptrs) & 15 == 0
        ptrs.append(0)  # the flag: the low half of the last int64 slot (little-endian)
        return self.bind(self._upload(ptrs, self._device))(aligned)

    @property
    def order(self) -> list[int]:
        """Positions (in the build's ``tensors``) of the tested tensors, in table order. Needs
        ``fast``."""
        return list(self._order)

    @property
    def device(self) -> torch.device:
        return self._device

    def bind(self, table: Tensor) -> Callable[[bool], Tensor]:
        """The launches over ``table``, an int64 device tensor already holding the data
        pointers of the tensors in ``order`` and then one zeroed slot (the flag; a step plan's
        table is a slice of its ``kernels.step_table.StepTable``): returns ``run(aligned)``,
        which launches and returns the int32 flag (``aligned``: every pointer 16-byte
        aligned). Needs ``fast``."""
        n = self._count
        flag = table.view(torch.int32)[2 * n : 2 * n + 1]
        parts = [(table[offset:], launch) for offset, launch in self._launches]

        def run(aligned: bool) -> Tensor:
            for part, launch in parts:
                launch(part, flag, aligned)
            return flag

        return run


def _one(i: int):
    return lambda xs: (xs[i],)


def any_nonfinite(tensors: Sequence[Tensor | None], impl: str = "auto") -> bool:
    """Whether any element of ``tensors`` is inf or nan (one host sync): the kernel where
    ``impl`` selects it (module docstring), else one ``isfinite`` per tensor."""
    test = NonfiniteTest(tensors, impl)
    flag = test(tensors) if test.fast else None
    if flag is not None:
        return bool(flag.item())
    return any(not bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.numel())
