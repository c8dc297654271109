"""Worker for tests/integration/test_comm_bench.py: benchmarks/comm_bench.py's ``main`` in a
process group the launcher started (gloo, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def bench(rank: int, world: int, argv: list[str]) -> None:
    import comm_bench

    comm_bench.main(argv)
