"""What ``optimizer_step.py`` measures: LLaMA-130M-shaped parameters and gradients, the optimizer
variants, and the closed-form size of each variant's state.

Parameters are built directly with the shapes of LLaMA-130M (no model, no data); gradients are set
once from a fixed seed. The 2-D weights of the transformer layers form the ``"frugal"`` group,
embeddings, lm_head and the RMSNorm weights the ``"adamw"`` group (as in the paper).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
try:  # an installed (or PYTHONPATH) frugal_dist wins; else the checkout this file lives in
    import frugal_dist  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))
    import frugal_dist  # noqa: F401

from frugal_dist import FRUGAL  # noqa: E402

LLAMA_130M = dict(vocab=32000, dim=768, layers=12, heads=12, intermediate=2048)
LR = 1e-3
WEIGHT_DECAY = 0.0  # as FRUGAL's default; torch AdamW's default (1e-2) is overridden to match
PARAM_SEED = 0
GRAD_SEED = 1
FRUGAL_SEED = 0


# ---------------------------------------------------------------------------------------- shapes
def llama_param_specs(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, group) of every LLaMA parameter, in model order; group is frugal|adamw.

    Linear weights are (out_features, in_features) as in ``torch.nn.Linear``.
    """
    v, d, f = cfg["vocab"], cfg["dim"], cfg["intermediate"]
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (v, d), "adamw")]
    for i in range(cfg["layers"]):
        pre = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append((f"{pre}.self_attn.{proj}.weight", (d, d), "frugal"))
        specs.append((f"{pre}.mlp.gate_proj.weight", (f, d), "frugal"))
        specs.append((f"{pre}.mlp.up_proj.weight", (f, d), "frugal"))
        specs.append((f"{pre}.mlp.down_proj.weight", (d, f), "frugal"))
        specs.append((f"{pre}.input_layernorm.weight", (d,), "adamw"))
        specs.append((f"{pre}.post_attention_layernorm.weight", (d,), "adamw"))
    specs.append(("model.norm.weight", (d,), "adamw"))
    specs.append(("lm_head.weight", (v, d), "adamw"))
    return specs


# ------------------------------------------------------------------------- closed-form state size
def _mat(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def expected_frugal_bytes(
    specs: list[tuple[str, tuple[int, ...], str]],
    subspace: str,
    density: float,
    block_order: str = "descending",
    coord_choice: str = "columns",
) -> tuple[int, int]:
    """(state bytes, aux bytes) of FRUGAL during refresh 0, from the shapes alone.

    State (frugal.py): every parameter keeps ``step`` (float32 scalar, 4 B). The state-full part
    adds ``sf_step`` (4 B) and AdamW's ``exp_avg`` + ``exp_avg_sq`` (float32, 8 B per state-full
    coordinate):

    * adamw group: everything state-full -> 8 * numel + 4 + 4 per param.
    * block: a = round(rho * n) (Python round, half to even) active tensors -> 8 * numel + 4 each;
      inactive tensors keep only ``step``.
    * coordinate columns: every matrix keeps sf_step and an (m, int(rho*n)) pair of buffers
      (an empty (m, 0) pair at rho = 0); rows (int(rho*m), n); randk int(rho*m*n) (floor).
    * projection: r = round(rho * min(m, n)) (half to even); buffers (r, max) ->
      8 * r * max(m, n) + 4.

    Aux (rebuildable metadata): coordinate indices int64 (8 B per selected column/row/entry);
    random projection bases float32 (min(m, n), r) -> 4 * r * min(m, n); block: nothing.
    """
    state = aux = 0
    frugal = [shape for _, shape, g in specs if g == "frugal"]
    for _, shape, g in specs:
        if g == "adamw":
            state += 8 * math.prod(shape) + 4 + 4
    state += 4 * len(frugal)  # `step` of every frugal-group parameter
    if subspace == "block":
        n = len(frugal)
        a = round(density * n)
        if block_order == "descending":
            active = list(range(n - a, n))
        elif block_order == "ascending":
            active = list(range(a))
        elif block_order == "mirror":  # pairs {i, n-1-i} from both ends
            active = list(range(a // 2)) + list(range(n - a // 2, n))
        else:
            raise ValueError("closed form only for ascending/descending/mirror block orders")
        for i in active:
            state += 8 * math.prod(frugal[i]) + 4
    elif subspace == "coordinate":
        for shape in frugal:
            m, n = _mat(shape)
            if coord_choice == "columns":
                k = int(n * density)
                state += 8 * m * k + 4
            elif coord_choice == "rows":
                k = int(m * density)
                state += 8 * k * n + 4
            else:
                k = int(m * n * density)
                state += 8 * k + 4
            aux += 8 * k
    elif subspace == "projection":
        for shape in frugal:
            m, n = _mat(shape)
            r = round(density * min(m, n))
            state += 8 * r * max(m, n) + 4
            aux += 4 * r * min(m, n)
    else:
        raise ValueError(subspace)
    return state, aux


def expected_torch_adamw_bytes(params: list[torch.Tensor]) -> int:
    """torch.optim.AdamW: exp_avg + exp_avg_sq in the param dtype, float32 scalar ``step``."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


def torch_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


# --------------------------------------------------------------------------------------- variants
def variant_list() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        dict(
            name="adamw_foreach",
            label="torch AdamW (foreach)",
            kind="torch",
            opts=dict(foreach=True),
        ),
        dict(name="adamw_fused", label="torch AdamW (fused)", kind="torch", opts=dict(fused=True)),
    ]
    choice = {
        "block": dict(block_order="descending"),
        "coordinate": dict(coord_choice="columns"),
        "projection": dict(proj_type="random"),
    }
    what = {"block": "block desc", "coordinate": "coord columns", "projection": "proj random"}
    for sub in ("block", "coordinate", "projection"):
        for rho in (0.0, 0.25):
            out.append(
                dict(
                    name=f"frugal_{sub}_d{rho:g}",
                    label=f"FRUGAL {what[sub]} ρ={rho:g}",
                    kind="frugal",
                    subspace=sub,
                    density=rho,
                    opts=dict(subspace=sub, density=rho, **choice[sub]),
                )
            )
    out.append(
        dict(
            name="frugal_block_d1",
            label="FRUGAL block ρ=1 (diag.)",
            kind="frugal",
            subspace="block",
            density=1.0,
            diagnostic=True,
            opts=dict(subspace="block", density=1.0, block_order="descending"),
        )
    )
    return out


def make_optimizer(
    v: dict[str, Any], frugal_p: list, frugal_n: list, adamw_p: list, adamw_n: list, gap: int
) -> torch.optim.Optimizer:
    if v["kind"] == "torch":
        return torch.optim.AdamW(frugal_p + adamw_p, lr=LR, weight_decay=WEIGHT_DECAY, **v["opts"])
    groups = [
        {"params": frugal_p, "names": frugal_n, "algorithm": "frugal"},
        {"params": adamw_p, "names": adamw_n, "algorithm": "adamw"},
    ]
    return FRUGAL(
        groups,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        update_gap=gap,
        seed=FRUGAL_SEED,
        state_full="adamw",
        state_free="signsgd",
        **v["opts"],
    )


def build_tensors(specs, device, dtype):
    """Params (fixed seed), their initial values, and gradients set once (fixed seed)."""
    gen = torch.Generator(device=device)
    params, init = [], []
    gen.manual_seed(PARAM_SEED)
    for _, shape, _ in specs:
        t = torch.empty(shape, device=device, dtype=torch.float32)
        t.normal_(0.0, 0.02, generator=gen)
        p = torch.nn.Parameter(t.to(dtype))
        params.append(p)
        init.append(p.detach().clone())
    gen.manual_seed(GRAD_SEED)
    for p in params:
        g = torch.empty(p.shape, device=device, dtype=torch.float32)
        g.normal_(0.0, 1e-2, generator=gen)
        p.grad = g.to(dtype)
    return params, init
