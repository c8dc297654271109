#!/usr/bin/env python
"""The variants of ``quality.py`` (``--variants``): name -> the ``optimizer`` section each run
gets (lr, ``inactive_lr_scale`` and ``update_gap`` are added per run by ``quality.plan_runs``).


    adamw              torch AdamW
    galore             GaLore-style: svd projection rho=0.25, no state-free update
    badam              BAdam-style: block rho=0.25, no state-free update
    frugal_block       FRUGAL block (descending) rho=0.25, signSGD state-free
    frugal_block_gradnorm  block with block_order="gradnorm": at each refresh the rho * n
                       tensors of largest gradient norm are active (optim.block_gradnorm;
                       issue 19; not in the default list)
    frugal_columns     FRUGAL coordinate columns rho=0.25
    frugal_projection  FRUGAL svd projection rho=0.25 (the paper's; configs/presets)
    frugal_projection_random   the same with random projections (not in the default list)
    frugal_projection_exact    svd with the exact refresh and fp32 GEMMs (not in the default list)
    frugal_projection_random_exact  random, float64 CPU bases, fp32 GEMMs (not in the default list)
    frugal_projection_bf16         svd with bfloat16 projection GEMMs (not in the default list)
    frugal_projection_tf32         svd with TF32 projection GEMMs (not in the default list)
    frugal_projection_random_bf16  random with bfloat16 projection GEMMs (not in the default list)
    frugal_projection_rotate  svd with moment_transfer="rotate": moments carried into the new
                       basis at a refresh (project addition, issue 19; not in the default list)
    frugal_projection_matched  svd with free_scale="matched": the state-free step scaled per
                       tensor to RMS(U) / RMS(sign R) (optim.free_scale; issue 19; not in the
                       default list; sweep --inactive-lr-scales 1 too: s_i still multiplies)
    frugal_columns_matched     columns with free_scale="matched" (the same; not in the default list)
    frugal_projection_decay    svd with the density decaying linearly 0.25 -> 0.05 over the run
                       (density_final, density_decay_steps = the run's steps; AdaFRUGAL,
                       optim.density_schedule; issue 19; not in the default list)
    frugal_projection_adaT     svd with the loss-driven refresh interval (refresh_policy="loss",
                       refresh_threshold 0.02, update_gap_max 8 x --update-gap: T doubles when
                       the mean train loss improves less than 2 % per update gap; the project's
                       own rule, optim.refresh_schedule; issue 19; not in the default list)
    frugal_projection_matched_adaT  the two together (FRUGAL+ candidate; --inactive-lr-scales 1)
    frugal_projection_matched_sgd  matched with state_free="sgd": the raw residual R scaled per
                       tensor to RMS(U) (Fira's idea, Adam's output norm carried to the residual,
                       in FRUGAL's form; FRUGAL+ candidate; not in the default list)
    frugal_d0          FRUGAL rho=0 (AdamW on embeddings/head/norms, signSGD elsewhere)
    frugal_d0_swan     rho=0 with state_free="swan": every split weight takes SWAN's stateless
                       update (Ma et al., arXiv 2412.13148: rows standardised, whitened by
                       (N N^T)^{-1/2} with 10 Newton-Schulz steps, scaled to unit RMS like
                       sign) instead of signSGD; no state beyond frugal_d0's (core.swan; issue
                       19 FRUGAL+ target "rho 0 beats AdamW"; not in the default list). F has
                       sign's RMS, so s_i means what it means for frugal_d0; sweep
                       --inactive-lr-scales 0.1,1 (a 150-step tiny-cpu smoke run, 2 gloo ranks,
                       lr 3e-3, one seed: val 2.040 at s_i 1 vs 2.376 at 0.1; frugal_d0 2.389 /
                       2.390, AdamW 2.350 -- a toy, not a 60M result). Single GPU / DDP only
                       (refused under ZeRO / FSDP). Optimizer step: ~0.35 TFLOP of float32
                       GEMMs at 60M on top of frugal_d0's (docs/optimizer.md)
    rso                RSO rank 0.25 (skipped with a note if this checkout has no "rso" preset)

RSO screens (issue 19 part 2: why RSO trails GaLore-style / AdamW; not in the default list). Each
changes one thing against ``rso`` (Gaussian P ~ N(0, 1/r), Adam restarted at every merge,
``inner_steps`` = ``--update-gap``, no proximal term, the 7 attention/MLP Linears):

    rso_lr2x           B's step x 2 (``proj_params_lr_scale`` 2 = drawing 2P), AdamW parameters
                       (embeddings, head, norms) at lr: is the RSO layers' effective lr too small?
                       (Gaussian P already gives RMS(dW) ~ RMS(dB): the AdamW step size at equal lr)
    rso_orthonormal    Haar-orthonormal P (P^T P = I): isotropic sub-space, RMS(dW) = sqrt(r/n)
                       RMS(dB) = half the Gaussian step at density 0.25 (GaLore-style's scale)
    rso_orthonormal_lr2x  orthonormal P with B's step x 2 = sqrt(n/r): the Gaussian mean step
                       without its spread (P^T P's eigenvalues span (n/r)(1 -+ sqrt(r/n))^2 =
                       1..9 for r/n = 1/4): does the Gaussian's conditioning cost quality?
    rso_keep_moments   ``reset_statistics`` False: Adam's m, v, t carry over each merge (no
                       bias-corrected sign-like burst of full-lr steps after every merge)
    rso_inner50        ``inner_steps`` 50: 4x more sub-spaces (and restarts) per run
    rso_inner50_keep   ``inner_steps`` 50 with moments kept: more sub-spaces without the restarts
    rso_prox           proximal term prox = 1e-2 (the paper's (1 / 2 eta) ||B||^2 with 1 / eta =
                       1e-2: the pull prox * B matches a B-gradient entry of ~1e-4 at |B| ~ 1e-2)

Simulated data parallelism (issue 18, item 4; not in the default list): W ranks simulated in
each run's one process (``launchers/train.py --simulate_ranks=W``, ``frugal_dist.train.
simulated``): every step, W micro-batches of ``--batch-size / W`` sequences (the rows a real
W-rank run gives its ranks: the same tokens as the unsplit run), each rank's gradient clipped
to its own norm, then FRUGAL's own reduction (``reduce_gradients``) with the variant's
``residual_comm`` computed in process by ``FRUGAL.step_ranks`` -- the code of the distributed
step, checked against real gloo ranks by ``tests/distributed/test_simulated_ranks.py``. Each
measures, against the unsplit ``frugal_block`` / ``frugal_d0`` (rho 0.25 / 0):

    frugal_block_exact_w4    exact mean of 4 ranks' gradients: the unsplit run up to round-off
                       and per-rank clipping (each rank clips its own gradient) -- the cost of
                       splitting alone, the reference for the two below
    frugal_block_sign_w2     sign mode at 2 ranks: state-full part (active blocks, AdamW
                       params) exact mean, state-free residual the majority vote of the 2 ranks'
                       signs (a tie, +/- split, gives 0: no update of that entry)
    frugal_block_sign_w4     the same at 4 ranks (ties only at a 2-2 split)
    frugal_block_hier_2x2    hierarchical, 2 nodes x 2 ranks: exact mean inside each node,
                       then the vote of the 2 node means' signs (ties at 1-1)
    frugal_d0_exact_w4, frugal_d0_sign_w2, frugal_d0_sign_w4, frugal_d0_hier_2x2
                       the same at rho 0 (every split weight's whole gradient voted)

The cost of voting instead of sign(mean) is ``*_sign_wN`` (or ``*_hier_2x2``) minus
``*_exact_w4``; ``*_exact_w4`` minus the unsplit variant is the cost of micro-batching.
"""

from __future__ import annotations

from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "adamw": {"name": "adamw"},
    "galore": {"name": "galore", "density": 0.25},
    "badam": {"name": "badam", "density": 0.25},
    "frugal_block": {"name": "frugal", "subspace": "block", "block_order": "descending",
                     "density": 0.25},
    "frugal_columns": {"name": "frugal", "subspace": "coordinate", "coord_choice": "columns",
                       "density": 0.25},
    "frugal_projection": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                          "density": 0.25},
    "frugal_projection_random": {"name": "frugal", "subspace": "projection",
                                 "proj_type": "random", "density": 0.25},
    # the pre-kernel paths, for the quality guard of the fast defaults (issue 15): exact svd
    # refresh and fp32 GEMMs; random bases drawn in float64 on the CPU
    "frugal_projection_exact": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                                "density": 0.25, "svd_method": "exact",
                                "proj_precision": "fp32"},
    "frugal_projection_random_exact": {"name": "frugal", "subspace": "projection",
                                       "proj_type": "random", "density": 0.25,
                                       "proj_precision": "fp32", "proj_qr_device": "cpu"},
    "frugal_projection_bf16": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                               "density": 0.25, "proj_precision": "bf16"},
    "frugal_projection_tf32": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                               "density": 0.25, "proj_precision": "tf32"},
    "frugal_projection_random_bf16": {"name": "frugal", "subspace": "projection",
                                      "proj_type": "random", "density": 0.25,
                                      "proj_precision": "bf16"},
    # beyond the paper (issue 19): moments rotated into the new basis at each refresh
    "frugal_projection_rotate": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                                 "density": 0.25, "moment_transfer": "rotate"},
    # beyond the paper (issue 19): state-free step matched per tensor to the state-full RMS
    "frugal_projection_matched": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                                  "density": 0.25, "free_scale": "matched"},
    "frugal_columns_matched": {"name": "frugal", "subspace": "coordinate",
                               "coord_choice": "columns", "density": 0.25,
                               "free_scale": "matched"},
    # beyond the paper (issue 19, AdaFRUGAL): the density decays linearly over the run
    # (density_decay_steps: the run's steps, set in plan_runs)
    "frugal_projection_decay": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                                "density": 0.25, "density_final": 0.05},
    # beyond the paper (issue 19, AdaFRUGAL's loss-driven T; the rule is this project's own,
    # optim.refresh_schedule): threshold 0.02 because on quality_60m_40m's frugal_projection
    # train curve (seed 0, lr 3e-3; the loss logged every 10 steps, averaged per 200 steps)
    # the gain between consecutive 200-step means is 0.22, 0.077, 0.050, 0.034, 0.023, 0.026,
    # 0.028, 0.016, 0.021, 0.005, 0.011: T would first grow at step 1800 of that 2448-step run
    # (at 10 M tokens, 610 steps, the first decision is at step 400 and the early gains are
    # far above 0.02: expect frugal_projection's result there)
    "frugal_projection_adaT": {"name": "frugal", "subspace": "projection", "proj_type": "svd",
                               "density": 0.25, "refresh_policy": "loss",
                               "refresh_threshold": 0.02},
    "frugal_projection_matched_adaT": {"name": "frugal", "subspace": "projection",
                                       "proj_type": "svd", "density": 0.25,
                                       "free_scale": "matched", "refresh_policy": "loss",
                                       "refresh_threshold": 0.02},
    "frugal_projection_matched_sgd": {"name": "frugal", "subspace": "projection",
                                      "proj_type": "svd", "density": 0.25,
                                      "free_scale": "matched", "state_free": "sgd"},
    # beyond the paper (issue 19): the active blocks of a refresh chosen by gradient norm
    "frugal_block_gradnorm": {"name": "frugal", "subspace": "block", "block_order": "gradnorm",
                              "density": 0.25},
    "frugal_d0": {"name": "frugal", "subspace": "block", "density": 0.0},
    # beyond the paper (issue 19): SWAN's stateless update as the rho 0 state-free step
    "frugal_d0_swan": {"name": "frugal", "subspace": "block", "density": 0.0,
                       "state_free": "swan"},
    "rso": {"name": "rso", "density": 0.25},
    # RSO screens (issue 19 part 2; module docstring): one suspect each against "rso"
    "rso_lr2x": {"name": "rso", "density": 0.25, "proj_params_lr_scale": 2.0},
    "rso_orthonormal": {"name": "rso", "density": 0.25, "proj_type": "orthonormal"},
    "rso_orthonormal_lr2x": {"name": "rso", "density": 0.25, "proj_type": "orthonormal",
                             "proj_params_lr_scale": 2.0},
    "rso_keep_moments": {"name": "rso", "density": 0.25, "reset_statistics": False},
    "rso_inner50": {"name": "rso", "density": 0.25, "inner_steps": 50},
    "rso_inner50_keep": {"name": "rso", "density": 0.25, "inner_steps": 50,
                         "reset_statistics": False},
    "rso_prox": {"name": "rso", "density": 0.25, "prox": 1e-2},
}  # fmt: skip
RSO_SCREENS = ("rso_lr2x", "rso_orthonormal", "rso_orthonormal_lr2x", "rso_keep_moments",
               "rso_inner50", "rso_inner50_keep", "rso_prox")  # fmt: skip
# simulated data parallelism (module docstring): variant -> (base variant, residual_comm,
# simulated ranks W, ranks per node or None)
SIMULATED: dict[str, tuple[str, str, int, int | None]] = {
    f"{base}_{tag}": (base, comm, ranks, node)
    for base in ("frugal_block", "frugal_d0")
    for tag, comm, ranks, node in (("exact_w4", "exact", 4, None), ("sign_w2", "sign", 2, None),
                                   ("sign_w4", "sign", 4, None),
                                   ("hier_2x2", "hierarchical", 4, 2))
}  # fmt: skip
for _name, (_base, _comm, _, _) in SIMULATED.items():
    VARIANTS[_name] = {**VARIANTS[_base], "reduce_gradients": True, "residual_comm": _comm}
DEFAULT_VARIANTS = [
    v
    for v in VARIANTS
    if not v.startswith("frugal_projection_random")
    and v
    not in (
        "frugal_projection_exact",
        "frugal_projection_bf16",
        "frugal_projection_tf32",
        "frugal_projection_rotate",
        "frugal_projection_matched",
        "frugal_columns_matched",
        "frugal_block_gradnorm",
        "frugal_projection_decay",
        "frugal_projection_adaT",
        "frugal_projection_matched_adaT",
        "frugal_projection_matched_sgd",
        "frugal_d0_swan",
    )
    and v not in SIMULATED
    and v not in RSO_SCREENS
]

__all__ = ["DEFAULT_VARIANTS", "RSO_SCREENS", "SIMULATED", "VARIANTS"]
