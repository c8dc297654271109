"""The embedded default corpus (the Python standard library's own source) and data plumbing.

No download is needed: every machine with Python has the stdlib ``.py`` files. Documents are
single files, tokenized as UTF-8 bytes (``ByteTokenizer``, vocab 257 = 256 bytes + EOS) and
concatenated with EOS between them. Files go to "train" or "val" by a stable BLAKE2b hash of
their path relative to the stdlib root (about 2 % val), so the split never depends on Python's
salted ``hash()``. Note the corpus is per-interpreter: different Python versions ship different
stdlib text, so compare runs on the same interpreter.

``PackedDataset`` cuts a token stream (a torch tensor, or a numpy array such as the memory-mapped
uint16 token cache of ``frugal_dist.train.token_cache``) into contiguous ``seq_len`` chunks and
serves deterministic, rank-sharded batches: the rows of all ranks at a step, concatenated in
rank order, equal the single-process batch of size ``batch_size * world_size`` at that step.
Other sources (local files, Hugging Face datasets) and tokenizers: ``frugal_dist.train.pipeline``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "ByteTokenizer",
    "PackedDataset",
    "Tokenizer",
    "embedded_token_stream",
    "file_split",
    "load_embedded",
    "stdlib_corpus_files",
    "stdlib_root",
]

VAL_FRACTION = 0.02
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
_HASH_BUCKETS = 10_000


class Tokenizer(Protocol):
    """What ``embedded_token_stream`` needs from a tokenizer."""

    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens)."""
        ...


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, 256 is end-of-sequence."""

    vocab_size: int = 257
    eos_id: int = 256
    fingerprint: str = "byte-utf8-v1"  # keys the token cache (frugal_dist.train.token_cache)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ints."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text."""
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Inverse of ``encode``; EOS ids are dropped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def stdlib_root() -> pathlib.Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_files(root: str | os.PathLike[str] | None = None) -> list[pathlib.Path]:
    """All stdlib ``.py`` files under ``root`` (default: the running interpreter's stdlib).

    Directories named ``site-packages``, ``test``, ``tests``, ``idlelib``, ``lib2to3`` (and
    ``dist-packages``, ``__pycache__``) are skipped. Symlinked directories are not
    followed. Sorted by POSIX path relative to ``root``.
    """
    base = pathlib.Path(root) if root is not None else stdlib_root()
    found: list[tuple[str, pathlib.Path]] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for fname in filenames:
            if fname.endswith(".py"):
                path = pathlib.Path(dirpath, fname)
                if path.is_file():
                    found.append((path.relative_to(base).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _path_digest(rel_path: str) -> bytes:
    return hashlib.blake2b(rel_path.encode("utf-8"), digest_size=8).digest()


def file_split(rel_path: str, val_fraction: float = VAL_FRACTION) -> str:
    """``"val"`` or ``"train"`` for a file, by a stable hash of its relative POSIX path."""
    bucket = int.from_bytes(_path_digest(rel_path), "little") % _HASH_BUCKETS
    return "val" if bucket < round(val_fraction * _HASH_BUCKETS) else "train"


def embedded_token_stream(
    split: str,
    tokenizer: Tokenizer,
    max_bytes: int | None = None,
    root: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Token ids (1-D int64) of the stdlib corpus ``split`` ("train" or "val").

    Each file is a document followed by ``tokenizer.eos_id``. Documents are taken in a fixed
    pseudo-random order (by the BLAKE2b hash of their relative path, so a ``max_bytes`` prefix
    samples the whole library rather than only modules starting with "a"). ``max_bytes`` caps
    the number of file bytes read; the last document is truncated to fit. ``None`` reads all.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    base = pathlib.Path(root) if root is not None else stdlib_root()
    docs: list[tuple[bytes, str, pathlib.Path]] = []
    for path in stdlib_corpus_files(base):
        rel = path.relative_to(base).as_posix()
        if file_split(rel) == split:
            docs.append((_path_digest(rel), rel, path))
    docs.sort()
    byte_level = isinstance(tokenizer, ByteTokenizer)
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int64)
    pieces: list[torch.Tensor] = []
    remaining = max_bytes
    for _, _, path in docs:
        if remaining is not None and remaining <= 0:
            break
        data = path.read_bytes()
        if remaining is not None:
            data = data[:remaining]
            remaining -= len(data)
        if not data:
            continue
        if byte_level:
            ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        else:
            text = data.decode("utf-8", errors="replace")
            ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
        pieces.append(ids)
        pieces.append(eos)
    if not pieces:
        raise RuntimeError(f"no stdlib source found under {base} for split {split!r}")
    return torch.cat(pieces)


def _epoch_seed(seed: int, epoch: int) -> int:
    h = hashlib.blake2b(f"packed-dataset\x00{int(seed)}\x00{int(epoch)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


class PackedDataset:
    """Non-overlapping contiguous ``seq_len`` chunks of a 1-D token tensor (tail dropped).

    Sequence order is a seeded permutation per epoch (reshuffled every epoch, a pure function
    of ``(seed, epoch)``). The global sample stream is: epoch 0's permutation, then epoch 1's,
    and so on; the global batch at ``step`` is samples ``[step * G, (step + 1) * G)`` of that
    stream with ``G = batch_size * world_size``, and rank ``r`` gets rows
    ``[r * batch_size, (r + 1) * batch_size)`` of it.
    """

    def __init__(self, tokens: torch.Tensor | np.ndarray, seq_len: int, seed: int = 0) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        n = int(tokens.shape[0]) // seq_len
        if n == 0:
            raise ValueError(f"{tokens.shape[0]} tokens is fewer than one sequence of {seq_len}")
        self.seq_len = seq_len
        self.seed = seed
        # A numpy array (e.g. a memory-mapped uint16 token cache) stays in its compact dtype;
        # rows are widened to int64 only when a batch is gathered.
        self.sequences: torch.Tensor | np.ndarray
        if isinstance(tokens, np.ndarray):
            self.sequences = tokens[: n * seq_len].reshape(n, seq_len)
        else:
            self.sequences = tokens[: n * seq_len].to(torch.int64).view(n, seq_len)
        self._perms: dict[int, torch.Tensor] = {}
        self._next_step = 0

    def __len__(self) -> int:
        return int(self.sequences.shape[0])

    def _rows(self, index: torch.Tensor | int) -> torch.Tensor:
        if isinstance(self.sequences, np.ndarray):
            picked = self.sequences[index.numpy() if isinstance(index, torch.Tensor) else index]
            return torch.from_numpy(np.asarray(picked, dtype=np.int64))
        return self.sequences[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        """The ``index``-th chunk in file order (not permuted)."""
        return self._rows(index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One epoch (epoch 0) of sequences in permuted order."""
        for i in self.permutation(0).tolist():
            yield self._rows(i)

    @property
    def num_tokens(self) -> int:
        """Tokens covered by the sequences (tail excluded)."""
        return len(self) * self.seq_len

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sequence order of ``epoch`` (cached)."""
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            perm = torch.randperm(len(self), generator=gen)
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def global_indices(self, step: int, global_batch_size: int) -> torch.Tensor:
        """Sequence indices of the global batch at ``step`` (may straddle an epoch boundary)."""
        n = len(self)
        start = step * global_batch_size
        positions = torch.arange(start, start + global_batch_size)
        epochs = positions // n
        offsets = positions % n
        out = torch.empty(global_batch_size, dtype=torch.int64)
        for epoch in torch.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self.permutation(epoch)[offsets[mask]]
        return out

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rows ``[rank * batch_size, (rank + 1) * batch_size)`` of the global batch at ``step``.

        Returns an int64 tensor of shape ``(batch_size, seq_len)``; use it as both
        ``input_ids`` and ``labels`` (the model shifts internally).
        """
        if step < 0 or batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad batch request: step={step} batch_size={batch_size} "
                f"rank={rank} world_size={world_size}"
            )
        idx = self.global_indices(step, batch_size * world_size)
        self._next_step = max(self._next_step, step + 1)
        return self._rows(idx[rank * batch_size : (rank + 1) * batch_size])

    def state_dict(self) -> dict[str, int | str]:
        """Position and identity (JSON-able). Batches are a pure function of ``step``, so the
        position (``next_step``: one past the highest step served) is informational; the
        identity fields let ``load_state_dict`` detect that the data changed."""
        return {
            "kind": "packed",
            "next_step": self._next_step,
            "num_sequences": len(self),
            "seq_len": self.seq_len,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Restore the position; ``ValueError`` if the state is from a different dataset."""
        mine = self.state_dict()
        for key in ("kind", "num_sequences", "seq_len", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data state mismatch on {key!r}: checkpoint has {state.get(key)!r}, this "
                    f"dataset has {mine[key]!r} (different data, tokenizer, seq_len or seed)"
                )
        self._next_step = int(state["next_step"])


def load_embedded(
    seq_len: int, seed: int = 0, max_bytes: int | None = 2_000_000
) -> tuple[PackedDataset, PackedDataset, ByteTokenizer]:
    """``(train, val, tokenizer)`` over the stdlib corpus with a byte tokenizer.

    ``max_bytes`` caps each split separately (val is only ~2 % of the library, so it is
    usually read in full). The val dataset uses seed ``seed + 1``.
    """
    tok = ByteTokenizer()
    train = PackedDataset(embedded_token_stream("train", tok, max_bytes), seq_len, seed)
    val = PackedDataset(embedded_token_stream("val", tok, max_bytes), seq_len, seed + 1)
    return train, val, tok
