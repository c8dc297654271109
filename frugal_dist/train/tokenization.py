"""Tokenizers for the data pipeline: byte level, a ``tokenizers`` JSON file, or a Hugging Face one.

``data.tokenizer`` selects one (see ``frugal_dist.train.pipeline`` for every data key):

- ``byte`` (default): ``ByteTokenizer``, UTF-8 bytes, vocab 257 (256 bytes + EOS = 256).
- a path to a ``tokenizers`` JSON file (``.json``), e.g. a byte-level BPE: ``FileTokenizer``.
- anything else: a Hugging Face tokenizer name or directory, via ``transformers.AutoTokenizer``
  (``HFTokenizer``).

Every tokenizer exposes ``vocab_size`` (the model's embedding size follows it), ``eos_id``
(appended after every document when packing), ``encode_batch(texts)`` (no special tokens; the
Rust tokenizers run it on all cores), ``decode(ids)`` and ``fingerprint`` (a digest of
everything that determines the ids, which keys the on-disk token cache). The EOS token is
``data.eos_token`` if given, else the tokenizer's own (``eos_token`` of a Hugging Face
tokenizer) or the first special token whose text is a usual end-of-text marker
(``<|endoftext|>``, ``</s>``, ``<eos>``, ...).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from frugal_dist.train.data import ByteTokenizer

__all__ = [
    "EOS_CANDIDATES",
    "FileTokenizer",
    "HFTokenizer",
    "TextTokenizer",
    "load_tokenizer",
]

EOS_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
    "<|im_end|>",
)


@runtime_checkable
class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str: ...


def _ids(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class FileTokenizer:
    """A ``tokenizers.Tokenizer`` JSON file. ``encode_batch`` is multi-threaded in Rust."""

    def __init__(self, path: str | os.PathLike[str], eos_token: str | None = None) -> None:
        import tokenizers

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data.tokenizer: tokenizer file {str(self.path)!r} does not exist")
        raw = self.path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # the Rust error says what is wrong with the JSON
            raise ValueError(
                f"data.tokenizer: {str(self.path)!r} is not a tokenizers JSON file ({exc})"
            ) from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        self.eos_token = _pick_eos(eos_token, None, specials, self._tok.get_vocab(), self.path)
        self.eos_id = int(self._tok.token_to_id(self.eos_token))
        self.fingerprint = _digest(b"file", raw, self.eos_token.encode())
        fast = getattr(self._tok, "encode_batch_fast", None)  # no offsets: faster (>= 0.20)
        self._encode_batch = fast if fast is not None else self._tok.encode_batch

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self._tok.decode(_ids(ids), skip_special_tokens=False)


class HFTokenizer:
    """A ``transformers.AutoTokenizer`` (hub name or local directory)."""

    def __init__(self, name_or_path: str, eos_token: str | None = None) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:
            raise ValueError(
                f"data.tokenizer: {name_or_path!r} is neither 'byte', a tokenizers .json file, "
                f"nor a loadable Hugging Face tokenizer name/directory ({exc})"
            ) from None
        self.name = name_or_path
        vocab = self._tok.get_vocab()
        self.vocab_size = max(len(self._tok), max(vocab.values()) + 1)
        own = self._tok.eos_token
        specials = list(getattr(self._tok, "all_special_tokens", []))
        self.eos_token = _pick_eos(eos_token, own, specials, vocab, name_or_path)
        self.eos_id = int(self._tok.convert_tokens_to_ids(self.eos_token))
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            content = backend.to_str().encode()
        else:
            content = repr(sorted(vocab.items())).encode()
        self.fingerprint = _digest(
            b"hf", type(self._tok).__name__.encode(), content, self.eos_token.encode()
        )

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self._tok.decode(_ids(ids), skip_special_tokens=False)


def _pick_eos(
    configured: str | None,
    own: str | None,
    specials: list[str],
    vocab: dict[str, int],
    where: object,
) -> str:
    if configured is not None:
        if configured not in vocab:
            raise ValueError(
                f"data.eos_token {configured!r} is not in the vocabulary of tokenizer {where}"
            )
        return configured
    if own is not None and own in vocab:
        return own
    for cand in EOS_CANDIDATES:
        if cand in specials or cand in vocab:
            return cand
    raise ValueError(
        f"tokenizer {where} has no recognisable end-of-text token (special tokens: {specials}); "
        f"set data.eos_token to the token that separates documents"
    )


def load_tokenizer(spec: str = "byte", eos_token: str | None = None) -> TextTokenizer:
    """The tokenizer named by ``data.tokenizer`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data.tokenizer must be a non-empty string, got {spec!r}")
    if spec == "byte":
        if eos_token is not None:
            raise ValueError("data.eos_token is not used with tokenizer 'byte' (EOS is id 256)")
        return ByteTokenizer()
    if spec.endswith(".json"):
        return FileTokenizer(spec, eos_token)
    return HFTokenizer(spec, eos_token)
