"""``RSO``: randomized subspace optimization (Chen et al., ICML 2025) as a torch optimizer.

The model is first transformed (``frugal_dist.optim.rso_layers.apply_rso``): each targeted weight
W becomes frozen and gains a trainable B (m x r) acting through a random P_k (n x r). Training is
a sequence of outer iterations k = 0, 1, ...; each runs ``inner_steps`` = K Adam steps on the
sub-problem

    min_B  f(W_k + B P_k^T) + (prox / 2) ||B||^2            (prox = 1/eta; 0 disables the term)

    g   = dL/dB + prox * B                  (dL/dB = G P_k: the full gradient G projected)
    m   = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   t = steps since the outer start
    B  <- (1 - lr * wd) B - lr * s_p * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    c  <- (1 - lr * wd) c                   (c = 1 at the outer start; the layer uses c W)

and then merges, ``W_{k+1} = c W_k + B P_k^T``, draws P_{k+1} and starts again from B = 0, c = 1
with fresh Adam moments (bias correction restarts).

Step size on W: with Gaussian P (entries N(0, 1/r), so P^T P ~ (n / r) I_r) an Adam step dB
moves the layer's weight by dW = dB P^T with RMS(dW) ~ RMS(dB): the same per-entry step as AdamW
at the same lr, independent of r and n. Haar-orthonormal P (P^T P = I_r) gives
RMS(dW) = sqrt(r / n) RMS(dB), as GaLore-style projections. ``proj_params_lr_scale`` = s_p
(default 1, the paper's) multiplies B's step only -- for Adam the same as drawing s_p P instead
of P (up to eps) -- so the RSO layers' step can be tuned apart from the AdamW parameters'
(embeddings, head, norms); weight decay is not scaled (as FRUGAL's s_p). ``reset_statistics``
(default True: a fresh Adam per sub-problem) False keeps m, v and t across outer iterations
(GaLore's choice at a subspace change): no bias-corrected, sign-like first steps after each
merge, but m (in the previous P's coordinates) acts along a random direction of the new subspace
until it decays.

``prox``: the paper's sub-problem has the proximal term (1 / 2 eta) ||B||^2 with eta_k = 1 / (2 L)
for an L-smooth loss; L is unknown for a network, so ``prox`` (= 1 / eta = 2 L) is a
hyper-parameter, 0 by default (no proximal term: plain Adam on B, which restarts from B = 0 at each
outer iteration anyway). ``weight_decay`` (decoupled, as AdamW) applies to every parameter, RSO
layers included: their effective weight c W + B P^T decays by (1 - lr * wd) each step exactly as a
full weight under AdamW (B directly, W through the layer's scale c, folded into W at the merge),
so RSO and the AdamW / FRUGAL baselines are compared at the same weight decay. Parameters outside
the RSO layers (embeddings, LM head, norms, biases, untargeted weights) use AdamW.

Every update is elementwise, so the optimizer runs unchanged on whatever tensors an engine hands
it: the module's own B (single process, DDP, ZeRO-0 fp32), FSDP2 DTensor shards, ZeRO-1/2 flat
fp32 partitions or ZeRO-3 sub-group partitions -- no layout binding is needed. At a boundary
(step count divisible by K) it asks each layer to merge: at once if it updated the module's own B
(``RSOLinear.merge_``), otherwise at the layer's next forward once the engine has copied the new B
into the module (see ``rso_layers``). At the first step of the next outer iteration it zeroes its
own copy of B and the moments.

Communication: none beyond the engine's. Under DDP / ZeRO / FSDP2 only B's gradients exist, so the
gradient all-reduce (reduce-scatter) carries m x r per layer instead of m x n; P is derived from
(seed, layer name, k) on every rank; the merge is local.

State (tensors only, per optimizer tensor): ``step`` (total steps), ``outer`` (outer iteration of
the current B), ``adam_step`` (t), ``exp_avg``, ``exp_avg_sq``; RSO tensors also ``w_scale`` (c,
float64). The outer-iteration counter is
thus in ``state_dict()``; a resume mid outer iteration continues exactly (P is regenerated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from frugal_dist.optim.rso_layers import LAYER_KEYS, RSOLinear, apply_rso_from_options, rso_layers
from frugal_dist.optim.validation import check_group_keys

RSO_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, inner_steps=200, prox=0.0,
    proj_params_lr_scale=1.0, reset_statistics=True, rso=False,
)  # fmt: skip
SCALARS = ("step", "outer", "adam_step")
GROUP_KEYS = frozenset(RSO_DEFAULTS) | {"params", "names", "name", "initial_lr"}


class RSO(Optimizer):
    """RSO optimizer (see the module docstring for the update and the merge).

    Args:
        params: param groups; groups with ``rso=True`` hold the B parameters of RSO layers and
            must carry ``names`` (``"<layer name>.B"``), as made by ``rso_param_groups``.
        layers: the ``RSOLinear`` layers by name (``rso_layers(model)``).
        lr, betas, eps: Adam's; ``weight_decay``: decoupled, on every parameter (RSO layers:
            on the effective weight c W + B P^T, see the module docstring).
        inner_steps: K >= 1, Adam steps per outer iteration (then merge and redraw P).
        prox: coefficient of the proximal term (prox / 2) ||B||^2 = 1 / eta (the paper's
            eta_k = 1 / (2 L)); 0: none (default).
        proj_params_lr_scale: s_p > 0, multiplier of B's step (RSO groups only; 1: the paper's).
        reset_statistics: True (default): m, v and t restart at each outer iteration; False:
            they carry over (B still restarts from 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        *,
        layers: Mapping[str, RSOLinear] | None = None,
        **kwargs: Any,
    ) -> None:
        if lr is not None:  # RSOOptimizer(params, 1e-3), as torch.optim
            kwargs["lr"] = lr
        unknown = set(kwargs) - set(RSO_DEFAULTS)
        if unknown:
            raise ValueError(
                f"RSO(...) got unknown arguments {sorted(unknown)}; allowed: "
                f"{sorted(set(RSO_DEFAULTS) - {'rso'})} and the layer keys {list(LAYER_KEYS)}. "
                "FRUGAL's options do not apply: give RSO its own optimizer section (e.g. "
                "--config <model>.yaml --config configs/presets/rso.yaml)"
            )
        defaults = {**RSO_DEFAULTS, **kwargs}
        self._layers: dict[str, RSOLinear] = dict(layers or {})
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_group_keys(param_group, GROUP_KEYS, "RSO param group")
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g["betas"] = tuple(g["betas"])
        _validate(g)
        if g["rso"]:
            names = g.get("names")
            if names is None or len(names) != len(g["params"]):
                raise ValueError("an rso=True group needs 'names' (one '<layer>.B' per param); "
                                 "build the groups with rso_param_groups(model)")  # fmt: skip
            missing = [n for n in names if n.removesuffix(".B") not in self._layers]
            if missing:
                raise ValueError(f"RSO: no layer for {missing[:3]}; pass layers=rso_layers(model)")

    def group_layers(self, group: dict[str, Any]) -> list[RSOLinear]:
        return [self._layers[n.removesuffix(".B")] for n in group.get("names", [])]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["params"]:
                continue
            if group["lr"] == 0 and all(_zero_grad(p) for p in group["params"]):
                for p in group["params"]:  # lr 0, zero gradients (DCP materialising): state only
                    self._state(p)
                continue
            for p in group["params"]:
                self._update(p, group)
            if group["rso"]:
                self._after_rso_group(group)
        return loss

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        st = self.state[p]
        if not st:
            for key in SCALARS:
                st[key] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        st = self._state(p)
        k_steps = group["inner_steps"]
        s = int(st["step"].item())
        if group["rso"] and s // k_steps > int(st["outer"].item()):  # first step of a new outer
            p.zero_()
            if group["reset_statistics"]:
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
                st["adam_step"].zero_()
            st["outer"].fill_(s // k_steps)
            if "w_scale" in st:
                st["w_scale"].fill_(1.0)
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if grad.dtype != p.dtype:
            grad = grad.to(p.dtype)
        if group["rso"] and group["prox"]:
            grad = grad.add(p, alpha=group["prox"])
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        if group["weight_decay"]:
            p.mul_(1.0 - lr * group["weight_decay"])
        if group["rso"]:  # c: W's share of the decay, applied by the layer (c W) and at the merge
            if "w_scale" not in st:
                st["w_scale"] = torch.ones((), dtype=torch.float64)
            if group["weight_decay"]:
                st["w_scale"].mul_(1.0 - lr * group["weight_decay"])
        st["adam_step"] += 1
        t = int(st["adam_step"].item())
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(b1).add_(grad, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = (v.sqrt() / ((1.0 - b2**t) ** 0.5)).add_(eps)
        s_p = group["proj_params_lr_scale"] if group["rso"] else 1.0
        p.addcdiv_(m, denom, value=-lr * s_p / (1.0 - b1**t))
        st["step"] += 1

    def _after_rso_group(self, group: dict[str, Any]) -> None:
        steps = [int(self.state[p]["step"].item()) for p in group["params"] if p in self.state]
        if not steps:
            return
        s, k_steps = max(steps), group["inner_steps"]
        own = {id(p) for p in group["params"]}
        scale = self._w_scale(group)
        for layer in self.group_layers(group):
            layer.w_scale = scale
            layer.target_outer = s // k_steps
            if s % k_steps == 0 and id(layer.B) in own and layer.outer < layer.target_outer:
                layer.merge_()  # the optimizer updated the module's own B: merge now

    def _w_scale(self, group: dict[str, Any]) -> float:
        """c of an RSO group's current outer iteration (the same in every tensor's state)."""
        for p in group["params"]:
            st = self.state.get(p)
            if st and "w_scale" in st:
                return float(st["w_scale"].item())
        return 1.0

    def outer_iteration(self) -> int:
        """The outer iteration the optimizer is in (max over its RSO tensors; 0 before step 1)."""
        out = 0
        for g in self.param_groups:
            if g["rso"]:
                for p in g["params"]:
                    if p in self.state:
                        out = max(out, int(self.state[p]["step"].item()) // g["inner_steps"])
        return out

    def sync_layers(self) -> None:
        """Tell every layer the optimizer's outer iteration (after loading state)."""
        for g in self.param_groups:
            if g["rso"]:
                steps = [int(self.state[p]["step"].item()) for p in g["params"] if p in self.state]
                target = max(steps, default=0) // g["inner_steps"]
                outers = [
                    int(self.state[p]["outer"].item()) for p in g["params"] if p in self.state
                ]
                scale = self._w_scale(g)
                for layer in self.group_layers(g):
                    layer.target_outer = target
                    # c belongs to the B of outer iteration ``outer``: the layer uses it until it
                    # has merged that B (a merge resets the layer's c to 1)
                    layer.w_scale = scale if layer.outer == max(outers, default=0) else 1.0

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (local shards of DTensors)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    local = v.to_local() if hasattr(v, "to_local") else v
                    total += local.numel() * local.element_size()
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` (counters stay float32 on the CPU); sync the layers. Groups
        saved before ``proj_params_lr_scale`` / ``reset_statistics`` existed get the defaults
        (the behaviour they were trained with)."""
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            for key in ("proj_params_lr_scale", "reset_statistics"):
                g.setdefault(key, RSO_DEFAULTS[key])
        saved = state_dict["state"]
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid in saved and p in self.state:
                for key in SCALARS:
                    if key in saved[pid]:
                        self.state[p][key] = saved[pid][key].detach().to("cpu", torch.float32)
                if "w_scale" in saved[pid]:
                    self.state[p]["w_scale"] = (
                        saved[pid]["w_scale"].detach().to("cpu", torch.float64)
                    )
        self.sync_layers()

    def reset_counters(self) -> None:
        """Forget all state and return every layer to outer iteration 0 (only valid while every B
        is still zero, e.g. after an engine's warm-up step at lr 0)."""
        self.state.clear()
        for layer in self._layers.values():
            layer.set_outer(0)
            layer.target_outer = 0
            layer.w_scale = 1.0


def _zero_grad(p: Tensor) -> bool:
    g = p.grad
    if g is None:
        return True
    g = g.to_local() if hasattr(g, "to_local") else g
    return not bool(g.any())


def _validate(g: dict[str, Any]) -> None:
    if not isinstance(g["inner_steps"], int) or isinstance(g["inner_steps"], bool) or \
            g["inner_steps"] < 1:  # fmt: skip
        raise ValueError(f"inner_steps must be an integer >= 1, got {g['inner_steps']!r}")
    if g["lr"] < 0:
        raise ValueError(f"lr must be >= 0, got {g['lr']!r}")
    if g["prox"] < 0:
        raise ValueError(f"prox must be >= 0 (coefficient of ||B||^2 / 2), got {g['prox']!r}")
    if g["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be >= 0, got {g['weight_decay']!r}")
    s_p = g["proj_params_lr_scale"]
    if isinstance(s_p, bool) or not isinstance(s_p, (int, float)) or not s_p > 0:
        raise ValueError(f"proj_params_lr_scale must be a number > 0 (multiplier of B's step), "
                         f"got {s_p!r}")  # fmt: skip
    if not isinstance(g["reset_statistics"], bool):
        raise ValueError(f"reset_statistics must be True or False, got {g['reset_statistics']!r}")
    b1, b2 = g["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {g['betas']!r}")


def rso_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups: ``rso=True`` with every RSO layer's B, ``rso=False`` with every other
    trainable parameter (AdamW). Frozen W are in neither."""
    layer_of_b = {id(m.B): n for n, m in rso_layers(model).items()}
    if not layer_of_b:
        raise ValueError("the model has no RSO layers: call apply_rso(model, ...) first")
    rso_g: dict[str, Any] = {"params": [], "names": [], "rso": True}
    other: dict[str, Any] = {"params": [], "names": [], "rso": False}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = rso_g if id(p) in layer_of_b else other
        g["params"].append(p)
        g["names"].append(f"{layer_of_b[id(p)]}.B" if g is rso_g else name)
    return [g for g in (rso_g, other) if g["params"]]


def build_rso(model: nn.Module, **options: Any) -> RSO:
    """Transform ``model`` (if not done yet; layer keys ``targets``, ``rank``, ``density``,
    ``proj_type``, ``seed``) and build ``RSO`` with the remaining options."""
    layer_kw = {k: v for k, v in options.items() if k in LAYER_KEYS}
    opt_kw = {k: v for k, v in options.items() if k not in LAYER_KEYS}
    if "betas" in opt_kw:
        opt_kw["betas"] = tuple(opt_kw["betas"])
    apply_rso_from_options(model, layer_kw, seed=int(layer_kw.get("seed", 0)))
    return RSO(rso_param_groups(model), layers=rso_layers(model), **opt_kw)
