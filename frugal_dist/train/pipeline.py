"""The training data pipeline: ``data:`` config keys -> train/val(/test) datasets + tokenizer.

``build_data(cfg_data, seq_len, seed)`` returns a ``DataBundle(train, val, tokenizer,
vocab_size, test)`` (``test`` is None unless ``test_files`` is given). The datasets serve
``batch(step, batch_size, rank, world) -> int64 (batch_size, seq_len)`` (inputs = labels; the
model shifts) and ``state_dict()`` / ``load_state_dict(d)`` (small JSON-able dicts) for
checkpoint/resume.

Keys of the ``data:`` section (``validate_data_config`` checks them):

============== ============== ===========================================================
key            sources        meaning (default)
============== ============== ===========================================================
source         all            ``embedded`` (stdlib source, no download) | ``files`` | ``hf``
tokenizer      all            ``byte`` | path to a ``tokenizers`` .json | HF name/dir (byte)
eos_token      all            document separator token; default: the tokenizer's own
max_bytes      embedded       bytes of stdlib source read per split (2,000,000)
train_files    files          glob or list of globs: .txt .jsonl .jsonl.gz .jsonl.xz .parquet
val_files      files          same; if absent, ``val_fraction`` of documents held out by hash
test_files     files          same formats; a test split evaluated once after the last step
                              (``test_loss``/``test_ppl``); none: no test evaluation (none)
val_fraction   files, hf      fraction of train documents held out by hash when there are no
                              val_files / ``val_split: null`` (0.01)
text_field     files, hf      JSON field / parquet column / dataset column ("text")
txt_split      files          ``file`` (one document per .txt) | ``blank_line``
cache_dir      files, hf      token cache directory (none: tokenise in every process)
name           hf             ``datasets.load_dataset`` path: hub id (allenai/c4) or ``json``
config         hf             dataset config name, e.g. ``en`` (none)
data_files     hf             ``data_files`` for packaged builders (json/parquet/text)
split          hf             training split ("train")
val_split      hf             validation split ("validation"); null: hold out val_fraction
streaming      hf             stream instead of downloading the whole split (true)
revision       hf             dataset git revision (none)
shuffle_buffer hf streaming   documents in the seeded shuffle buffer; 0 = stream order (0)
val_tokens     hf streaming   tokens of ``val_split`` materialised for evaluation (1,048,576)
============== ============== ===========================================================

Guarantees. ``embedded``, ``files`` and non-streaming ``hf`` give a ``PackedDataset``: the
global batch at a step is a pure function of (data, tokenizer, seq_len, seed, step, global batch)
and the rows of all ranks concatenated in rank order equal the single-process batch of size
``batch_size * world`` -- independent of world size. Streaming ``hf`` gives a
``StreamingPackedDataset`` (weaker, see ``frugal_dist.train.streaming``): every rank reads a
disjoint, deterministic share of the documents for a fixed world size, but the global batch
depends on the world size; its resume restores the ``datasets`` stream position (datasets >=
2.18, no shuffle buffer) instead of re-reading the consumed documents. Validation data are
always finite and world-size independent.

Test split. Only the ``files`` source takes ``test_files`` (the embedded corpus and HF datasets
have no test split here; the key is refused with them like any other key of another source).
The test files must share no file with ``train_files`` or ``val_files``; they are tokenised
(and cached) like the validation files and packed with seed ``seed + 2``.

Example (enwiki with a 32k BPE)::

    data:
      source: files
      train_files: /work/shared/data/enwiki2015/train-*.jsonl.xz
      val_files: /work/shared/data/enwiki2015/val.jsonl.xz
      tokenizer: /work/shared/data/tokenizer/enwiki-bpe-32k.json
      cache_dir: ~/.cache/frugal_dist/tokens
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from frugal_dist.train.data import PackedDataset, load_embedded

__all__ = ["DATA_DEFAULTS", "DataBundle", "build_data", "validate_data_config"]

SOURCES = ("embedded", "files", "hf")
_COMMON = {"source": "embedded", "tokenizer": "byte", "eos_token": None}
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedded": {"max_bytes": 2_000_000},
    "files": {
        "train_files": None,
        "val_files": None,
        "test_files": None,
        "val_fraction": 0.01,
        "text_field": "text",
        "txt_split": "file",
        "cache_dir": None,
    },
    "hf": {
        "name": None,
        "config": None,
        "data_files": None,
        "split": "train",
        "val_split": "validation",
        "val_fraction": 0.01,
        "streaming": True,
        "revision": None,
        "text_field": "text",
        "cache_dir": None,
        "shuffle_buffer": 0,
        "val_tokens": 1 << 20,
    },
}
ALL_KEYS = sorted({*_COMMON, *(k for d in DATA_DEFAULTS.values() for k in d)})


@dataclass
class DataBundle:
    """What the training loop needs from the data pipeline."""

    train: Any  # PackedDataset | StreamingPackedDataset
    val: PackedDataset
    tokenizer: Any  # TextTokenizer
    vocab_size: int
    test: PackedDataset | None = None  # data.test_files (source files only)


def _fail(key: str, msg: str) -> ValueError:
    return ValueError(f"data.{key}: {msg}")


def validate_data_config(cfg_data: dict[str, Any] | None) -> dict[str, Any]:
    """The ``data`` section with defaults for its source filled in; ``ValueError`` naming the key.

    Unknown keys list the allowed ones; keys of another source are rejected too (they would be
    silently ignored otherwise).
    """
    raw = dict(cfg_data or {})
    for key in raw:
        if key not in ALL_KEYS:
            close = difflib.get_close_matches(key, ALL_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _fail(key, f"unknown key.{hint} Allowed keys: {ALL_KEYS}")
    source = raw.get("source", "embedded")
    if source not in SOURCES:
        raise _fail("source", f"must be one of {list(SOURCES)}, got {source!r}")
    allowed = {**_COMMON, **DATA_DEFAULTS[source]}
    for key in raw:
        if key not in allowed:
            users = [s for s in SOURCES if key in DATA_DEFAULTS[s]]
            raise _fail(key, f"is only used with source {users}, not {source!r}")
    out = {**allowed, **raw}
    if not isinstance(out["tokenizer"], str) or not out["tokenizer"]:
        raise _fail(
            "tokenizer", f"must be 'byte', a .json path or a HF name, got {out['tokenizer']!r}"
        )
    if out["eos_token"] is not None and not isinstance(out["eos_token"], str):
        raise _fail("eos_token", f"must be a string, got {out['eos_token']!r}")
    if source == "embedded":
        mb = out["max_bytes"]
        if not isinstance(mb, int) or isinstance(mb, bool) or mb <= 0:
            raise _fail("max_bytes", f"must be a positive integer, got {mb!r}")
    if source in ("files", "hf"):
        vf = out["val_fraction"]
        if not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0 < vf < 1:
            raise _fail("val_fraction", f"must be a number in (0, 1), got {vf!r}")
    if source == "files":
        if not out["train_files"]:
            raise _fail("train_files", "is required with source 'files' (a glob or a list)")
        if out["txt_split"] not in ("file", "blank_line"):
            raise _fail("txt_split", f"must be 'file' or 'blank_line', got {out['txt_split']!r}")
        if out["test_files"] is not None and not out["test_files"]:
            raise _fail("test_files", "is empty; give a glob or a list of globs, or leave it out")
    if source == "hf":
        if not isinstance(out["name"], str) or not out["name"]:
            raise _fail("name", "is required with source 'hf' (e.g. allenai/c4, or json)")
        if not isinstance(out["split"], str) or not out["split"]:
            raise _fail("split", f"must be a split name such as 'train', got {out['split']!r}")
        if out["val_split"] is not None and not isinstance(out["val_split"], str):
            raise _fail("val_split", f"must be a split name or null, got {out['val_split']!r}")
        if not isinstance(out["streaming"], bool):
            raise _fail("streaming", f"must be true or false, got {out['streaming']!r}")
        for key in ("shuffle_buffer", "val_tokens"):
            v = out[key]
            if (
                not isinstance(v, int)
                or isinstance(v, bool)
                or v < (0 if key == "shuffle_buffer" else 1)
            ):
                raise _fail(key, f"must be a non-negative integer, got {v!r}")
    if not isinstance(out.get("text_field", "text"), str):
        raise _fail("text_field", f"must be a string, got {out['text_field']!r}")
    return out


def build_data(cfg_data: dict[str, Any] | None, seq_len: int, seed: int = 0) -> DataBundle:
    """Datasets and tokenizer for a ``data:`` section (see the module docstring).

    The validation set uses seed ``seed + 1``, as ``load_embedded`` does; the test set
    (``test_files``) ``seed + 2``.
    """
    from frugal_dist.train.tokenization import load_tokenizer

    cfg = validate_data_config(cfg_data)
    source = cfg["source"]
    if source == "embedded" and cfg["tokenizer"] == "byte":
        train, val, tok = load_embedded(seq_len, seed=seed, max_bytes=cfg["max_bytes"])
        return DataBundle(train, val, tok, tok.vocab_size)
    tok = load_tokenizer(cfg["tokenizer"], cfg["eos_token"])
    if source == "embedded":
        from frugal_dist.train.data import embedded_token_stream

        train = PackedDataset(embedded_token_stream("train", tok, cfg["max_bytes"]), seq_len, seed)
        val = PackedDataset(embedded_token_stream("val", tok, cfg["max_bytes"]), seq_len, seed + 1)
    elif source == "files":
        train, val, test = _files_datasets(cfg, tok, seq_len, seed)
        return DataBundle(train, val, tok, int(tok.vocab_size), test)
    else:
        from frugal_dist.train.streaming import hf_datasets

        train, val = hf_datasets(cfg, tok, seq_len, seed)
    return DataBundle(train, val, tok, int(tok.vocab_size))


def _files_datasets(cfg: dict[str, Any], tok: Any, seq_len: int, seed: int):
    from frugal_dist.train.sources import expand_files
    from frugal_dist.train.token_cache import file_tokens

    train_files = expand_files(cfg["train_files"], "train_files")
    val_files = expand_files(cfg["val_files"], "val_files")
    test_files = expand_files(cfg["test_files"], "test_files")  # before any tokenisation
    for other, files in (("train_files", train_files), ("val_files", val_files)):
        overlap = set(test_files) & set(files)
        if overlap:
            raise _fail("test_files", f"files also in {other}: {sorted(map(str, overlap))}")
    opts = {"text_field": cfg["text_field"], "txt_split": cfg["txt_split"]}
    cache = cfg["cache_dir"]
    if val_files:
        overlap = set(train_files) & set(val_files)
        if overlap:
            raise _fail("val_files", f"files also in train_files: {sorted(map(str, overlap))}")
        train_tokens, _ = file_tokens(train_files, tok, cache_dir=cache, **opts)
        val_tokens, _ = file_tokens(val_files, tok, cache_dir=cache, **opts)
    else:
        frac = float(cfg["val_fraction"])
        train_tokens, _ = file_tokens(
            train_files, tok, holdout=("train", frac), cache_dir=cache, **opts
        )
        val_tokens, _ = file_tokens(
            train_files, tok, holdout=("val", frac), cache_dir=cache, **opts
        )
    splits = [("train", train_tokens), ("val", val_tokens)]
    if test_files:
        splits.append(("test", file_tokens(test_files, tok, cache_dir=cache, **opts)[0]))
    for name, toks in splits:
        if toks.shape[0] < seq_len:
            raise _fail(
                f"{name}_files" if name != "val" or val_files else "val_fraction",
                f"the {name} split has {toks.shape[0]} tokens, fewer than one sequence "
                f"of seq_len={seq_len}; give more text or a smaller seq_len",
            )
    test = PackedDataset(splits[2][1], seq_len, seed + 2) if test_files else None
    return (PackedDataset(train_tokens, seq_len, seed),
            PackedDataset(val_tokens, seq_len, seed + 1), test)  # fmt: skip
