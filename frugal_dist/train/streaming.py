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

Resume: ``state_dict()`` is ``{kind, next_step, rank, world, epoch, doc, offset, position,
digest}``: the cursor is token ``offset`` of document ``doc`` (0-based, this rank's stream, this
epoch). In flight at save time are the tokenised documents of the last chunk not yet packed
(the head one partly used): none of them is saved, the cursor points at the head document and
the stream re-produces the rest. ``position`` is the backend's own position just before that
document (JSON text of ``datasets.IterableDataset.state_dict()``: shard index and example index
in the shard, datasets >= 2.18), ``digest`` a hash of the head document's tokens.
``load_state_dict`` re-opens the stream:

- with a ``position`` (and a stream that can restore it): the backend starts at the head
  document; no consumed document is read again by this module (the backend itself re-parses
  the part of one shard file before the example index). The head's tokens must match ``digest``.
- otherwise (checkpoints written before ``position`` existed, datasets < 2.18, or a shuffle
  buffer: ``IterableDataset.state_dict`` drops the buffer's content, so its position is not
  exact): the fallback skips ``doc`` documents (read, not tokenised), and rank 0 prints one line.

Either way ``offset`` tokens are dropped, so the next batch is exactly the one an uninterrupted
run would get. It must be resumed with the same rank and world size. Recording the position
costs one ``state_dict()`` copy per document read (about 8 us on a CPU core).

``hf_datasets(cfg, tokenizer, seq_len, seed)`` builds ``(train, val)`` for ``source: hf``.
Hub datasets and local packaged builders (``name: json`` + ``data_files``) take the same path
(``sources.load_hf_dataset``). Validation is always finite and identical on every rank: the
first ``val_tokens`` tokens of ``val_split`` when streaming, the whole split otherwise. With
``val_split: null`` a hash-selected ``val_fraction`` of the training documents is held out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from frugal_dist.train.data import PackedDataset
from frugal_dist.train.logs import logger
from frugal_dist.train.sources import file_digest, hf_documents, holdout_split, load_hf_dataset
from frugal_dist.train.token_cache import cached_tokens, token_dtype, tokenize_documents
from frugal_dist.train.tokenization import TextTokenizer

__all__ = ["HFDocumentStream", "StreamingPackedDataset", "hf_datasets"]

# (rank, world, epoch, position) -> documents. ``position`` (None: the epoch's start) is one an
# earlier stream's ``position()`` returned (a JSON-able dict); a stream without ``position()``
# (or whose ``position()`` is None) starts the epoch from its beginning whatever it is given.
Opener = Callable[[int, int, int, "dict | None"], Iterator[str]]


def _position_of(docs: Iterator[str]) -> Callable[[], dict | None] | None:
    fn = getattr(docs, "position", None)
    return fn if callable(fn) else None


def _digest(tokens: np.ndarray) -> str:
    return hashlib.blake2b(tokens.tobytes(), digest_size=8).hexdigest()


def _to_json(position: dict | None) -> str | None:
    try:
        return None if position is None else json.dumps(position)
    except (TypeError, ValueError):  # not JSON-able: the fallback will re-read
        return None


class HFDocumentStream:
    """This rank's documents of a streamed ``datasets.IterableDataset``, with its position.

    ``position()`` is ``dataset.state_dict()`` just after the last document yielded (before the
    first: where the stream started), or None when the position is not exact: ``exact=False``
    (shuffle buffers) or datasets < 2.18 (no ``state_dict``).
    ``start`` (a ``position()`` of an earlier stream of the same data, rank, world size and
    epoch) makes the dataset resume just after that document; pass the dataset's initial
    position to (re)start from the beginning a dataset object that was iterated before.
    Documents are the non-empty ``text_field`` strings, optionally the ``holdout`` share.
    """

    def __init__(
        self,
        dataset: Any,
        text_field: str,
        holdout: tuple[str, float] | None = None,
        start: dict | None = None,
        exact: bool = True,
    ) -> None:
        self._ds = dataset
        self._start: dict | None = None
        if exact and callable(getattr(dataset, "load_state_dict", None)):
            self._start = start if start is not None else self.current(dataset)
            if self._start is not None:
                dataset.load_state_dict(self._start)
        self._started = False
        self._docs = _doc_filter(hf_documents(dataset, text_field), holdout)

    @staticmethod
    def current(dataset: Any) -> dict | None:
        """``dataset.state_dict()`` (a copy); None when the dataset has none."""
        try:
            return dataset.state_dict()
        except (AttributeError, RuntimeError):
            return None

    def __iter__(self) -> HFDocumentStream:
        return self

    def __next__(self) -> str:
        self._started = True
        return next(self._docs)

    def position(self) -> dict | None:
        """The position just after the last document yielded (see the class docstring)."""
        if self._start is None:
            return None
        return self.current(self._ds) if self._started else self._start


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
        self._state: dict[str, int] = {"next_step": 0, "epoch": 0, "doc": 0, "offset": 0}
        self._resume: tuple[str | None, str | None] = (None, None)  # (position JSON, digest)
        self._placement: tuple[int, int] | None = None  # (rank, world) once opened/restored
        self._docs: Iterator[str] | None = None
        self._read = 0  # documents pulled from the stream of epoch ``_read_epoch``
        self._read_epoch = 0
        # [epoch, doc, tokens, tokens used, backend position just before the document]
        self._buf: deque[list[Any]] = deque()
        self._available = 0
        self._expect: str | None = None  # digest the first document read must have

    def _open(self, epoch: int, skip: int, position: str | None = None) -> None:
        rank, world = self._placement  # type: ignore[misc]
        start = json.loads(position) if skip and position is not None else None
        self._docs = self.open_stream(rank, world, epoch, start)
        self._read, self._read_epoch = 0, epoch
        pos = _position_of(self._docs)
        if skip and position is not None and pos is not None and pos() is not None:
            self._read = skip  # the backend starts at document ``skip``
            return
        if skip and rank == 0:
            why = "the checkpoint has no stream position"
            if position is not None:
                why = "this stream cannot restore a position"
            logger.info(f"streaming resume: {why}; re-reading {skip} documents of epoch "
                        f"{epoch} to reach it")  # fmt: skip
        for _ in itertools.islice(self._docs, skip):
            self._read += 1
        if self._read < skip:
            raise ValueError(
                f"cannot resume: the stream has {self._read} documents in epoch {epoch}, the "
                f"checkpoint's position is document {skip} (different data?)"
            )

    def _pull(self) -> tuple[list[str], list[dict | None]]:
        """Up to ``chunk_docs`` documents and the backend position before each."""
        pos = _position_of(self._docs)  # type: ignore[arg-type]
        chunk: list[str] = []
        marks: list[dict | None] = []
        for _ in range(self.chunk_docs):
            mark = pos() if pos is not None else None
            doc = next(self._docs, None)  # type: ignore[call-overload]
            if doc is None:
                break
            chunk.append(doc)
            marks.append(mark)
        return chunk, marks

    def _fill(self) -> None:
        chunk, marks = self._pull()
        if not chunk:
            if self._read == 0:
                raise ValueError("the training stream has no documents (check data.split)")
            self._open(self._read_epoch + 1, 0)
            chunk, marks = self._pull()
            if not chunk:
                raise ValueError("the training stream has no documents (check data.split)")
        eos = self.tokenizer.eos_id
        for ids, mark in zip(self.tokenizer.encode_batch(chunk), marks, strict=True):
            toks = np.asarray([*ids, eos], dtype=np.int64)
            if self._expect is not None:
                if _digest(toks) != self._expect:
                    raise ValueError(
                        f"cannot resume: the document at the checkpoint's stream position "
                        f"(epoch {self._read_epoch}, document {self._read}) differs from the "
                        f"saved one (different data or tokenizer?)"
                    )
                self._expect = None
            self._buf.append([self._read_epoch, self._read, toks, 0, mark])
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
        epoch, doc, _, pos, _ = self._buf[0]
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
        if self._docs is None:  # first batch, or first since load_state_dict
            self._expect = self._resume[1]  # the head document must be the saved one
            self._open(self._state["epoch"], self._state["doc"], self._resume[0])
            if self._state["offset"]:
                self._fill()
                self._buf[0][3] = self._state["offset"]
                self._available -= self._state["offset"]
        rows = self._take(batch_size * self.seq_len).reshape(batch_size, self.seq_len)
        self._state["next_step"] = step + 1
        self._cursor()
        return torch.from_numpy(rows)

    def state_dict(self) -> dict[str, int | str | None]:
        """The position (JSON-able): see the module docstring."""
        rank, world = self._placement if self._placement is not None else (-1, -1)
        if self._buf:  # the head document is the cursor's
            position, digest = _to_json(self._buf[0][4]), _digest(self._buf[0][2])
        else:  # nothing read since load_state_dict (or the start): keep what was restored
            position, digest = self._resume
        return {"kind": "stream", "rank": rank, "world": world, **self._state,
                "position": position, "digest": digest}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Position the stream at ``state`` (the next ``batch`` continues from there).

        States without ``position`` (older checkpoints) resume through the re-reading fallback.
        """
        if state.get("kind") != "stream":
            raise ValueError(f"not a streaming data state: {state!r}")
        self._state = {k: int(state[k]) for k in ("next_step", "epoch", "doc", "offset")}
        self._resume = (state.get("position"), state.get("digest"))
        self._expect = None
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
        base_start = HFDocumentStream.current(base)  # before any iteration: the beginning

        def open_stream(rank: int, world: int, epoch: int, position: dict | None) -> Iterator[str]:
            ds = base
            if cfg["shuffle_buffer"]:
                ds = ds.shuffle(seed=seed, buffer_size=cfg["shuffle_buffer"])
                ds.set_epoch(epoch)
            if world > 1:
                from datasets.distributed import split_dataset_by_node

                ds = split_dataset_by_node(ds, rank=rank, world_size=world)
            if position is None and ds is base:  # ``base`` is re-used: rewind it explicitly
                position = base_start
            # a shuffle buffer's content is not in IterableDataset.state_dict(): not exact
            exact = not cfg["shuffle_buffer"] and (ds is not base or base_start is not None)
            return HFDocumentStream(ds, field, train_holdout, position, exact=exact)

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
