"""Loss and validation perplexity against tokens seen, for one or several runs.

Reads each run directory's ``metrics.jsonl`` (written by the training loop) and draws two
panels: training loss vs tokens, validation perplexity (exp of the validation loss) vs tokens.
Needs matplotlib (a ``dev`` extra); ``plot_runs`` raises ``ImportError`` naming it otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a training output_dir?)")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Draw every run of ``run_dirs`` into the image ``out``; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(run_dirs):
        records = read_metrics(run)
        label = labels[i] if labels is not None else Path(run).name
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        val = [(r["tokens"], r["val_ppl"]) for r in records if "val_ppl" in r]
        if train:
            ax_loss.plot(*zip(*train), label=label)
        if val:
            ax_ppl.plot(*zip(*val), marker="o", label=label)
    ax_loss.set(xlabel="tokens", ylabel="training loss", title="training loss")
    ax_ppl.set(xlabel="tokens", ylabel="validation perplexity", title="validation perplexity",
               yscale="log")  # fmt: skip
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
