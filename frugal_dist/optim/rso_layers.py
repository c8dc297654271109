"""RSO layers and the model transform: ``apply_rso(model, ...)`` before any engine wraps the model.

Each targeted ``nn.Linear`` (weight W, m x n) becomes an ``RSOLinear``:

    y = x W^T + (x P_k) B^T (+ bias)        W frozen, B (m x r) trainable, zero at each outer start

(see ``frugal_dist.core.rso`` for the autograd function that saves only ``x P_k``). The layer
keeps W as a frozen ``nn.Parameter`` (``requires_grad=False``), so ZeRO-3 and FSDP2 shard it like
any other weight while no engine ever reduces a gradient for it: under DDP, ZeRO and FSDP2 only
B's gradients (m x r instead of m x n) are all-reduced / reduce-scattered.

With weight decay the layer also carries c (``w_scale``, a host float the ``RSO`` optimizer sets
after each step: the product of (1 - lr * weight_decay) over the outer iteration's steps) and
computes ``y = c x W^T + (x P_k) B^T``: the effective weight c W + B P_k^T decays like any AdamW
weight, every step, without touching W until the merge.

Merge ``W <- c W + B P_k^T``, ``B <- 0``, ``c <- 1``, ``k <- k + 1`` at the end of each outer
iteration. The
``RSO`` optimizer decides when (every ``inner_steps`` steps); the merge itself runs where the
truth of B lives:

* *eager* -- the optimizer updates the module's own B (single process, DDP, ZeRO-0 fp32, FSDP2):
  ``merge_()`` right after the boundary step, on the local rows (DTensor: Shard(0) rows of W and B
  coincide, so ``W_local += B_local P^T`` needs no communication);
* *lazy* -- the optimizer updates fp32 master copies (ZeRO-0 bf16, ZeRO-1/2/3): the engine copies
  the new B into the module after ``step()``, so the layer merges at the start of its next forward
  (``target_outer > rso_outer``). Under ZeRO-3 W and B are gathered during forward: the merge
  updates the gathered tensors and this rank's partitions (``ds_tensor``) with the matching slice
  of ``B P^T`` -- again without communication.

``P_k`` is regenerated from ``(seed, layer name, k)`` on every rank; it is never saved or sent.
The buffer ``rso_outer`` (k) is part of the module's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from frugal_dist.core.rso import PROJ_TYPES, merge_delta, rso_linear, rso_projection, rso_rank
from frugal_dist.core.rso import rso_seed as _rso_seed

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_KEYS = ("targets", "rank", "density", "proj_type", "seed")


class RSOLinear(nn.Module):
    """A linear layer trained in random subspaces (see module docstring).

    Args:
        weight: the original W (m x n); kept (same Parameter object) and frozen.
        bias: the original bias or None (trained by the optimizer's AdamW group).
        rank: r, the subspace size (1 <= r <= n).
        name: the layer's name in the model (part of P's seed).
        seed: base seed shared by all ranks.
        proj_type: "gaussian" (N(0, 1/r)) or "orthonormal" (Haar, P^T P = I).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, rank: int, name: str,
                 seed: int = 0, proj_type: str = "gaussian") -> None:  # fmt: skip
        super().__init__()
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {list(PROJ_TYPES)}, got {proj_type!r}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        if not 1 <= rank <= self.in_features:
            raise ValueError(f"rank={rank} must be in [1, in_features={self.in_features}]")
        weight.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.rank, self.rso_name, self.rso_seed, self.proj_type = rank, name, int(seed), proj_type
        self.B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=weight.dtype, device=weight.device)
        )
        # on W's device: DDP broadcasts buffers with the process group's backend (NCCL: CUDA only)
        self.register_buffer("rso_outer", torch.zeros((), dtype=torch.int64, device=weight.device))
        self._outer = 0  # host mirror of rso_outer: no device sync in forward
        self.target_outer = 0  # set by the RSO optimizer; > rso_outer means a lazy merge is due
        self.w_scale = 1.0  # c, set by the RSO optimizer (weight decay of W since the last merge)
        self._proj: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"proj_type={self.proj_type}, bias={self.bias is not None}"
        )

    @property
    def outer(self) -> int:
        """k, the outer iteration whose projection P_k the layer currently uses."""
        return self._outer

    def set_outer(self, k: int) -> None:
        """Set k (buffer and host mirror)."""
        self.rso_outer.fill_(int(k))
        self._outer = int(k)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._outer = int(self.rso_outer.item())

    def projection(self, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> Tensor:
        """P_k (n x r) for the current outer iteration, cached per (k, dtype, device)."""
        key = (self.outer, dtype, torch.device(device))
        proj = self._proj.get(key)
        if proj is None:
            self._proj = {k: v for k, v in self._proj.items() if k[0] == key[0]}
            seed = _rso_seed(self.rso_seed, self.rso_name, key[0])
            base = rso_projection(self.in_features, self.rank, seed, self.proj_type)
            proj = self._proj[key] = base.to(device=key[2], dtype=dtype)
        return proj

    def forward(self, x: Tensor) -> Tensor:
        if self.target_outer > self.outer:
            self._merge_lazy()
        y = rso_linear(x, self.weight, self.projection(x.dtype, x.device), self.B, self.w_scale)
        # bias in y's dtype: under autocast y is in the compute dtype, as nn.Linear's output
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _check_step(self) -> None:
        if self.target_outer - self.outer > 1:
            raise RuntimeError(
                f"RSO layer {self.rso_name}: outer iteration {self.outer} but the optimizer is at "
                f"{self.target_outer}; load the module and optimizer state of the same checkpoint"
            )

    @torch.no_grad()
    def merge_(self) -> None:
        """Eager merge on the module's own tensors (dense, or DTensor row shards)."""
        w, b = self.weight, self.B
        if hasattr(w, "to_local"):  # FSDP2 DTensor: Shard(0) rows of W and B are the same rows
            w, b = w.to_local(), b.to_local()
            if w.shape[0] != b.shape[0]:
                raise RuntimeError(
                    f"{self.rso_name}: W and B row shards differ ({w.shape[0]} vs {b.shape[0]}); "
                    "shard both with Shard(0)"
                )
        delta = merge_delta(b, self.projection(torch.float32, w.device), w.dtype)
        if self.w_scale != 1.0:
            w.mul_(self.w_scale)
        w.add_(delta)
        b.zero_()
        self.w_scale = 1.0
        self.set_outer(self._outer + 1)
        self.target_outer = max(self.target_outer, self.outer)

    @torch.no_grad()
    def _merge_lazy(self) -> None:
        """Merge at the start of forward, with the B the engine copied into the module."""
        self._check_step()
        w, b = self.weight, self.B
        delta = merge_delta(b.data, self.projection(torch.float32, w.device), w.dtype)
        if hasattr(w, "ds_tensor"):  # ZeRO-3: full tensors gathered for forward + own partitions
            import torch.distributed as dist

            part = w.ds_tensor
            rank = dist.get_rank(group=getattr(w, "ds_process_group", None))
            start = rank * part.numel()
            n = max(0, min(part.numel(), w.ds_numel - start))
            if self.w_scale != 1.0:
                part.data[:n] *= self.w_scale
            part.data[:n] += delta.reshape(-1)[start : start + n].to(part.dtype)
            b.ds_tensor.data.zero_()
        if self.w_scale != 1.0:
            w.data.mul_(self.w_scale)
        w.data.add_(delta)
        b.data.zero_()
        self.w_scale = 1.0
        self.set_outer(self._outer + 1)


def apply_rso(
    model: nn.Module,
    targets: Iterable[str] = LLAMA_TARGETS,
    rank: int | None = None,
    density: float | None = 0.25,
    seed: int = 0,
    proj_type: str = "gaussian",
) -> dict[str, RSOLinear]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by an ``RSOLinear``
    (in place, before DDP / DeepSpeed / FSDP2 wrap the model); returns them by qualified name.

    Rank: ``rank`` if given, else ``round(density * in_features)``. A Hugging Face model's
    ``save_pretrained`` then writes the merged weights (``frugal_dist.optim.rso_export``).
    """
    targets = tuple(targets)
    if isinstance(targets, str) or not targets:
        raise ValueError("targets must be a non-empty list of module names, e.g. ['q_proj']")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {list(PROJ_TYPES)}, got {proj_type!r}")
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]  # fmt: skip
    if not found:
        raise ValueError(f"apply_rso: no nn.Linear named {list(targets)} in the model; set targets")
    out: dict[str, RSOLinear] = {}
    for name, lin in found:
        r = rso_rank(lin.in_features, rank, density)
        layer = RSOLinear(lin.weight, lin.bias, r, name, seed=seed, proj_type=proj_type)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], layer)
        out[name] = layer
    from frugal_dist.optim.rso_export import install_merged_save  # (it imports this module)

    install_merged_save(model)
    return out


def rso_layers(model: nn.Module) -> dict[str, RSOLinear]:
    """The ``RSOLinear`` layers of ``model`` by their RSO name (engine wrappers ignored)."""
    return {m.rso_name: m for m in model.modules() if isinstance(m, RSOLinear)}


def apply_rso_from_options(
    model: nn.Module, options: dict[str, Any], seed: int = 0
) -> dict[str, RSOLinear]:
    """``apply_rso`` with the layer keys of an optimizer config (``targets``, ``rank``,
    ``density``, ``proj_type``, ``seed``); a no-op returning the layers if already applied."""
    existing = rso_layers(model)
    if existing:
        return existing
    kw = {k: options[k] for k in LAYER_KEYS if k in options}
    kw.setdefault("seed", seed)
    if kw.get("rank") is not None:
        kw.setdefault("density", None)
    return apply_rso(model, **kw)
