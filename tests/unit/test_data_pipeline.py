"""The data pipeline (``frugal_dist.train.pipeline``): sources, tokenizers, packing, cache, resume.

Fast, offline, no /work/shared: every corpus and tokenizer is built in ``tmp_path``. The HF
streaming path is exercised with the packaged ``json`` builder on local files (the same
``load_hf_dataset`` call a hub dataset goes through).
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from frugal_dist.train.config import build_config
from frugal_dist.train.data import ByteTokenizer, PackedDataset
from frugal_dist.train.pipeline import build_data, validate_data_config
from frugal_dist.train.sources import (
    expand_files,
    hf_documents,
    holdout_split,
    iter_file_documents,
    load_hf_dataset,
)
from frugal_dist.train.streaming import StreamingPackedDataset
from frugal_dist.train.token_cache import file_tokens, tokenize_documents
from frugal_dist.train.tokenization import load_tokenizer

DOCS = [f"doc-{i:03d}| " + "abcdefgh"[i % 8] * (5 + 7 * (i % 5)) + " end." for i in range(120)]
DOC_ID = re.compile(r"doc-(\d{3})\|")


def _write_jsonl(path: Path, docs: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"id": i, "text": d}) + "\n")
    return path


def _corpus(tmp_path: Path, n_files: int = 2) -> list[Path]:
    per = len(DOCS) // n_files
    return [
        _write_jsonl(tmp_path / f"part-{k}.jsonl", DOCS[k * per : (k + 1) * per])
        for k in range(n_files)
    ]


def _ids_in(rows: torch.Tensor) -> set[int]:
    return {int(m) for m in DOC_ID.findall(ByteTokenizer().decode(rows.flatten()))}


class CountingTokenizer(ByteTokenizer):
    """A byte tokenizer that counts ``encode_batch`` calls (to prove a cache hit)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += 1
        return super().encode_batch(texts)


def _wordlevel_json(path: Path, with_eos: bool = True) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for d in DOCS for w in re.findall(r"\w+|[^\w\s]", d)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_eos:
        tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


# ----------------------------------------------------------------------------- packing


def test_packing_is_docs_plus_eos_cut_into_rows() -> None:
    tok = ByteTokenizer()
    tokens = tokenize_documents(DOCS[:10], tok, chunk_docs=3)
    expected = [b for d in DOCS[:10] for b in [*d.encode(), 256]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    ds = PackedDataset(tokens, seq_len=16, seed=0)
    assert len(ds) == len(expected) // 16
    for i in range(len(ds)):
        assert ds[i].tolist() == expected[i * 16 : (i + 1) * 16]
    batch = ds.batch(0, 4)
    assert batch.dtype == torch.int64 and batch.shape == (4, 16)


# ----------------------------------------------------------------------------- formats


def test_every_file_format_reads_the_same_documents(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:20]
    files = {
        "jsonl": _write_jsonl(tmp_path / "a.jsonl", docs),
        "gz": _write_jsonl(tmp_path / "a.jsonl.gz", docs, gzip.open),
        "xz": _write_jsonl(tmp_path / "a.jsonl.xz", docs, lzma.open),
    }
    pq.write_table(pa.table({"text": docs, "n": list(range(20))}), tmp_path / "a.parquet")
    files["parquet"] = tmp_path / "a.parquet"
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    for kind, path in files.items():
        assert list(iter_file_documents(path)) == docs, kind
    assert list(iter_file_documents(tmp_path / "a.txt", txt_split="blank_line")) == docs
    assert list(iter_file_documents(tmp_path / "a.txt")) == ["\n\n".join(docs) + "\n"]
    hf = load_hf_dataset("json", data_files=str(files["xz"]), split="train", streaming=True)
    assert list(hf_documents(hf)) == docs
    with pytest.raises(ValueError, match="text_field"):
        list(iter_file_documents(files["gz"], text_field="body"))
    with pytest.raises(ValueError, match="text_field"):
        list(iter_file_documents(files["parquet"], text_field="body"))
    with pytest.raises(ValueError, match="data.train_files: no file matches"):
        expand_files(str(tmp_path / "missing-*.jsonl"), "train_files")


# ----------------------------------------------------------------------------- files source


def test_files_source_world_size_invariant_and_held_out(tmp_path: Path) -> None:
    _corpus(tmp_path)
    cfg = {"source": "files", "train_files": str(tmp_path / "*.jsonl"), "val_fraction": 0.2}
    bundle = build_data(cfg, seq_len=24, seed=3)
    assert bundle.vocab_size == 257 and isinstance(bundle.train, PackedDataset)
    again = build_data(cfg, seq_len=24, seed=3)
    for step in range(4):
        full = bundle.train.batch(step, 8)
        assert torch.equal(full, again.train.batch(step, 8))
        for world in (2, 4):
            parts = [bundle.train.batch(step, 8 // world, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), full)
    val_docs = {i for i, d in enumerate(DOCS) if holdout_split(d, 0.2) == "val"}
    assert 0 < len(val_docs) < len(DOCS)
    val_rows = torch.cat([bundle.val.batch(i, 4) for i in range(2)])
    assert torch.equal(val_rows, torch.cat([again.val.batch(i, 4) for i in range(2)]))
    assert _ids_in(val_rows) <= val_docs
    train_ids = set().union(*(_ids_in(bundle.train.batch(s, 8)) for s in range(6)))
    assert train_ids and not train_ids & val_docs


def test_packed_state_dict_resume_and_mismatch(tmp_path: Path) -> None:
    _corpus(tmp_path)
    cfg = {"source": "files", "train_files": str(tmp_path / "*.jsonl")}
    a = build_data(cfg, seq_len=16, seed=0).train
    for s in range(3):
        a.batch(s, 4)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["next_step"] == 3
    b = build_data(cfg, seq_len=16, seed=0).train
    b.load_state_dict(state)
    assert b.state_dict() == state
    for s in range(3, 6):
        assert torch.equal(a.batch(s, 4), b.batch(s, 4))
    with pytest.raises(ValueError, match="seed"):
        build_data(cfg, seq_len=16, seed=1).train.load_state_dict(state)


def test_token_cache_hit_skips_tokenisation(tmp_path: Path) -> None:
    files = _corpus(tmp_path)
    cache = tmp_path / "cache"
    tok = CountingTokenizer()
    first, hit = file_tokens(files, tok, cache_dir=cache)
    assert not hit and tok.calls > 0
    calls = tok.calls
    second, hit = file_tokens(files, tok, cache_dir=cache)
    assert hit and tok.calls == calls and isinstance(second, np.memmap)
    assert np.array_equal(first, second) and len(list(cache.glob("tokens-*.npy"))) == 1
    other, hit = file_tokens(files, tok, cache_dir=cache, holdout=("val", 0.5))
    assert not hit and other.shape[0] < first.shape[0]
    _write_jsonl(files[0], DOCS[:5])  # new content -> new key
    changed, hit = file_tokens(files, tok, cache_dir=cache)
    assert not hit and changed.shape[0] != first.shape[0]


def test_tokenizer_file_sets_vocab_and_eos(tmp_path: Path) -> None:
    path = _wordlevel_json(tmp_path / "wl.json")
    tok = load_tokenizer(str(path))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == tok.vocab_size - 1
    ids = tok.encode(DOCS[3])
    assert 0 not in ids and tok.encode_batch([DOCS[3]]) == [ids]
    _corpus(tmp_path)
    cfg = {"source": "files", "train_files": str(tmp_path / "part-*.jsonl"),
           "tokenizer": str(path), "cache_dir": str(tmp_path / "c")}  # fmt: skip
    bundle = build_data(cfg, seq_len=8, seed=0)
    assert bundle.vocab_size == tok.vocab_size
    rows = bundle.train.batch(0, 16)
    assert int(rows.max()) < tok.vocab_size and (rows == tok.eos_id).any()
    no_eos = _wordlevel_json(tmp_path / "plain.json", with_eos=False)
    with pytest.raises(ValueError, match="data.eos_token"):
        load_tokenizer(str(no_eos))
    assert load_tokenizer(str(no_eos), eos_token=".").eos_id == tok.encode(".")[0]
    with pytest.raises(ValueError, match="data.eos_token"):
        load_tokenizer(str(no_eos), eos_token="<nope>")


def test_loop_model_vocab_follows_tokenizer(tmp_path: Path) -> None:
    from frugal_dist.train.loop import train

    path = _wordlevel_json(tmp_path / "wl.json")
    _corpus(tmp_path)
    cfg = build_config({
        "model": "tiny", "seq_len": 16, "batch_size": 2, "max_steps": 2, "warmup_steps": 1,
        "eval_every": 2, "eval_batches": 1, "log_every": 1,
        "data": {"source": "files", "train_files": str(tmp_path / "part-*.jsonl"),
                 "tokenizer": str(path), "val_fraction": 0.2},
    })  # fmt: skip
    summary = train(cfg)
    vocab = load_tokenizer(str(path)).vocab_size
    assert summary["steps"] == 2 and abs(summary["first_loss"] - np.log(vocab)) < 0.5


# ----------------------------------------------------------------------------- hf source


def _hf_cfg(tmp_path: Path, **extra) -> dict:
    files = _corpus(tmp_path)
    val = _write_jsonl(tmp_path / "val.jsonl", [d + " v" for d in DOCS[:30]])
    data_files = {"train": [str(f) for f in files], "validation": str(val)}
    return {"source": "hf", "name": "json", "streaming": True, "data_files": data_files, **extra}


def test_streaming_disjoint_deterministic_and_resumes(tmp_path: Path) -> None:
    cfg = _hf_cfg(tmp_path)
    b1, b2 = build_data(cfg, seq_len=32, seed=0), build_data(cfg, seq_len=32, seed=0)
    assert isinstance(b1.train, StreamingPackedDataset)
    # two ranks (one data object each): a file per rank, so disjoint documents
    seen = [set().union(*(_ids_in(b.train.batch(s, 2, r, 2)) for s in range(4)))
            for r, b in enumerate((b1, b2))]  # fmt: skip
    assert seen[0] and seen[0] <= set(range(60)) and seen[1] and seen[1] <= set(range(60, 120))
    # an uninterrupted run vs. one resumed from a mid-stream state (past an epoch boundary)
    ref = build_data(cfg, seq_len=32, seed=0).train
    states, batches = [], []
    for s in range(60):
        states.append(json.loads(json.dumps(ref.state_dict())))
        batches.append(ref.batch(s, 3))
    assert states[-1]["epoch"] >= 1 and states[0]["next_step"] == 0
    for at in (7, 41):
        resumed = build_data(cfg, seq_len=32, seed=0).train
        resumed.load_state_dict(states[at])
        for s in range(at, at + 5):
            assert torch.equal(resumed.batch(s, 3), batches[s]), (at, s)
        with pytest.raises(ValueError, match="consecutive"):
            resumed.batch(at + 7, 3)
    with pytest.raises(ValueError, match="rank"):
        resumed.batch(at + 5, 3, rank=1, world_size=2)
    # validation: finite, identical on every rank, world-size independent
    val = b1.val.batch(0, 4)
    assert torch.equal(torch.cat([b2.val.batch(0, 2, r, 2) for r in range(2)]), val)
    assert "v" in ByteTokenizer().decode(val.flatten())


def test_streaming_shuffle_buffer_is_seeded_and_resumes(tmp_path: Path) -> None:
    cfg = _hf_cfg(tmp_path, shuffle_buffer=16)
    ref = build_data(cfg, seq_len=32, seed=5).train
    plain = build_data({**cfg, "shuffle_buffer": 0}, seq_len=32, seed=5).train
    batches = [ref.batch(s, 2) for s in range(6)]
    assert not all(torch.equal(b, plain.batch(s, 2)) for s, b in enumerate(batches))
    state = None
    again = build_data(cfg, seq_len=32, seed=5).train
    for s in range(3):
        assert torch.equal(again.batch(s, 2), batches[s])
        state = again.state_dict()
    resumed = build_data(cfg, seq_len=32, seed=5).train
    resumed.load_state_dict(state)
    for s in range(3, 6):
        assert torch.equal(resumed.batch(s, 2), batches[s])


def test_hf_non_streaming_and_holdout(tmp_path: Path) -> None:
    cfg = _hf_cfg(tmp_path, streaming=False, val_split=None, val_fraction=0.2)
    bundle = build_data(cfg, seq_len=24, seed=1)
    assert isinstance(bundle.train, PackedDataset)
    full = bundle.train.batch(2, 8)
    assert torch.equal(torch.cat([bundle.train.batch(2, 4, r, 2) for r in range(2)]), full)
    val_docs = {i for i, d in enumerate(DOCS) if holdout_split(d, 0.2) == "val"}
    assert _ids_in(bundle.val.batch(0, 4)) <= val_docs
    assert not _ids_in(full) & val_docs


# ----------------------------------------------------------------------------- config errors


def test_bad_data_keys_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"data\.trian_files: unknown key.*'train_files'"):
        validate_data_config({"source": "files", "trian_files": "x"})
    with pytest.raises(ValueError, match=r"data\.source: must be one of"):
        validate_data_config({"source": "s3"})
    with pytest.raises(ValueError, match=r"data\.max_bytes: is only used with source"):
        validate_data_config({"source": "files", "train_files": "x", "max_bytes": 5})
    with pytest.raises(ValueError, match=r"data\.train_files: is required"):
        validate_data_config({"source": "files"})
    with pytest.raises(ValueError, match=r"data\.name: is required"):
        validate_data_config({"source": "hf"})
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        validate_data_config({"source": "files", "train_files": "x", "val_fraction": 1.5})
    with pytest.raises(ValueError, match=r"data\.val_split"):
        validate_data_config({"source": "hf", "name": "json", "val_split": 3})
    with pytest.raises(ValueError, match=r"data\.streaming"):
        validate_data_config({"source": "hf", "name": "json", "streaming": "yes"})
    with pytest.raises(ValueError, match=r"data\.tokenizr"):
        build_config({"data": {"tokenizr": "byte"}})
    assert build_config({}).data["max_bytes"] == 2_000_000
    cfg = build_config({"data": {"source": "files", "train_files": "a/*.jsonl"}})
    assert cfg.data["text_field"] == "text" and "max_bytes" not in cfg.data
