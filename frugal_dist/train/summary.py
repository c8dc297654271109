"""The end of a run: a short summary (returned, logged on rank 0, ``<output_dir>/summary.json``).

``first_loss`` and ``last_loss`` are the training losses of this run's first and last steps, the
same numbers the progress lines show for those steps (both steps are always logged). The whole
curve is ``metrics.jsonl`` (and ``summary["losses"]`` in the returned dict, not in the file).
``test_loss`` (the test split's loss after the last step) is there only with ``data.test_files``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from frugal_dist.train.logs import logger


def run_summary(history: list[dict[str, Any]], *, val_loss: float, tokens: int, elapsed_s: float,
                world: int, engine: str, optimizer: Any,
                test_loss: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The summary of a run whose per-step records are ``history``."""
    stats = optimizer.comm_stats() if hasattr(optimizer, "comm_stats") else None
    out = {
        "steps": len(history),
        "first_step": history[0]["step"] if history else None,
        "last_step": history[-1]["step"] if history else None,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "val_loss": val_loss,
        "tokens": tokens,
        "elapsed_s": elapsed_s,
        "world_size": world,
        "engine": engine,
        "state_bytes": optimizer.state_bytes() if hasattr(optimizer, "state_bytes") else None,
        "comm_bytes_last_step": stats["last_step_total"] if stats else None,
        "losses": [r["loss"] for r in history],
    }
    if test_loss is not None:
        out["test_loss"] = test_loss
    return out


def summary_line(s: dict[str, Any]) -> str:
    """One human line: steps, tokens, time, first -> last loss, validation, optimizer state."""
    parts = [f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['elapsed_s']:.1f} s"]
    if s["steps"]:
        parts.append(f"loss {s['first_loss']:.4f} (step {s['first_step']}) -> "
                     f"{s['last_loss']:.4f} (step {s['last_step']})")  # fmt: skip
    if s["val_loss"] is not None and not math.isnan(s["val_loss"]):
        parts.append(f"val loss {s['val_loss']:.4f} (ppl {math.exp(min(s['val_loss'], 50)):.2f})")
    if s.get("test_loss") is not None:
        t = s["test_loss"]
        parts.append(f"test loss {t:.4f} (ppl {math.exp(min(t, 50)):.2f})")
    if s["state_bytes"] is not None:
        parts.append(f"optimizer state {s['state_bytes'] / 2**20:.2f} MiB/rank")
    return " | ".join(parts)


def report(summary: dict[str, Any], out_dir: Path | None) -> None:
    """Rank 0: log the summary line; with ``out_dir`` write ``summary.json`` and the plot."""
    logger.info(summary_line(summary))
    if out_dir is None:
        return
    path = out_dir / "summary.json"
    path.write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))
    try:
        from frugal_dist.train.plot import plot_runs

        logger.info(f"summary: {path} | plot: {plot_runs([out_dir], out_dir / 'curves.png')}")
    except ImportError as exc:
        logger.info(f"summary: {path} | no plot ({exc})")
