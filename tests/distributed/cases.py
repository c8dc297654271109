"""The subspace variants the distributed tests run, by name (one table for every engine)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SUBSPACES: dict[str, dict] = {
    "block": dict(subspace="block", block_order="random"),
    "block-descending": dict(subspace="block", block_order="descending"),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "rows": dict(subspace="coordinate", coord_choice="rows"),
    "randk": dict(subspace="coordinate", coord_choice="randk"),
    "projection": dict(subspace="projection", proj_type="random"),
    "projection-left": dict(subspace="projection", proj_type="randperm", proj_side="left"),
    "svd": dict(subspace="projection", proj_type="svd"),
}


def pick(*names: str) -> dict[str, dict]:
    return {n: SUBSPACES[n] for n in names}


@contextlib.contextmanager
def count_svd_refreshes() -> Iterator[list[int]]:
    """Count the SVD bases this process computes (``counter[0]``) inside the block."""
    import frugal_dist.optim.kinds.projection as fs

    counter = [0]
    original = fs.projection_selection

    def counting(*args, **kwargs):
        counter[0] += int(args[2] == "svd")  # (shape, density, proj_type, ...)
        return original(*args, **kwargs)

    fs.projection_selection = counting
    try:
        yield counter
    finally:
        fs.projection_selection = original
