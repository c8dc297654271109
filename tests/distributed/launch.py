"""Run a function on W real processes (gloo on CPU) and collect every rank's return value. The
processes are forked from a fork server that imported torch and frugal_dist once per test
session (``PRELOAD``); each gets the launching process's environment as it is at the launch."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the fork server that every launch's processes are forked from, instead of once
# per process (torch, and torch._dynamo, which torch.optim imports at the first optimizer, cost
# seconds of CPU each on a 2-core machine). No threads or process groups exist in the server.
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "frugal_dist",
    "tests.distributed.workers",
]


def _entry(
    rank: int, world: int, port: int, fn: Callable, args: tuple, out: str, env: dict[str, str]
) -> None:
    os.environ.clear()
    os.environ.update(env)  # the launching process's environment now, as a spawned process gets
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    # The work is done and saved: leave without running interpreter-exit destructors, which
    # occasionally abort (SIGABRT) in gloo / DeepSpeed teardown after a successful run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def start_processes(entry: Callable, args: tuple, nprocs: int, join: bool):
    """``torch.multiprocessing.start_processes`` forked from the preloaded fork server: the
    processes start without importing torch again (a spawned one takes seconds of CPU)."""
    mp.set_forkserver_preload(PRELOAD)  # read when the fork server starts (the first launch)
    return mp.start_processes(entry, args=args, nprocs=nprocs, join=join,
                              start_method="forkserver")  # fmt: skip


def run_distributed(
    fn: Callable, world: int, *args: Any, deadline_s: float | None = None
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns every rank's result.
    ``deadline_s``: kill the processes and raise ``TimeoutError`` if they run longer (a hang
    becomes a test failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        env = dict(os.environ)
        ctx = start_processes(_entry, (world, free_port(), fn, args, out, env), world, join=False)
        end = None if deadline_s is None else time.monotonic() + deadline_s
        while not ctx.join(timeout=1.0):
            if end is not None and time.monotonic() > end:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                raise TimeoutError(f"{fn.__name__} on {world} processes ran past {deadline_s} s")
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def per_world(fn: Callable) -> Callable[[int], list[Any]]:
    """``get(world)``: every rank's ``fn(rank, world)``, launched on the first call for that world
    and kept (what a module-scoped fixture returns, so that a file's tests share one launch per
    world size)."""
    cache: dict[int, list[Any]] = {}

    def get(world: int) -> list[Any]:
        if world not in cache:
            cache[world] = run_distributed(fn, world)
        return cache[world]

    return get


def _each(rank: int, world: int, fn: Callable, cases: dict[Any, tuple]) -> dict[Any, Any]:
    return {key: fn(rank, world, *args) for key, args in cases.items()}


def run_each(
    fn: Callable, world: int, cases: dict[Any, tuple], deadline_s: float | None = None
) -> dict[Any, list[Any]]:
    """``fn(rank, world, *cases[key])`` for every key, one after another in ONE launch of
    ``world`` processes (one process start and one process group for all cases instead of one
    per case); returns ``{key: [every rank's result]}``. For functions that seed what they draw
    (each case starts from the same state it would in a fresh process)."""
    got = run_distributed(_each, world, fn, cases, deadline_s=deadline_s)
    return {key: [g[key] for g in got] for key in cases}
