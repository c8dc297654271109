"""Rank 0's view of a run: progress bar or lines, ``metrics.jsonl`` and TensorBoard events.

* terminal: a tqdm bar when stdout is a TTY (and tqdm is installed), one plain line per logged
  step otherwise -- loss, validation loss, lr, tokens/s, memory, ETA;
* ``<output_dir>/metrics.jsonl``: one JSON object per logged step (step, tokens, loss, lr,
  tokens_per_s, mem_gib, elapsed_s; val_loss and val_ppl where evaluated; test_loss and
  test_ppl in the last step's record with ``data.test_files``; opt_state_mib,
  comm_bytes where known). On resume from step s the records after s are dropped first, so the
  file is the curve of one run;
* ``<output_dir>/tensorboard/``: the same scalars (``torch.utils.tensorboard``; skipped when
  tensorboard is not installed), purged after step s on resume; validation under ``val/``, the
  rest under ``train/`` (``frugal_dist.train.metric_sinks``), as in any further ``sinks`` (W&B).

Lines go through the ``frugal_dist`` logger (``frugal_dist.train.logs``).

Memory is CUDA's peak allocated bytes on GPU, the process's resident set size on CPU.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from frugal_dist.train.logs import logger
from frugal_dist.train.metric_sinks import Sink, tensorboard_sink

NUMERIC = ("loss", "lr", "val_loss", "val_ppl", "test_loss", "test_ppl", "tokens_per_s",
           "mem_gib", "opt_state_mib", "comm_bytes", "skipped_steps")  # fmt: skip


def memory_gib(device: torch.device | str | None = None) -> float:
    """Peak CUDA memory allocated (GPU) or current resident set size (CPU), in GiB."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize() / 2**30
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS (KiB on Linux, B on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= ``last_step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed run
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Progress output of one run; every method is a no-op except on rank 0."""

    def __init__(
        self,
        out_dir: str | Path | None,
        rank: int,
        start_step: int,
        max_steps: int,
        use_bar: bool | None = None,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.active = rank == 0
        self.start_step, self.max_steps = start_step, max_steps
        self.t0 = time.perf_counter()
        self.metrics_fh = None
        self.sinks: list[Sink] = list(sinks) if rank == 0 else []
        self.bar = None
        if not self.active:
            return
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "metrics.jsonl"
            if start_step > 0:
                truncate_metrics(path, start_step)
            elif path.exists():
                path.unlink()  # a fresh run: its own curve only
            self.metrics_fh = open(path, "a")  # noqa: SIM115 - closed in close()
            board = tensorboard_sink(self.out_dir / "tensorboard", start_step)
            if board is not None:
                self.sinks.insert(0, board)
        if use_bar is None:
            use_bar = sys.stdout.isatty()
        if use_bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=max_steps, initial=start_step, unit="step",
                                dynamic_ncols=True)  # fmt: skip
            except ImportError:
                self.bar = None

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.max_steps - step)

    def update(self, record: dict[str, Any], logged: bool) -> None:
        """Called every step with the step's record; ``logged``: a log/eval step (written to
        metrics.jsonl and TensorBoard, printed when there is no bar)."""
        if not self.active:
            return
        step = record["step"]
        record.setdefault("elapsed_s", time.perf_counter() - self.t0)
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}"}
            if "val_loss" in record:
                post["val"] = f"{record['val_loss']:.4f}"
            if "tokens_per_s" in record:
                post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
            if "mem_gib" in record:
                post["mem"] = f"{record['mem_gib']:.2f}G"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)
        if not logged:
            return
        if self.bar is None:
            parts = [f"step {step:5d}/{self.max_steps}", f"loss {record['loss']:.4f}"]
            if "val_loss" in record:
                parts.append(f"val {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})")
            if "test_loss" in record:
                parts.append(f"test {record['test_loss']:.4f} (ppl {record['test_ppl']:.2f})")
            parts += [f"lr {record['lr']:.2e}", f"{record.get('tokens_per_s', 0):,.0f} tok/s",
                      f"mem {record.get('mem_gib', 0):.2f} GiB"]  # fmt: skip
            if "opt_state_mib" in record:
                parts.append(f"opt state {record['opt_state_mib']:.2f} MiB")
            if "comm_bytes" in record:
                parts.append(f"comm {record['comm_bytes'] / 2**20:.2f} MiB")
            parts.append(f"ETA {_fmt_eta(self.eta_s(step))}")
            logger.info(" | ".join(parts))
        if self.metrics_fh is not None:
            self.metrics_fh.write(json.dumps(record) + "\n")
            self.metrics_fh.flush()
        scalars = {key: record[key] for key in NUMERIC if key in record}
        for sink in self.sinks:
            sink.log(scalars, step)

    def note(self, text: str) -> None:
        """A message that does not break the bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(f"[frugal_dist] {text}")
        else:
            logger.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics_fh is not None:
            self.metrics_fh.close()
            self.metrics_fh = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
