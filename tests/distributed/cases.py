"""The subspace variants the distributed tests run, by name (one table for every engine)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

DECAY = dict(density=0.5, density_final=0.1, density_decay_steps=16)
# refresh_policy="loss" (optim.refresh_schedule), T0 = 2, T_max = 8. Every worker reports with
# observe_loss after each step a loss that is the same on every rank and in the single-process
# reference: the all-reduced mean loss (fsdp_workers: FSDP2, HSDP, FSDP1, fairscale) or FLAT_LOSS
# (synthetic gradients: workers, ds_workers). tau = 1: a positive loss's gain, (L_a - L_b) / L_a
# * T0 / mean(T), is below 1 whatever its rounding, so T doubles at every decision (refreshes at
# 0, 2, 4, 8, 16) instead of a decision flipping on the last bits of an engine's mean loss.
LOSS_DRIVEN = dict(update_gap=2, refresh_policy="loss", update_gap_max=8, refresh_threshold=1.0)
FLAT_LOSS = 1.0
SUBSPACES: dict[str, dict] = {
    "block": dict(subspace="block", block_order="random"),
    "block-descending": dict(subspace="block", block_order="descending"),
    # active blocks chosen by gradient norm at each refresh (optim.block_gradnorm): fragments'
    # sums of squares all-reduced, the mean gradient under reduce_gradients
    "block-gradnorm": dict(subspace="block", block_order="gradnorm"),
    "columns": dict(subspace="coordinate", coord_choice="columns"),
    "rows": dict(subspace="coordinate", coord_choice="rows"),
    "randk": dict(subspace="coordinate", coord_choice="randk"),
    "projection": dict(subspace="projection", proj_type="random"),
    # random bases drawn by kernels.refresh.random_bases (batched per shape) on the parameter's
    # device, the CUDA default, here on the CPU
    "projection-device": dict(subspace="projection", proj_type="random", proj_qr_device="param"),
    "projection-left": dict(subspace="projection", proj_type="randperm", proj_side="left"),
    "svd": dict(subspace="projection", proj_type="svd"),
    # free_scale="matched" (optim.free_scale): on fragments, sums over ranks counted once each
    # (right: boundary rows; left: replicated U; columns: phantom entries)
    "projection-matched": dict(subspace="projection", proj_type="random", proj_side="right",
                               free_scale="matched"),
    "projection-left-matched": dict(subspace="projection", proj_type="randperm",
                                    proj_side="left", free_scale="matched"),
    "columns-matched": dict(subspace="coordinate", coord_choice="columns", free_scale="matched"),
    # density_final (optim.density_schedule): rho 0.5 -> 0.1 over 16 steps, so the subspace
    # shrinks at the refreshes of every launch (gap 4: 0.5, 0.375, 0.25; gap 8: 0.5, 0.3, 0.1)
    "block-decay": dict(subspace="block", block_order="descending", **DECAY),
    "columns-decay": dict(subspace="coordinate", coord_choice="columns", **DECAY),
    "projection-decay": dict(subspace="projection", proj_type="random", **DECAY),
    "svd-decay": dict(subspace="projection", proj_type="svd", **DECAY),
    # state_free="swan" (core.swan, optim.matrix_free): the whole-matrix state-free rule on
    # replicated parameters (DDP), every rank whitening the exact mean gradient / residual
    "block-d0-swan": dict(subspace="block", density=0.0, state_free="swan"),
    "projection-swan": dict(subspace="projection", proj_type="random", state_free="swan"),
    "columns-loss": dict(subspace="coordinate", coord_choice="columns", **LOSS_DRIVEN),
    "projection-loss": dict(subspace="projection", proj_type="random", **LOSS_DRIVEN),
}  # fmt: skip


def pick(*names: str) -> dict[str, dict]:
    return {n: SUBSPACES[n] for n in names}


@contextlib.contextmanager
def count_svd_refreshes() -> Iterator[list[int]]:
    """Count the svd bases this process computes (``counter[0]``) inside the block: exact ones
    (``projection_selection``) and batched warm / randomized ones (``svd_bases``)."""
    import frugal_dist.optim.svd_refresh as sr

    counter = [0]
    exact, batched = sr.projection_selection, sr.svd_bases

    def counting_exact(*args, **kwargs):
        counter[0] += 1
        return exact(*args, **kwargs)

    def counting_batched(grads, *args, **kwargs):
        counter[0] += len(grads)
        return batched(grads, *args, **kwargs)

    sr.projection_selection, sr.svd_bases = counting_exact, counting_batched
    try:
        yield counter
    finally:
        sr.projection_selection, sr.svd_bases = exact, batched
