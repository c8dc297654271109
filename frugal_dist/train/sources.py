"""Document sources: local files (txt / JSONL / compressed JSONL / parquet) and HF ``datasets``.

A *document* is one string; the packer appends EOS after each. Readers, by file name suffix:

- ``.txt``: the whole file is one document (``txt_split: file``), or one document per block of
  text separated by blank lines (``txt_split: blank_line``; line breaks at its ends dropped).
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.xz`` (also ``.json.gz`` / ``.ndjson``): one JSON object per
  line; the document is its ``text_field`` (default ``"text"``).
- ``.parquet``: the ``text_field`` column, read in record batches with pyarrow.

Files are read in the order given (each glob's matches sorted), documents in file order.
Without explicit validation files, documents are split by ``holdout_split``: a BLAKE2b hash of
the document text (not Python's salted ``hash()``) puts a stable ``val_fraction`` of them in
"val", so the split never depends on file order, world size or interpreter.

``load_hf_dataset`` is the one entry point for Hugging Face ``datasets``: hub datasets
(``allenai/c4``) and the packaged local builders (``json`` with ``data_files``) go through the
same ``datasets.load_dataset`` call, streaming or not.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FILE_SUFFIXES",
    "expand_files",
    "file_digest",
    "hf_documents",
    "holdout_split",
    "iter_file_documents",
    "iter_split_documents",
    "load_hf_dataset",
]

FILE_SUFFIXES = (
    ".txt",
    ".jsonl",
    ".ndjson",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl.xz",
    ".jsonl.bz2",
    ".parquet",
)
_BUCKETS = 1_000_000
_BLANK_LINES = re.compile(r"\n\s*\n")


def expand_files(spec: str | list[str] | None, field: str) -> list[Path]:
    """Paths of ``spec`` (a glob or a list of globs/paths), each glob's matches sorted.

    ``field`` names the config key for error messages. Duplicates keep their first position.
    """
    if spec is None:
        return []
    patterns = [spec] if isinstance(spec, str) else spec
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"data.{field} must be a glob string or a list of them, got {spec!r}")
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = (
            sorted(glob.glob(pattern, recursive=True))
            if glob.has_magic(pattern)
            else ([pattern] if os.path.exists(pattern) else [])
        )
        if not matches:
            raise ValueError(f"data.{field}: no file matches {pattern!r} (relative paths start "
                             f"at {os.getcwd()}); check the path or the glob")  # fmt: skip
        for m in matches:
            path = Path(m).resolve()
            if path.is_dir():
                raise ValueError(
                    f"data.{field}: {m!r} is a directory; give a glob like dir/*.jsonl"
                )
            if not str(path).endswith(FILE_SUFFIXES):
                raise ValueError(
                    f"data.{field}: {m!r} has an unsupported suffix; supported: {FILE_SUFFIXES}"
                )
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """BLAKE2b of a file's bytes (keys the token cache by content, not path or mtime)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_text(path: Path) -> IO[str]:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_file_documents(
    path: Path, text_field: str = "text", txt_split: str = "file"
) -> Iterator[str]:
    """The documents of one file (see the module docstring for formats)."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(
                f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                f"set data.text_field"
            )
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
        return
    if name.endswith(".txt"):
        with _open_text(path) as fh:
            text = fh.read()
        if txt_split == "file":
            if text:
                yield text
        else:
            parts = (part.strip("\r\n") for part in _BLANK_LINES.split(text))
            yield from (part for part in parts if part.strip())
        return
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{lineno}: no field {text_field!r} (found {keys}); set data.text_field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is not a string")
            if text:
                yield text


def holdout_split(text: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for a document, by a stable hash of its text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % _BUCKETS
    return "val" if bucket < round(val_fraction * _BUCKETS) else "train"


def iter_split_documents(
    files: list[Path],
    text_field: str = "text",
    txt_split: str = "file",
    holdout: tuple[str, float] | None = None,
) -> Iterator[str]:
    """Documents of ``files`` in order; with ``holdout=(split, fraction)`` only that split's."""
    for path in files:
        for text in iter_file_documents(path, text_field, txt_split):
            if holdout is None or holdout_split(text, holdout[1]) == holdout[0]:
                yield text


def load_hf_dataset(
    name: str,
    config: str | None = None,
    split: str = "train",
    data_files: Any = None,
    streaming: bool = True,
    revision: str | None = None,
) -> Any:
    """``datasets.load_dataset`` for a hub dataset or a packaged builder (``json`` + files).

    Returns an ``IterableDataset`` when ``streaming`` else a map-style ``Dataset``.
    """
    import datasets

    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return datasets.load_dataset(name, config, **kwargs)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise ValueError(
                f"data.split/val_split: dataset {name!r} (config {config!r}) has no split "
                f"{split!r} ({exc})"
            ) from None
        raise


def hf_documents(dataset: Iterable[dict[str, Any]], text_field: str = "text") -> Iterator[str]:
    """The non-empty ``text_field`` strings of a ``datasets`` dataset, in order."""
    for i, record in enumerate(dataset):
        try:
            text = record[text_field]
        except KeyError:
            raise ValueError(
                f"dataset record {i} has no field {text_field!r} (found {list(record)}); "
                f"set data.text_field"
            ) from None
        if text:
            yield text
