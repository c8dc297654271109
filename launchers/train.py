"""The one training entry point.

    torchrun --standalone --nproc_per_node 2 launchers/train.py --config configs/tiny-cpu.yaml
    python launchers/train.py --config configs/tiny-cpu.yaml --max_steps 50 --optimizer.density 0.5
    torchrun --nproc_per_node 8 launchers/train.py --config configs/llama-60m.yaml \
        --config configs/presets/galore.yaml
    deepspeed --num_gpus 2 launchers/train.py --config configs/tiny-cpu.yaml --engine=deepspeed \
        --deepspeed_config=ds_configs/zero2.json
    mpirun -n 2 python launchers/train.py --config configs/tiny-cpu.yaml --engine=deepspeed \
        --deepspeed_config=ds_configs/zero3.json

``--help`` lists every key (the run's, the optimizer's, the data's) with a description, its
choices and its default (``frugal_dist.train.config_cli``). Checkpoints go to
``<output_dir>/checkpoints``; ``--resume auto`` continues from the newest complete one,
``--resume PATH`` from that one. A bad input prints one line on rank 0 and exits with code 2 on
every rank (``frugal_dist.train.input_errors``).
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from frugal_dist.train.config import load_config
from frugal_dist.train.config_cli import parse_command_line
from frugal_dist.train.input_errors import (
    INPUT_EXCEPTIONS,
    exit_on_input_error,
    input_errors,
    is_input_error,
)
from frugal_dist.train.loop import train


def main(argv: list[str] | None = None) -> None:
    files, overrides = parse_command_line(argv)
    try:
        with input_errors():
            cfg = load_config(files, overrides)
        train(cfg)
    except INPUT_EXCEPTIONS as exc:
        if not is_input_error(exc):
            raise
        exit_on_input_error(exc)  # one line on rank 0, exit code 2 on every rank
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Everything is written and the group is gone. Leave without interpreter-exit destructors:
    # about one run in five on torch 2.13/gloo aborted there ("terminate called without an active
    # exception", SIGABRT) after a successful run, turning a good job into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    if argv is None:  # a real process, not a caller importing main()
        os._exit(0)


if __name__ == "__main__":
    main()
