"""Math on a *fragment* of a parameter: the flat range [start, start + numel) of its row-major
(m, n) matrix view. ZeRO-1/2 partitions, ZeRO-3 ``ds_tensor`` slices, FSDP1 flat slices and FSDP2
``Shard(0)`` rows are all fragments; a whole parameter is the fragment [0, m*n).

A fragment touches rows ``first_row .. last_row``; ``RowSpan.pad`` embeds it in a zero-filled
(rows_touched, n) *local matrix*, on which every subspace works as on a whole matrix once its
selection is restricted to those rows (``local_coordinates``, ``local_projection``). Entries of
the local matrix outside the fragment ("phantoms") hold zero gradients, so their state-full
statistics stay exactly zero, and ``RowSpan.unpad`` drops them from every update.

Cross-fragment sums are needed only by projections:

* right (P: n x r): row i of G_sf = G[i] P is local unless row i is split between fragments
  (a *boundary row*): then the partial products of its pieces are summed over ranks;
* left (P: m x r): G_sf = P^T G sums over rows: the partial (r, n) products of all fragments are
  summed over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from frugal_dist.core.subspaces import CoordinateSelection, ProjectionSelection


@dataclass(frozen=True)
class RowSpan:
    """The fragment [start, start + numel) of a row-major (m, n) matrix."""

    m: int
    n: int
    start: int
    numel: int

    @property
    def is_full(self) -> bool:
        return self.start == 0 and self.numel == self.m * self.n

    @property
    def first_row(self) -> int:
        return self.start // self.n

    @property
    def last_row(self) -> int:
        return (self.start + max(self.numel, 1) - 1) // self.n

    @property
    def rows_touched(self) -> int:
        return 0 if self.numel == 0 else self.last_row - self.first_row + 1

    @property
    def offset(self) -> int:
        """Position of the fragment's first element in the padded local matrix."""
        return self.start - self.first_row * self.n

    def pad(self, flat: Tensor) -> Tensor:
        """(rows_touched, n) matrix holding ``flat`` (the fragment) and zeros elsewhere."""
        if self.is_full:
            return flat.reshape(self.m, self.n)
        out = flat.new_zeros(self.rows_touched * self.n)
        out[self.offset : self.offset + self.numel] = flat.reshape(-1)
        return out.view(self.rows_touched, self.n)

    def unpad(self, local: Tensor) -> Tensor:
        """The fragment's entries of a (rows_touched, n) local matrix, as a 1-D tensor."""
        if self.is_full:
            return local.reshape(-1)
        return local.reshape(-1)[self.offset : self.offset + self.numel]


def local_coordinates(sel: CoordinateSelection, span: RowSpan) -> CoordinateSelection:
    """``sel`` restricted to the rows a fragment touches, in local-matrix coordinates.

    The compact order stays row-major, so the local compact tensor is the slice of the global
    one covering the touched rows (boundary rows included: their phantom entries stay zero)."""
    if span.is_full:
        return sel
    shape = (span.rows_touched, span.n)
    if sel.choice == "columns":
        return CoordinateSelection("columns", shape, sel.index)
    inside, lo = _selected_in_rows(sel, span)
    return CoordinateSelection(sel.choice, shape, sel.index[inside] - lo)


def compact_rows(sel: CoordinateSelection, span: RowSpan) -> Tensor:
    """Where the rows of the fragment's local compact tensor (``local_coordinates``) sit in the
    global compact tensor, on the CPU: the touched rows (``columns``), or the positions of the
    selected rows / entries inside them (``rows`` / ``randk``)."""
    if sel.choice == "columns":
        return torch.arange(span.first_row, span.first_row + span.rows_touched)
    inside, _ = _selected_in_rows(sel, span)
    return torch.nonzero(inside).reshape(-1).cpu()


def _selected_in_rows(sel: CoordinateSelection, span: RowSpan) -> tuple[Tensor, int]:
    """``rows`` / ``randk``: (mask of the indices inside the touched rows, the first row or
    flat index of those rows)."""
    r0, r1 = span.first_row, span.first_row + span.rows_touched
    lo, hi = (r0, r1) if sel.choice == "rows" else (r0 * span.n, r1 * span.n)
    return (sel.index >= lo) & (sel.index < hi), lo


def local_projection(sel: ProjectionSelection, span: RowSpan) -> ProjectionSelection:
    """For a left projection, the rows of P the fragment touches; a right projection's P is
    shared by every row."""
    if span.is_full or sel.side == "right":
        return sel
    return ProjectionSelection(
        "left", sel.basis[span.first_row : span.first_row + span.rows_touched]
    )
