"""One int64 argument table for every kernel of a step, uploaded with one copy per step.

The one-launch-over-many-tensors kernels (``elementwise_triton``, ``finite_triton``) read their
tensors' data pointers, sizes and per-tensor coefficients from an int64 table on the device.
Between two refreshes most entries never change (parameters, moments, coordinate maps, sizes);
only the gradients' data pointers (``zero_grad(set_to_none=True)`` makes new gradients every
step) and the AdamW bias corrections (the step counts) do. ``StepTable`` holds the tables of
all of a step's launches as slices of one device buffer: the fixed entries are written once,
and each step the caller writes only its per-step slots into a pinned host buffer (``begin``)
and sends the whole buffer with one non-blocking host-to-device copy (``upload``):

    bytes per step: 8 B x (table entries of all launches), one copy, no device sync

On the CPU (Triton under ``TRITON_INTERPRET=1``, tests) the host buffer *is* the table and
``upload`` does nothing: an entry a kernel writes (the inf/nan flag) must be rewritten by the
caller every step, as a per-step slot. On CUDA two pinned host buffers alternate; before one is
written again the host waits for the event recorded after its previous copy (already complete
unless the host runs two steps ahead of the device), so a copy never reads a buffer being
rewritten. The device
buffer is rewritten in stream order (the copy follows the previous step's launches on the
current stream), so the launches of the previous step have read it by then.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class StepTable:
    """A device int64 table whose fixed entries are ``values`` (module docstring)."""

    def __init__(self, values: list[int], device: torch.device) -> None:
        host = torch.tensor(values, dtype=torch.int64)
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._hosts = [host.pin_memory(), host.pin_memory()]
            self._events: list[torch.cuda.Event | None] = [None, None]
            self.table = host.to(device)  # the fixed entries, once (a sync: build time only)
        else:
            self._hosts = [host]
            self.table = host
        self._arrays = [h.numpy() for h in self._hosts]
        self._next = 0

    @property
    def numel(self) -> int:
        return self.table.numel()

    def begin(self) -> np.ndarray:
        """The host buffer of this step (a numpy int64 view holding the fixed entries and the
        previous step's per-step ones): write this step's per-step slots, then ``upload``."""
        if self.cuda:
            event = self._events[self._next]
            if event is not None:
                event.synchronize()  # its previous copy is done (normally long since)
        return self._arrays[self._next]

    def upload(self) -> None:
        """Send the buffer written since ``begin`` to ``table``: one pinned, non-blocking copy
        on the current stream (nothing on the CPU)."""
        if not self.cuda:
            return
        i = self._next
        self.table.copy_(self._hosts[i], non_blocking=True)  # on the table device's stream
        event = self._events[i]
        if event is None:
            event = self._events[i] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._next = 1 - i

    def view(self, start: int, length: int) -> Tensor:
        """The device slice ``[start, start + length)`` (a launch's table: fixed between steps)."""
        return self.table[start : start + length]
