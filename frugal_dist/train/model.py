"""A LLaMA-style decoder-only causal language model in plain PyTorch.

Module names follow Hugging Face's ``LlamaForCausalLM`` (without the ``model.`` prefix), so
parameter names look like ``embed_tokens.weight``, ``layers.0.self_attn.q_proj.weight``,
``layers.0.mlp.gate_proj.weight``, ``layers.0.input_layernorm.weight``, ``norm.weight`` and
``lm_head.weight``. Rotary embeddings use HF's "rotate_half" convention.

``LLAMA_CONFIGS`` holds the shapes used in the GaLore / FRUGAL pre-training experiments
(vocab 32000, sequence length 256) plus two small byte-level configs for CPU runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LLAMA_CONFIGS",
    "Attention",
    "DecoderLayer",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MLP",
    "RMSNorm",
    "build_model",
    "rope_cache",
]

INIT_STD = 0.02


@dataclass
class LlamaConfig:
    """Shape hyper-parameters of a LLaMA-style model."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Per-head width ``dim // n_heads``."""
        return self.dim // self.n_heads


LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "60m": LlamaConfig(32000, 512, 8, 8, 1376, 256),
    "130m": LlamaConfig(32000, 768, 12, 12, 2048, 256),
    "350m": LlamaConfig(32000, 1024, 24, 16, 2736, 256),
    "1b": LlamaConfig(32000, 2048, 24, 32, 5461, 256),
    "7b": LlamaConfig(32000, 4096, 32, 32, 11008, 256),
    # Byte-level (256 bytes + EOS) configs for quick CPU runs.
    "tiny": LlamaConfig(257, 64, 2, 4, 172, 128),
    "small-cpu": LlamaConfig(257, 128, 4, 4, 344, 256),
}


def rope_cache(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` tables of shape ``(seq_len, head_dim)`` in float32 (HF rotate_half layout)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, D)`` by tables of shape ``(T, D)``."""
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnable scale (no bias); computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension of ``x``."""
        dtype = x.dtype
        xf = x if x.dtype == torch.float64 else x.float()  # float32 at least
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        dim = config.dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, T, dim)``; ``cos``/``sin``: ``(T, head_dim)``."""
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: attention and MLP, each with a residual connection."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Run the block on ``x`` of shape ``(B, T, dim)``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Decoder-only causal LM; ``forward(input_ids, labels)`` returns ``(logits, loss)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialize deterministically: N(0, 0.02) for linears/embeddings, ones for norms.

        Also recomputes the rotary tables (useful after materializing a meta-device model).
        Draws happen in module-registration order, so a fixed ``torch.manual_seed`` gives
        identical weights.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        cfg = self.config
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute logits ``(B, T, vocab)`` and, if ``labels`` is given, the next-token loss.

        ``labels`` has the same shape as ``input_ids`` (usually equal to it); the shift is
        done here: ``logits[:, :-1]`` predicts ``labels[:, 1:]``. Entries equal to ``-100``
        are ignored. The loss is a float32 mean over the remaining positions.
        """
        _, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {self.config.max_seq_len}")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            if shift_logits.dtype != torch.float64:  # float32 at least
                shift_logits = shift_logits.float()
            shift_labels = labels[:, 1:].reshape(-1).long()
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied ``lm_head`` counted once).

        With ``exclude_embeddings`` the input embedding (and an untied ``lm_head``) is left out.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total


def build_model(name_or_config: str | LlamaConfig, **overrides: object) -> LlamaForCausalLM:
    """Build a model from a ``LLAMA_CONFIGS`` name or a ``LlamaConfig``, with field overrides.

    Example: ``build_model("tiny", max_seq_len=64)``. Seed with ``torch.manual_seed`` first
    for a reproducible init.
    """
    if isinstance(name_or_config, str):
        try:
            config = LLAMA_CONFIGS[name_or_config]
        except KeyError:
            raise KeyError(
                f"unknown model {name_or_config!r}; known: {sorted(LLAMA_CONFIGS)}"
            ) from None
    else:
        config = name_or_config
    config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
    return LlamaForCausalLM(config)
