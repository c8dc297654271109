"""A slow, obviously correct FRUGAL step: the test oracle for every fast path and every engine.

One instance optimises one group of named parameters with one set of hyper-parameters. Each
parameter is handled on its own, with explicit dense objects: a bool mask for coordinate subspaces,
the matrix P for projections, full tensors for blocks. For parameter W with gradient G, at each
step (``s`` = steps taken before this one, T = ``update_gap``):

    if s % T == 0: choose subspace S_k, k = s // T; reset the state-full statistics if
                   ``reset_statistics`` (or if there are none yet); projections with
                   ``moment_transfer="rotate"`` carry them into the new basis instead
                   (``_carry_over``; the bias-correction count goes on)
    G_sf = down(G)                # block: G or nothing; coord: G[mask]; proj: P^T G | G P
    U    = StateFull(G_sf)        # rules.py equations, written out again here
    R    = G - up(G_sf)
    W   <- W * (1 - lr * wd)
    W   <- W - lr * s_p * up(U) - lr * s_p * s_i * StateFree(R)

``density_final`` (a decaying density, ``density``): refresh k is sized from
rho(k) = rho0 + (rho_F - rho0) min(1, k T / D) (``density``); block pointers move by each
refresh's own count.

``refresh_policy="loss"`` (``refresh_due`` / ``_take_refresh``, the project's own rule of
``optim.refresh_schedule`` written out again): every parameter refreshes at its step 0, then
``interval`` steps after its last refresh (``interval`` starts at T). At each refresh after the
first, the interval just ended is summarised as (mean of the losses ``observe_loss`` recorded
during it, its length); when two such summaries (L_a, T_a), (L_b, T_b) exist, the last two, the
gain (L_a - L_b) / max(|L_a|, 1e-12) * T / ((T_a + T_b) / 2) below ``refresh_threshold`` doubles
the interval, capped at ``update_gap_max``. The refresh index k counts the refreshes taken.

``block_order="gradnorm"`` (block): at a step where the parameters refresh, the active set is
``ref_gradnorm_blocks`` of every parameter's ``p.grad`` at that step (with voters: their mean);
it holds until the next refresh.

``free_scale="matched"`` (coordinate, projection) multiplies StateFree(R) by
s_t = RMS(U) / RMS(StateFree(R)) of that tensor and step (``_matched_scale``: U over its compact
entries, StateFree(R) over the entries outside the coordinate mask, or all m x n entries of a
projection; 1 where U is empty, 0 where StateFree(R) is all zero).

Majority vote (``residual_comm="sign"`` / ``"hierarchical"``): ``step(voters)`` takes, per
parameter name, the gradients of the N voters (ranks, or node means); ``p.grad`` is then their
mean and the state-free direction of a ``signsgd`` parameter is the vote of the voters' own
residuals instead of sign(R):

    F = sign(2 * #{k : R(g_k) >= 0} - N)      (0 where coordinates are selected, 0 on a tie)

``state_free="swan"``: StateFree(R) is SWAN's normalised, whitened R at unit RMS on the (m, n)
matrix (``core.reference_swan``, float64 with an eigendecomposition; ``subspace="coordinate"`` is
refused, as by FRUGAL).

``algorithm="adamw"`` is plain AdamW on every tensor, ``algorithm="state_full"`` the ``state_full``
rule (AdamW, SGDM or Lion) on every tensor; ``algorithm="signsgd"`` / ``"sgd"`` is the
state-free rule on every tensor (W <- W*(1-lr*wd) - lr*D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from frugal_dist.core.reference_selection import (
    ref_active_blocks,
    ref_coordinate_mask,
    ref_gradnorm_blocks,
    ref_projection,
)
from frugal_dist.core.reference_swan import ref_swan_direction
from frugal_dist.core.seeding import block_seed, coordinate_seed, projection_seed

SWAN_STEPS = 10  # Newton-Schulz steps of state_free="swan" (core.swan.NS_STEPS, stated again)


class ReferenceFRUGAL:
    """Reference FRUGAL for one group: ``step()`` reads ``p.grad`` of each named parameter."""

    def __init__(
        self,
        named_params: list[tuple[str, Tensor]],
        *,
        algorithm: str = "frugal",
        lr: float = 1e-3,
        density: float = 0.25,
        density_final: float | None = None,
        density_decay_steps: int | None = None,
        update_gap: int = 200,
        refresh_policy: str = "fixed",
        update_gap_max: int | None = None,
        refresh_threshold: float | None = None,
        subspace: str = "block",
        block_order: str = "descending",
        coord_choice: str = "columns",
        proj_type: str = "random",
        proj_side: str = "auto",
        state_full: str = "adamw",
        state_free: str = "signsgd",
        inactive_lr_scale: float = 1.0,
        proj_params_lr_scale: float = 1.0,
        reset_statistics: bool = True,
        moment_transfer: str = "none",
        free_scale: str = "fixed",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
        proj_precision: str = "auto",
        svd_method: str = "warm",
        random_device: str | torch.device | None = None,
    ) -> None:
        self.named_params = list(named_params)
        self.h = dict(
            algorithm=algorithm, lr=lr, density=density, update_gap=update_gap,
            subspace=subspace, block_order=block_order, coord_choice=coord_choice,
            proj_type=proj_type, proj_side=proj_side, state_full=state_full,
            state_free=state_free, s_i=inactive_lr_scale, s_p=proj_params_lr_scale,
            reset=reset_statistics, betas=betas, eps=eps, wd=weight_decay, seed=seed,
            svd_method=svd_method, random_device=random_device, transfer=moment_transfer,
            free_scale=free_scale, density_final=density_final,
            density_decay_steps=density_decay_steps, refresh_policy=refresh_policy,
            gap_cap=8 * update_gap if update_gap_max is None else update_gap_max,
            tau=0.01 if refresh_threshold is None else refresh_threshold,
        )  # fmt: skip
        if refresh_policy not in ("fixed", "loss"):
            raise ValueError(f"refresh_policy must be 'fixed' or 'loss', got {refresh_policy!r}")
        if refresh_policy == "loss" and density_final is not None:
            raise ValueError("refresh_policy='loss' cannot be combined with density_final")
        if density_final is not None and not reset_statistics and subspace != "block":
            raise ValueError("a decaying density with kept statistics needs subspace='block'")
        if free_scale not in ("fixed", "matched"):
            raise ValueError(f"free_scale must be 'fixed' or 'matched', got {free_scale!r}")
        if state_free == "swan" and algorithm == "frugal" and subspace == "coordinate":
            raise ValueError("state_free='swan' needs subspace='block' or 'projection'")
        if free_scale == "matched" and algorithm == "frugal" and subspace == "block":
            raise ValueError("free_scale='matched' needs subspace='coordinate' or 'projection'")
        # ``proj_precision`` is accepted for keyword parity with FRUGAL: the oracle always runs
        # its products in float32 / float64 (tests bound the difference of tf32 / bf16 runs).
        del proj_precision
        names = [n for n, _ in self.named_params]
        self.block_seed = block_seed(seed, names)
        self.state: dict[str, dict] = {n: {"step": 0} for n in names}
        self.gradnorm_active: set[int] = set()  # block_order="gradnorm": the current choice

    def density(self, k: int) -> float:
        """The density that sizes refresh k: ``density``, or when ``density_final`` is set
        the linear decay rho0 + (rho_F - rho0) * min(1, k T / D) (D = density_decay_steps)."""
        h = self.h
        if h["density_final"] is None:
            return h["density"]
        step_of_refresh = k * h["update_gap"]
        progress = min(1.0, step_of_refresh / h["density_decay_steps"])
        return h["density"] + (h["density_final"] - h["density"]) * progress

    # ---------------------------------------------------------------------------- refreshes
    def refresh_due(self, name: str) -> tuple[bool, int]:
        """(does the next step of ``name`` refresh, its refresh index k)."""
        h, st = self.h, self.state[name]
        s = st["step"]
        if h["refresh_policy"] == "fixed":
            return s % h["update_gap"] == 0, s // h["update_gap"]
        taken = st.get("refreshes", [])
        if not taken:
            return True, 0
        due = s == taken[-1] + st["interval"]
        return due, len(taken) if due else len(taken) - 1

    def observe_loss(self, loss: float) -> None:
        """Record the loss of the step just taken (``refresh_policy="loss"``)."""
        if not math.isfinite(float(loss)):
            return
        for st in self.state.values():
            if "losses" in st:
                st["losses"].append(float(loss))

    def _take_refresh(self, name: str) -> None:
        """``refresh_policy="loss"``: record a refresh at this step; set the next interval."""
        h, st = self.h, self.state[name]
        s = st["step"]
        if "refreshes" not in st:
            st.update(refreshes=[s], interval=h["update_gap"], losses=[], intervals=[])
            return
        if not st["losses"]:
            raise ValueError(f"no loss observed before the refresh of {name!r} at step {s}")
        length = s - st["refreshes"][-1]
        st["intervals"].append((sum(st["losses"]) / len(st["losses"]), length))
        if len(st["intervals"]) >= 2:
            (l_a, t_a), (l_b, t_b) = st["intervals"][-2:]
            gain = (l_a - l_b) / max(abs(l_a), 1e-12) * h["update_gap"] / ((t_a + t_b) / 2)
            if gain < h["tau"]:
                st["interval"] = min(2 * st["interval"], h["gap_cap"])
        st["refreshes"].append(s)
        st["losses"] = []

    # ---------------------------------------------------------------------------- the rules
    def _state_full(self, st: dict, g: Tensor) -> Tensor:
        h = self.h
        b1, b2 = h["betas"]
        st["t"] += 1
        t = st["t"]
        if h["state_full"] == "adamw" or h["algorithm"] == "adamw":
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            m_hat = st["m"] / (1 - b1**t)
            return m_hat / (st["v"].sqrt() / math.sqrt(1 - b2**t) + h["eps"])
        if h["state_full"] == "sgdm":
            st["m"] = b1 * st["m"] + g
            return st["m"].clone()
        if h["state_full"] == "lion":
            d = torch.sign(b1 * st["m"] + (1 - b1) * g)
            st["m"] = b2 * st["m"] + (1 - b2) * g
            return d
        raise ValueError(h["state_full"])

    def _state_free(self, r: Tensor, rule: str) -> Tensor:
        if rule == "signsgd":
            return torch.sign(r)
        if rule == "sgd":
            return r
        if rule == "swan":
            return ref_swan_direction(r, SWAN_STEPS)
        return torch.zeros_like(r)

    @staticmethod
    def _zero_stats(st: dict, like: Tensor) -> None:
        st["m"] = torch.zeros_like(like)
        st["v"] = torch.zeros_like(like)
        st["t"] = 0

    @staticmethod
    def _carry_over(st: dict, side: str, p_old: Tensor, p_new: Tensor) -> None:
        """``moment_transfer="rotate"``: the moments move from the basis ``p_old`` to ``p_new``
        (the step count ``t`` goes on). First moment: lifted to the full space with the old
        basis, projected with the new one (left m' = P_new^T (P_old m), right
        m' = (m P_old^T) P_new). Second moment: each new coordinate is a combination
        sum_j c_ij x_j of the old ones with c_ij = <p_new_i, p_old_j>, whose mean square under
        independent coordinates is sum_j c_ij^2 v_j, written entry by entry."""
        p_old, p_new = p_old.double(), p_new.double()
        m, v = st["m"].double(), st["v"].double()
        if side == "left":
            st["m"] = (p_new.T @ (p_old @ m)).float()
        else:
            st["m"] = ((m @ p_old.T) @ p_new).float()
        r_new, r_old = p_new.shape[1], p_old.shape[1]
        out = torch.zeros((r_new, v.shape[1]) if side == "left" else (v.shape[0], r_new),
                          dtype=torch.float64, device=v.device)  # fmt: skip
        for i in range(r_new):
            for j in range(r_old):
                c2 = float(torch.dot(p_new[:, i], p_old[:, j])) ** 2
                if side == "left":
                    out[i] += c2 * v[j]
                else:
                    out[:, i] += c2 * v[:, j]
        st["v"] = out.float()

    @staticmethod
    def _matched_scale(kind: str, u: Tensor, free: Tensor, mask: Tensor | None) -> float:
        """``free_scale="matched"``: s_t = RMS(U) / RMS(F), in float64. U: the compact
        state-full direction (every entry); F: the state-free direction on the entries it
        moves (coordinates: outside the mask; projections: all m x n). No state-full entries:
        1; F all zero: 0."""
        f = free.double() if mask is None else free.double()[~mask]
        if u.numel() == 0:
            return 1.0
        rms_u = math.sqrt(float((u.double() ** 2).sum()) / u.numel())
        sum_f = float((f**2).sum())
        if sum_f == 0.0:
            return 0.0
        return rms_u / math.sqrt(sum_f / f.numel())

    # ---------------------------------------------------------------------------- the step
    @staticmethod
    def _vote(residuals: list[Tensor]) -> Tensor:
        """sign(2 * ones - N) of the voters' residuals, a non-negative entry voting +1."""
        ones = torch.zeros_like(residuals[0], dtype=torch.int64)
        for r in residuals:
            ones += (r >= 0).to(torch.int64)
        return torch.sign((2 * ones - len(residuals)).to(torch.float32))

    @torch.no_grad()
    def step(self, voters: dict[str, list[Tensor]] | None = None) -> None:
        """One step; ``voters``: per parameter name, the voters' gradients (module docstring)."""
        h = self.h
        gradnorm = h["subspace"] == "block" and h["block_order"] == "gradnorm"
        due = {n: self.refresh_due(n) for n, p in self.named_params if p.grad is not None}
        if gradnorm and h["algorithm"] == "frugal" and any(r for r, _ in due.values()):
            grads = [p.grad for _, p in self.named_params]
            k = min(k for r, k in due.values() if r)
            self.gradnorm_active = ref_gradnorm_blocks(grads, self.density(k))
        for idx, (name, p) in enumerate(self.named_params):
            if p.grad is None:
                continue
            st = self.state[name]
            s = st["step"]
            refresh, k = due[name]
            if refresh and h["refresh_policy"] == "loss" and h["algorithm"] == "frugal":
                self._take_refresh(name)
            st["step"] = s + 1
            m = p.shape[0] if p.dim() >= 2 else 1  # the (d0, d1*d2*...) matrix; 1-D: (1, n)
            n = p.numel() // m
            g = p.grad.detach().float().reshape(m, n)
            w = p.detach().float().reshape(m, n)
            w = w * (1 - h["lr"] * h["wd"])

            if h["algorithm"] in ("adamw", "state_full"):
                if s == 0:
                    self._zero_stats(st, g)
                w = w - h["lr"] * self._state_full(st, g)
            elif h["algorithm"] in ("signsgd", "sgd"):
                w = w - h["lr"] * self._state_free(g, h["algorithm"])
            else:
                kind = h["subspace"]
                if kind == "block":
                    active = (
                        idx in self.gradnorm_active
                        if gradnorm
                        else idx in ref_active_blocks(
                            len(self.named_params), self.density(k), h["block_order"],
                            self.block_seed, k,
                            density_of=self.density if h["density_final"] is not None else None,
                        )
                    )  # fmt: skip
                    g_sf = g if active else None
                    if refresh:
                        if active and (h["reset"] or "m" not in st):
                            self._zero_stats(st, g)
                        if not active:
                            for key in ("m", "v", "t"):
                                st.pop(key, None)
                    if active:
                        up_u = self._state_full(st, g)
                        r = torch.zeros_like(g)
                        residual = None  # active blocks are reduced exactly: no vote
                    else:
                        up_u = torch.zeros_like(g)
                        r = g
                        residual = lambda gv: gv  # noqa: E731
                elif kind == "coordinate":
                    if refresh:
                        st["mask"] = ref_coordinate_mask(
                            (m, n), self.density(k), h["coord_choice"],
                            coordinate_seed(h["seed"], name, k),
                        ).to(g.device)  # fmt: skip
                    mask = st["mask"]
                    g_sf = g[mask]  # row-major order
                    if refresh and (h["reset"] or "m" not in st):
                        self._zero_stats(st, g_sf)
                    u = self._state_full(st, g_sf)
                    up_u = torch.zeros_like(g)
                    up_u[mask] = u
                    r = g.clone()
                    r[mask] = 0.0

                    def residual(gv: Tensor, mask: Tensor = mask) -> Tensor:
                        out = gv.clone()
                        out[mask] = 0.0
                        return out

                else:  # projection
                    old = st["P"][1] if refresh and "P" in st else None
                    if refresh:
                        prev = st["P"][1] if "P" in st else None
                        st["P"] = ref_projection(
                            (m, n), self.density(k), h["proj_type"], h["proj_side"],
                            projection_seed(h["seed"], name, k), grad=g,
                            svd_method=h["svd_method"], previous=prev,
                            random_device=h["random_device"],
                        )  # fmt: skip
                    side, P = st["P"]
                    P = P.to(g.device)
                    g_sf = P.T @ g if side == "left" else g @ P
                    carry = h["transfer"] == "rotate" and "m" in st and old is not None
                    if refresh and carry:
                        self._carry_over(st, side, old.to(g.device), P)
                    elif refresh and (h["reset"] or "m" not in st):
                        self._zero_stats(st, g_sf)
                    u = self._state_full(st, g_sf)
                    up_u = P @ u if side == "left" else u @ P.T
                    up_g = P @ g_sf if side == "left" else g_sf @ P.T
                    r = g - up_g

                    def residual(gv: Tensor, side: str = side, P: Tensor = P) -> Tensor:
                        if side == "left":
                            return gv - P @ (P.T @ gv)
                        return gv - (gv @ P) @ P.T

                free = self._state_free(r, h["state_free"])
                vs = None if voters is None else voters.get(name)
                if vs is not None and residual is not None and h["state_free"] == "signsgd":
                    free = self._vote([residual(v.float().reshape(m, n)) for v in vs])
                    if kind == "coordinate":
                        free[mask] = 0.0
                if h["free_scale"] == "matched":
                    free = free * self._matched_scale(kind, u, free, mask if kind == "coordinate"
                                                      else None)  # fmt: skip
                w = w - h["lr"] * h["s_p"] * up_u - h["lr"] * h["s_p"] * h["s_i"] * free
            p.copy_(w.reshape(p.shape).to(p.dtype))
