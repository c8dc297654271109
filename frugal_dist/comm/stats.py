"""Byte accounting of every collective FRUGAL issues.

``payload`` bytes are the bytes of the tensor this rank hands to the collective (what a user
compares with DDP's all-reduce of the full gradient). ``wire`` bytes estimate what a ring
algorithm sends per rank: all-reduce 2(W-1)/W x payload, all-gather and broadcast (W-1)/W x the
gathered / broadcast total.
"""

from __future__ import annotations

from collections import defaultdict


class CommStats:
    """Per-kind byte counters: ``last_step`` (the most recent ``step()``) and ``total``."""

    def __init__(self) -> None:
        self.total: dict[str, int] = defaultdict(int)
        self.total_wire: dict[str, float] = defaultdict(float)
        self.last_step: dict[str, int] = defaultdict(int)
        self.last_wire: dict[str, float] = defaultdict(float)
        self.steps = 0

    def begin_step(self) -> None:
        self.last_step = defaultdict(int)
        self.last_wire = defaultdict(float)
        self.steps += 1

    def add(self, kind: str, payload: int, wire: float) -> None:
        self.last_step[kind] += int(payload)
        self.total[kind] += int(payload)
        self.last_wire[kind] += float(wire)
        self.total_wire[kind] += float(wire)

    def as_dict(self) -> dict[str, object]:
        return {
            "last_step": dict(self.last_step),
            "last_step_wire": dict(self.last_wire),
            "last_step_total": sum(self.last_step.values()),
            "total": dict(self.total),
            "steps": self.steps,
        }
