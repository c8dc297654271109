"""The layout protocol: what FRUGAL needs to know about a parameter's local storage.

A ``ParamView`` is one logical parameter as seen on this rank: its name and logical shape, the
fragment it holds (a ``RowSpan`` of the parameter's (m, n) matrix view, possibly empty), the local
data and gradient (1-D, ``span.numel`` elements, writeable views into the engine's storage), and
the dict holding its optimizer state. A layout returns a view for *every* logical parameter of a
group on *every* rank -- empty where a rank holds nothing -- so all ranks walk the same list and
their collectives match.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from frugal_dist.core.fragments import RowSpan


@dataclass
class ParamView:
    name: str
    index: int  # position in the group's ``names`` (block schedules use it)
    shape: tuple[int, ...]  # logical shape
    span: RowSpan
    data: Tensor  # local values, 1-D with span.numel elements (or the whole param, dense)
    grad: Tensor | None
    state: MutableMapping[str, Tensor]


class Layout(Protocol):
    """What an engine adapter binds to FRUGAL with ``FRUGAL.bind_layout``."""

    process_group: Any  # the ranks whose fragments make up the parameters (None: default)
    name: str

    def views(self, optimizer: Any, group: dict[str, Any]) -> list[ParamView]:
        """One view per logical parameter of ``group`` (same order on every rank)."""
        ...

    def split_rows(self, name: str) -> list[int]:
        """Rows of ``name``'s matrix that are cut between two fragments (same on every rank)."""
        ...

    # Optional: ``schedule_names(optimizer, group) -> list[str]``, the full name list a group's
    # block schedule is drawn over when the group holds only a subset of it (fairscale OSS).


class PrefixedState(MutableMapping):
    """The entries ``"<prefix>::<key>"`` of a state dict, seen as a dict of ``key``.

    Flat layouts keep the state of every logical parameter in the state dict of the flat tensor
    that holds it, so state stays keyed by tensors the engine knows, and stays tensors only."""

    def __init__(self, parent: MutableMapping[str, Tensor], prefix: str) -> None:
        self.parent = parent
        self.prefix = prefix + "::"

    def __getitem__(self, key: str) -> Tensor:
        return self.parent[self.prefix + key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.parent[self.prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self.parent[self.prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self.prefix)
        return (k[n:] for k in list(self.parent) if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)
