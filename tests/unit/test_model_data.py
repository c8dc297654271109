"""Unit tests for ``frugal_dist.train.model`` and ``frugal_dist.train.data`` (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from frugal_dist.train.data import (
    EXCLUDED_DIRS,
    ByteTokenizer,
    PackedDataset,
    embedded_token_stream,
    file_split,
    load_embedded,
    stdlib_corpus_files,
    stdlib_root,
)
from frugal_dist.train.model import (
    LLAMA_CONFIGS,
    DecoderLayer,
    LlamaConfig,
    LlamaForCausalLM,
    RMSNorm,
    build_model,
)

# ----------------------------------------------------------------------------- model


def _tiny(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return build_model("tiny", **overrides)


def test_forward_shapes_and_init_loss() -> None:
    model = _tiny()
    ids = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(1))
    logits, loss = model(ids, labels=ids)
    assert logits.shape == (3, 32, 257)
    assert loss is not None and loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(257)) < 0.1
    logits2, loss2 = model(ids)
    assert loss2 is None
    torch.testing.assert_close(logits, logits2)


def test_loss_is_shifted_next_token_ce() -> None:
    model = _tiny()
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(2))
    logits, loss = model(ids, labels=ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 257), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    labels = ids.clone()
    labels[:, 8:] = -100
    _, masked = model(ids, labels=labels)
    ref = F.cross_entropy(logits[:, :7].reshape(-1, 257), ids[:, 1:8].reshape(-1))
    torch.testing.assert_close(masked, ref)


def test_causality() -> None:
    model = _tiny()
    ids = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 257
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_too_long_sequence_rejected() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_parameter_names() -> None:
    model = _tiny()
    names = [n for n, _ in model.named_parameters()]
    per_layer = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    expected |= {f"layers.{i}.{s}" for i in range(2) for s in per_layer}
    assert set(names) == expected and len(names) == len(expected)
    assert not any(n.endswith("bias") for n in names)
    assert isinstance(model.layers, torch.nn.ModuleList)
    assert all(isinstance(layer, DecoderLayer) for layer in model.layers)
    assert isinstance(model.norm, RMSNorm)
    assert set(model.state_dict()) == expected  # rotary tables are non-persistent
    shapes = dict(model.named_parameters())
    assert shapes["layers.1.mlp.gate_proj.weight"].shape == (172, 64)
    assert shapes["layers.1.mlp.down_proj.weight"].shape == (64, 172)
    assert shapes["lm_head.weight"].shape == (257, 64)


def test_deterministic_init() -> None:
    a, b, c = _tiny(0), _tiny(0), _tiny(1)
    for (name, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters()
    ):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), name
            assert abs(pa.std().item() - 0.02) < 0.005, name


def test_tied_embeddings_and_num_params() -> None:
    untied = _tiny()
    tied = _tiny(tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 257 * 64
    assert tied.num_params(exclude_embeddings=True) == untied.num_params(exclude_embeddings=True)
    cfg = LLAMA_CONFIGS["tiny"]
    per_layer = 4 * cfg.dim**2 + 3 * cfg.dim * cfg.intermediate_size + 2 * cfg.dim
    assert untied.num_params() == 2 * 257 * 64 + cfg.n_layers * per_layer + cfg.dim


@pytest.mark.parametrize("name", ["60m", "130m", "350m", "1b", "7b", "small-cpu"])
def test_paper_configs_build_on_meta(name: str) -> None:
    cfg = LLAMA_CONFIGS[name]
    with torch.device("meta"):
        model = build_model(name)
    per_layer = 4 * cfg.dim**2 + 3 * cfg.dim * cfg.intermediate_size + 2 * cfg.dim
    total = 2 * cfg.vocab_size * cfg.dim + cfg.n_layers * per_layer + cfg.dim
    assert model.num_params() == total
    assert len(model.layers) == cfg.n_layers


def test_build_model_overrides_and_errors() -> None:
    model = build_model("tiny", max_seq_len=32)
    assert model.config.max_seq_len == 32 and model.rope_cos.shape == (32, 16)
    assert LLAMA_CONFIGS["tiny"].max_seq_len == 128  # the registry is not mutated
    cfg = LlamaConfig(
        vocab_size=50, dim=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=8
    )
    assert build_model(cfg).config == cfg
    with pytest.raises(KeyError):
        build_model("nope")
    with pytest.raises(ValueError):
        LlamaConfig(
            vocab_size=50, dim=30, n_layers=1, n_heads=4, intermediate_size=64, max_seq_len=8
        )


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def train_stream(tok: ByteTokenizer) -> torch.Tensor:
    return embedded_token_stream("train", tok, max_bytes=300_000)


def test_tokenizer_round_trip(tok: ByteTokenizer) -> None:
    assert tok.vocab_size == 257 and tok.eos_id == 256
    text = "def f(x):\n    return 'héllo ∑ 🚀'\n"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xFF]) == "\ufffd"


def test_corpus_files() -> None:
    files = stdlib_corpus_files()
    root = stdlib_root()
    assert len(files) > 100
    rels = [f.relative_to(root).as_posix() for f in files]
    assert rels == sorted(rels)
    assert all(r.endswith(".py") for r in rels)
    assert not any(set(r.split("/")[:-1]) & EXCLUDED_DIRS for r in rels)
    assert stdlib_corpus_files() == files
    splits = {r: file_split(r) for r in rels}
    val = {r for r, s in splits.items() if s == "val"}
    train = {r for r, s in splits.items() if s == "train"}
    assert val and train and not val & train and val | train == set(rels)
    assert len(val) < 0.1 * len(rels)


def test_stream_deterministic_and_capped(tok: ByteTokenizer, train_stream: torch.Tensor) -> None:
    assert train_stream.dim() == 1 and train_stream.dtype == torch.int64
    assert int((train_stream != tok.eos_id).sum()) == 300_000
    assert int((train_stream == tok.eos_id).sum()) >= 2
    assert int(train_stream.max()) <= 256 and int(train_stream.min()) >= 0
    again = embedded_token_stream("train", tok, max_bytes=300_000)
    assert torch.equal(train_stream, again)
    val = embedded_token_stream("val", tok, max_bytes=300_000)
    assert val.numel() > 1000 and not torch.equal(val[:1000], train_stream[:1000])
    with pytest.raises(ValueError):
        embedded_token_stream("dev", tok)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_batches_union_equals_global(train_stream: torch.Tensor, world_size: int) -> None:
    ds = PackedDataset(train_stream, seq_len=64, seed=5)
    bs = 3
    steps_per_epoch = len(ds) // (bs * world_size)
    for step in [0, 1, 7, steps_per_epoch, steps_per_epoch + 1, 3 * steps_per_epoch + 2]:
        parts = [ds.batch(step, bs, rank=r, world_size=world_size) for r in range(world_size)]
        assert all(p.shape == (bs, 64) and p.dtype == torch.int64 for p in parts)
        assert torch.equal(torch.cat(parts), ds.batch(step, bs * world_size))


def test_packed_dataset_deterministic_and_epochs() -> None:
    tokens = torch.arange(10 * 8 + 5)
    ds = PackedDataset(tokens, seq_len=8, seed=3)
    assert len(ds) == 10 and ds.num_tokens == 80
    assert torch.equal(ds[2], torch.arange(16, 24))
    other = PackedDataset(tokens, seq_len=8, seed=3)
    for step in range(12):
        assert torch.equal(ds.batch(step, 4), other.batch(step, 4))
    # Global stream = epoch-wise permutations; 5 steps of 4 = 2 full epochs.
    stream = torch.cat([ds.batch(s, 4) for s in range(5)])[:, 0] // 8
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # reshuffled per epoch
    assert not torch.equal(ds.batch(0, 10), PackedDataset(tokens, 8, seed=4).batch(0, 10))
    assert sorted(int(s[0]) // 8 for s in ds) == list(range(10))
    with pytest.raises(ValueError):
        ds.batch(0, 2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        PackedDataset(torch.arange(5), seq_len=8)


def test_sequences_are_real_text() -> None:
    train, val, tok = load_embedded(seq_len=128, seed=0, max_bytes=200_000)
    assert len(train) > 1000 and len(val) > 100
    text = "".join(tok.decode(row) for row in train.batch(0, 64))
    assert "def " in text
    val_text = "".join(tok.decode(row) for row in val.batch(0, 64))
    assert "def " in val_text or "class " in val_text or "import " in val_text
    model = _tiny()
    _, loss = model(train.batch(0, 2), labels=train.batch(0, 2))
    assert loss is not None and abs(loss.item() - math.log(257)) < 0.1
