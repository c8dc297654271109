"""Deterministic seeds: every random choice is a pure function of (base_seed, keys...).

Subspace selection for parameter ``name`` at refresh ``k`` uses
``make_generator(derive_seed(base_seed, "coord", name, k))``. Generators are CPU generators so the
same draw happens on every device and every rank; results are moved to the parameter's device.
No communication is involved: ranks agree because they share ``base_seed``.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(base_seed: int, *keys: object) -> int:
    """A 63-bit seed from ``base_seed`` and any printable keys (stable across processes/runs).

    Uses BLAKE2b of the keys' ``repr`` joined by NUL, never Python's salted ``hash()``.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(base_seed)).encode())
    for key in keys:
        h.update(b"\x00")
        h.update(repr(key).encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def block_seed(base_seed: int, names: tuple[str, ...] | list[str]) -> int:
    """Seed of a group's block schedule: depends on the names of the group's split tensors."""
    return derive_seed(base_seed, "block", tuple(names))


def coordinate_seed(base_seed: int, name: str, refresh: int) -> int:
    """Seed of parameter ``name``'s coordinate subspace at refresh ``refresh``."""
    return derive_seed(base_seed, "coordinate", name, int(refresh))


def projection_seed(base_seed: int, name: str, refresh: int) -> int:
    """Seed of parameter ``name``'s random/randperm projection at refresh ``refresh``."""
    return derive_seed(base_seed, "projection", name, int(refresh))
