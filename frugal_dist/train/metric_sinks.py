"""Where rank 0's logged scalars go besides ``metrics.jsonl``: TensorBoard and Weights & Biases.

Tags: validation scalars under ``val/`` (``val_loss`` -> ``val/loss``, ``val_ppl`` -> ``val/ppl``),
the test split's (``data.test_files``, last step only) under ``test/`` (``test/loss``,
``test/ppl``), everything else under ``train/`` (``train/loss``, ``train/lr``,
``train/tokens_per_s``, ...).

* ``TensorBoardSink(log_dir, start_step)`` -- ``torch.utils.tensorboard``; events after
  ``start_step`` are purged on resume. ``tensorboard_sink`` returns None when tensorboard is not
  installed (it is optional).
* ``WandbSink(project, mode, out_dir, run_name, config)`` -- Weights & Biases, imported only when a
  run sets ``wandb_project``. ``mode="offline"`` (the default) writes the run under
  ``<out_dir>/wandb`` with no network access (upload later with ``wandb sync``); ``"online"``
  streams it. ``check_wandb_available()`` raises ``ValueError`` with the install line when the
  package is missing, at config time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

WANDB_MODES = ("offline", "online")
VAL_KEYS = {
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "test_loss": "test/loss",
    "test_ppl": "test/ppl",
}


def tag(key: str) -> str:
    """The dashboard tag of a record key (see the module docstring)."""
    return VAL_KEYS.get(key, f"train/{key}")


class Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars as TensorBoard events under ``log_dir``."""

    def __init__(self, log_dir: str | Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_sink(log_dir: str | Path, start_step: int = 0) -> TensorBoardSink | None:
    """A ``TensorBoardSink``, or None without the tensorboard package."""
    try:
        return TensorBoardSink(log_dir, start_step)
    except ImportError:
        return None


def check_wandb_available(project: str | None, mode: str) -> None:
    """Config-time checks of the W&B keys (``ValueError`` naming the key and the fix)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode must be one of {list(WANDB_MODES)}, got {mode!r}")
    if project is None:
        return
    if not isinstance(project, str) or not project:
        raise ValueError(f"wandb_project must be a W&B project name or null, got {project!r}")
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"wandb_project={project!r} needs the wandb package: pip install wandb "
            "(or drop wandb_project to log to TensorBoard and metrics.jsonl only)"
        )


class WandbSink:
    """Scalars as one W&B run (see the module docstring)."""

    def __init__(self, project: str, mode: str, out_dir: str | Path | None,
                 run_name: str | None, config: dict[str, Any]) -> None:  # fmt: skip
        import wandb

        check_wandb_available(project, mode)
        self.wandb = wandb
        self.run = wandb.init(project=project, mode=mode, name=run_name, config=config,
                              dir=str(out_dir) if out_dir is not None else None)  # fmt: skip

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({tag(k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
