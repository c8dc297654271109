"""Hugging Face ``datasets`` sources: streamed (hub-scale) or materialised, packed into sequences.

``StreamingPackedDataset`` packs a per-rank document stream on the fly: documents are tokenised
in small chunks (``encode_batch``), EOS appended, concatenated and cut into ``seq_len`` rows;
``batch(step, batch_size, rank, world)`` returns the next ``batch_size`` rows of *this rank's*
stream. Steps must be consecutive (0, 1, 2, ... or from the position ``load_state_dict``
restored); anything else raises. When the stream ends a new epoch starts (re-shuffled when a
shuffle buffer is used, via ``set_epoch``).

Sharding (the weaker guarantee of streaming): rank ``r`` of ``world`` reads
``datasets.distributed.split_dataset_by_node(ds, r, world)`` -- whole shards (files) per rank
when the shard count divides by ``world``, else every ``world``-th document. Shares are
disjoint and deterministic for a fixed world size and seed, but the global batch at a step
depends on the world size (unlike ``PackedDataset``).

Resume: ``state_dict()`` is ``{kind, next_step, rank, world, epoch, doc, offset}``: the cursor
is token ``offset`` of document ``doc`` (0-based, this rank's stream, this epoch).
``load_state_dict`` re-opens the stream, skips ``doc`` documents (read, not tokenised) and drops
``offset`` tokens, so the next batch is exactly the one an uninterrupted run would get. It must
be resumed with the same rank and world size.

``hf_datasets(cfg, tokenizer, seq_len, seed)`` builds ``(train, val)`` for ``source: hf``.
Hub datasets and local packaged builders (``name: json`` + ``data_files``) take the same path
(``sources.load_hf_dataset``). Validation is always finite and identical on every rank: the
first ``val_tokens`` tokens of ``val_split`` when streaming, the whole split otherwise. With
``val_split: null`` a hash-selected ``val_fraction`` of the training documents is held out.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from frugal_dist.train.data import PackedDataset
from frugal_dist.train.sources import file_digest, hf_documents, holdout_split, load_hf_dataset
from frugal_dist.train.token_cache import cached_tokens, token_dtype, tokenize_documents
from frugal_dist.train.tokenization import TextTokenizer

__all__ = ["StreamingPackedDataset", "hf_datasets"]

Opener = Callable[[int, int, int], Iterator[str]]  # (rank, world, epoch) -> documents


class StreamingPackedDataset:
    """Sequences packed from a per-rank document stream (see the module docstring)."""

    def __init__(
        self, open_stream: Opener, tokenizer: TextTokenizer, seq_len: int, chunk_docs: int = 64
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.open_stream = open_stream
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.chunk_docs = chunk_docs
        self._dtype = token_dtype(tokenizer.vocab_size)
        self._state: dict[str, int] = {"next_step": 0, "epoch": 0, "doc": 0, "offset": 0}
        self._placement: tuple[int, int] | None = None  # (rank, world) once opened/restored
        self._docs: Iterator[str] | None = None
        self._read = 0  # documents pulled from the stream of epoch ``_read_epoch``
        self._read_epoch = 0
        self._buf: deque[list[Any]] = deque()  # [epoch, doc, tokens, pos]
        self._available = 0

    def _open(self, epoch: int, skip: int) -> None:
        rank, world = self._placement  # type: ignore[misc]
        self._docs = self.open_stream(rank, world, epoch)
        self._read, self._read_epoch = 0, epoch
        for _ in itertools.islice(self._docs, skip):
            self._read += 1
        if self._read < skip:
            raise ValueError(
                f"cannot resume: the stream has {self._read} documents in epoch {epoch}, the "
                f"checkpoint's position is document {skip} (different data?)"
            )

    def _fill(self) -> None:
        chunk = list(itertools.islice(self._docs, self.chunk_docs))  # type: ignore[arg-type]
        if not chunk:
            if self._read == 0:
                raise ValueError("the training stream has no documents (check data.split)")
            self._open(self._read_epoch + 1, 0)
            chunk = list(itertools.islice(self._docs, self.chunk_docs))  # type: ignore[arg-type]
            if not chunk:
                raise ValueError("the training stream has no documents (check data.split)")
        eos = self.tokenizer.eos_id
        for ids in self.tokenizer.encode_batch(chunk):
            toks = np.asarray([*ids, eos], dtype=np.int64)
            self._buf.append([self._read_epoch, self._read, toks, 0])
            self._available += toks.shape[0]
            self._read += 1

    def _take(self, n: int) -> np.ndarray:
        while self._available < n:
            self._fill()
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            entry = self._buf[0]
            toks, pos = entry[2], entry[3]
            k = min(n - filled, toks.shape[0] - pos)
            out[filled : filled + k] = toks[pos : pos + k]
            filled += k
            entry[3] = pos + k
            if entry[3] == toks.shape[0]:
                self._buf.popleft()
        self._available -= n
        return out

    def _cursor(self) -> None:
        if not self._buf:  # the next token starts the next unread document
            self._fill()
        epoch, doc, _, pos = self._buf[0]
        self._state.update(epoch=epoch, doc=doc, offset=pos)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The next ``batch_size`` rows of this rank's stream; ``step`` must be the next step."""
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad batch request: batch_size={batch_size} rank={rank} world_size={world_size}"
            )
        if self._placement is None:
            self._placement = (rank, world_size)
        if self._placement != (rank, world_size):
            raise ValueError(
                f"this stream belongs to rank {self._placement[0]} of {self._placement[1]}, "
                f"asked for rank {rank} of {world_size} (a streaming source cannot change "
                f"rank or world size, not even on resume)"
            )
        if step != self._state["next_step"]:
            raise ValueError(
                f"streaming data serves consecutive steps: expected step "
                f"{self._state['next_step']}, got {step} (restore the position with "
                f"load_state_dict to resume)"
            )
        if self._docs is None:
            self._open(self._state["epoch"], self._state["doc"])
            if self._state["offset"]:
                self._fill()
                self._buf[0][3] = self._state["offset"]
                self._available -= self._state["offset"]
        rows = self._take(batch_size * self.seq_len).reshape(batch_size, self.seq_len)
        self._state["next_step"] = step + 1
        self._cursor()
        return torch.from_numpy(rows)

    def state_dict(self) -> dict[str, int | str]:
        """The position (JSON-able): see the module docstring."""
        rank, world = self._placement if self._placement is not None else (-1, -1)
        return {"kind": "stream", "rank": rank, "world": world, **self._state}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Position the stream at ``state`` (the next ``batch`` continues from there)."""
        if state.get("kind") != "stream":
            raise ValueError(f"not a streaming data state: {state!r}")
        self._state = {k: int(state[k]) for k in ("next_step", "epoch", "doc", "offset")}
        rank, world = int(state["rank"]), int(state["world"])
        self._placement = None if rank < 0 else (rank, world)
        self._docs, self._read, self._available = None, 0, 0
        self._buf.clear()


def _doc_filter(docs: Iterator[str], holdout: tuple[str, float] | None) -> Iterator[str]:
    if holdout is None:
        return docs
    return (d for d in docs if holdout_split(d, holdout[1]) == holdout[0])


def _data_files_key(data_files: Any) -> Any:
    """``data_files`` with every existing local file replaced by (name, content digest)."""
    import os
    from pathlib import Path

    if isinstance(data_files, dict):
        return {k: _data_files_key(v) for k, v in sorted(data_files.items())}
    if isinstance(data_files, (list, tuple)):
        return [_data_files_key(v) for v in data_files]
    if isinstance(data_files, str) and os.path.isfile(data_files):
        return [Path(data_files).name, file_digest(Path(data_files))]
    return data_files


def _limited_tokens(docs: Iterator[str], tok: TextTokenizer, limit: int) -> np.ndarray:
    parts, total = [], 0
    while total < limit:
        chunk = list(itertools.islice(docs, 64))
        if not chunk:
            break
        arr = tokenize_documents(chunk, tok)
        parts.append(arr)
        total += arr.shape[0]
    out = np.concatenate(parts) if parts else np.empty(0, dtype=token_dtype(tok.vocab_size))
    return out[:limit]


def hf_datasets(
    cfg: dict[str, Any], tok: TextTokenizer, seq_len: int, seed: int
) -> tuple[StreamingPackedDataset | PackedDataset, PackedDataset]:
    """``(train, val)`` for a validated ``source: hf`` data section."""
    field = cfg["text_field"]
    common = {"name": cfg["name"], "config": cfg["config"], "data_files": cfg["data_files"],
              "revision": cfg["revision"]}  # fmt: skip
    val_split = cfg["val_split"]
    frac = float(cfg["val_fraction"])
    train_holdout = ("train", frac) if val_split is None else None
    val_source = cfg["split"] if val_split is None else val_split
    val_holdout = ("val", frac) if val_split is None else None
    key = {"kind": "hf", **common, "data_files": _data_files_key(cfg["data_files"]),
           "text_field": field, "tokenizer": tok.fingerprint}  # fmt: skip
    cache = cfg["cache_dir"]

    if cfg["streaming"]:
        base = load_hf_dataset(split=cfg["split"], streaming=True, **common)

        def open_stream(rank: int, world: int, epoch: int) -> Iterator[str]:
            ds = base
            if cfg["shuffle_buffer"]:
                ds = ds.shuffle(seed=seed, buffer_size=cfg["shuffle_buffer"])
                ds.set_epoch(epoch)
            if world > 1:
                from datasets.distributed import split_dataset_by_node

                ds = split_dataset_by_node(ds, rank=rank, world_size=world)
            return _doc_filter(hf_documents(ds, field), train_holdout)

        train: StreamingPackedDataset | PackedDataset = StreamingPackedDataset(
            open_stream, tok, seq_len
        )
        limit = int(cfg["val_tokens"])

        def build_val() -> np.ndarray:
            ds = load_hf_dataset(split=val_source, streaming=True, **common)
            return _limited_tokens(_doc_filter(hf_documents(ds, field), val_holdout), tok, limit)

        val_key = {**key, "split": val_source, "holdout": val_holdout, "val_tokens": limit}
        val_tokens, _ = cached_tokens(cache, val_key, build_val)
    else:

        def materialise(split: str, holdout: tuple[str, float] | None) -> np.ndarray:
            ds = load_hf_dataset(split=split, streaming=False, **common)
            fp = getattr(ds, "_fingerprint", None)
            docs_key = {**key, "split": split, "holdout": holdout, "fingerprint": fp}

            def build() -> np.ndarray:
                return tokenize_documents(_doc_filter(hf_documents(ds, field), holdout), tok)

            return cached_tokens(cache if fp else None, docs_key, build)[0]

        train = PackedDataset(materialise(cfg["split"], train_holdout), seq_len, seed)
        val_tokens = materialise(val_source, val_holdout)
    if val_tokens.shape[0] < seq_len:
        raise ValueError(
            f"data.val_split: validation data {val_source!r} has {val_tokens.shape[0]} tokens, "
            f"fewer than one sequence of seq_len={seq_len}"
        )
    return train, PackedDataset(val_tokens, seq_len, seed + 1)
