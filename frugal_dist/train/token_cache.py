"""Fast tokenisation of finite corpora and an on-disk token cache shared by runs and ranks.

``tokenize_documents`` turns documents into one flat token array: each document's ids followed
by ``tokenizer.eos_id``, documents in input order. Documents are read (decompressed, JSON-parsed)
on a background thread while the previous chunk is encoded with ``tokenizer.encode_batch``
(multi-threaded in Rust, GIL released), so reading and encoding overlap. The array's dtype is
uint16 when the vocabulary fits (< 65,536 ids), else uint32.

``cached_tokens(cache_dir, key, build)`` stores the array as ``<cache_dir>/tokens-<digest>.npy``
where ``digest`` hashes ``key`` (the files' content digests, the tokenizer's fingerprint and
every option that changes the ids), and memory-maps it on later calls. The first process to take
an exclusive ``flock`` on ``<digest>.lock`` builds it; the others (other ranks on the node,
concurrent runs) wait and then read it. Files are written to a temporary name and renamed, so a
crash never leaves a truncated cache. A ``<digest>.json`` beside it records the key.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from frugal_dist.train.sources import file_digest, iter_split_documents
from frugal_dist.train.tokenization import TextTokenizer

__all__ = [
    "CACHE_VERSION",
    "cached_tokens",
    "file_tokens",
    "token_dtype",
    "tokenize_documents",
]

CACHE_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 if every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _chunks(docs: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in docs:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _prefetched(chunks: Iterator[list[str]], depth: int = 2) -> Iterator[list[str]]:
    """``chunks`` produced on a daemon thread, ``depth`` ahead; producer errors re-raise here."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                q.put(("chunk", chunk))
            q.put(("done", None))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, daemon=True, name="token-reader")
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def tokenize_documents(
    docs: Iterable[str],
    tokenizer: TextTokenizer,
    chunk_docs: int = 512,
    chunk_chars: int = 4 << 20,
) -> np.ndarray:
    """One flat array: ``ids(doc) + [eos]`` for each document, in order (see module docstring)."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    for chunk in _prefetched(_chunks(docs, chunk_docs, chunk_chars)):
        pieces: list[np.ndarray] = []
        for ids in tokenizer.encode_batch(chunk):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(eos)
        parts.append(np.concatenate(pieces))
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _key_digest(key: dict[str, Any]) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **key}, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def cached_tokens(
    cache_dir: str | os.PathLike[str] | None,
    key: dict[str, Any],
    build: Callable[[], np.ndarray],
) -> tuple[np.ndarray, bool]:
    """``(tokens, hit)``: the cached array for ``key`` (memory-mapped), or ``build()`` stored.

    ``cache_dir=None`` disables the cache (always builds; ``hit`` is False).
    """
    if cache_dir is None:
        return build(), False
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    digest = _key_digest(key)
    path = root / f"tokens-{digest}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r"), True
    with open(root / f"tokens-{digest}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if path.exists():  # another process built it while we waited
                return np.load(path, mmap_mode="r"), True
            tokens = build()
            tmp = root / f".tokens-{digest}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, tokens)
            os.replace(tmp, path)
            meta = {**key, "num_tokens": int(tokens.shape[0]), "dtype": str(tokens.dtype)}
            (root / f"tokens-{digest}.json").write_text(json.dumps(meta, indent=1) + "\n")
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return np.load(path, mmap_mode="r"), False


def _empty_message(files: list[Path], text_field: str, holdout: tuple[str, float] | None) -> str:
    """What to do when ``files`` (or their holdout split) give no tokens: only an empty validation
    share is fixed by ``val_fraction``; an empty training set needs other files or text_field."""
    names = [str(f) for f in files][:3] + (["..."] if len(files) > 3 else [])
    if holdout is not None and holdout[0] == "val":
        return (f"data.val_fraction: no document of {names} falls in the held-out "
                f"{holdout[1]:g} share; raise data.val_fraction or give data.val_files"
                )  # fmt: skip
    return (f"data.train_files: {names} contain no text (empty files, or no {text_field!r} "
            "field: set data.text_field to the field holding the text); give files with "
            "documents")  # fmt: skip


def file_tokens(
    files: list[Path],
    tokenizer: TextTokenizer,
    *,
    text_field: str = "text",
    txt_split: str = "file",
    holdout: tuple[str, float] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, bool]:
    """``(tokens, cache_hit)`` of the documents of ``files`` (optionally one holdout split).

    The cache key is the files' content digests in order, the tokenizer fingerprint,
    ``text_field``, ``txt_split`` and ``holdout``; paths and mtimes are not part of it.
    """
    if not files:
        raise ValueError("no files to tokenize")

    def build() -> np.ndarray:
        tokens = tokenize_documents(
            iter_split_documents(files, text_field, txt_split, holdout), tokenizer
        )
        if tokens.shape[0] == 0:
            raise ValueError(_empty_message(files, text_field, holdout))
        return tokens

    key = {
        "kind": "files",
        "files": [[f.name, file_digest(f)] for f in files] if cache_dir is not None else [],
        "tokenizer": tokenizer.fingerprint,
        "text_field": text_field,
        "txt_split": txt_split,
        "holdout": list(holdout) if holdout else None,
    }
    return cached_tokens(cache_dir, key, build)
