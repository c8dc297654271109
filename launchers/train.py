"""The one training entry point.

    torchrun --standalone --nproc_per_node 2 launchers/train.py --config configs/tiny-cpu.yaml
    python launchers/train.py --config configs/tiny-cpu.yaml --max_steps=50 --optimizer.density=0.5
    torchrun --nproc_per_node 8 launchers/train.py --config configs/llama-60m.yaml \
        --config configs/presets/galore.yaml
    deepspeed --num_gpus 2 launchers/train.py --config configs/tiny-cpu.yaml --engine=deepspeed \
        --deepspeed_config=ds_configs/zero2.json
    mpirun -n 2 python launchers/train.py --config configs/tiny-cpu.yaml --engine=deepspeed \
        --deepspeed_config=ds_configs/zero3.json

Any config key can be overridden with ``--key=value`` or ``--key value`` (dotted keys for the
``optimizer`` and ``data`` sections; ``--max-steps`` = ``--max_steps``). ``--help`` lists every
key with its default. Checkpoints go to ``<output_dir>/checkpoints``; ``--resume auto`` continues
from the newest complete one, ``--resume PATH`` from that one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch.distributed as dist

from frugal_dist.train.config import TrainConfig, load_config
from frugal_dist.train.input_errors import InputError, exit_on_input_error, input_errors
from frugal_dist.train.loop import train


def join_values(tokens: list[str]) -> list[str]:
    """``--key value`` -> ``--key=value`` (so ``--resume auto``, ``--max-steps 50`` work like
    ``--resume=auto``; hyphens in keys become underscores in ``apply_overrides``)."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.startswith("--") and "=" not in tok and nxt is not None and not nxt.startswith("--"):
            out.append(f"{tok}={nxt}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    keys = "\n".join(
        f"  --{f.name}=...  (default: {getattr(defaults, f.name)!r})"
        for f in dataclasses.fields(TrainConfig)
    )
    parser = argparse.ArgumentParser(
        description="Pre-train a LLaMA-style model with FRUGAL (or a baseline).",
        epilog="config keys (override any with --key=value; sections with --optimizer.lr=...):\n"
        + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", action="append", default=None,
        help="YAML config file (configs/*.yaml); repeat to combine, later files override earlier "
        "ones (e.g. --config configs/llama-60m.yaml --config configs/presets/galore.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher; env has it
    args, overrides = parser.parse_known_args(argv)
    overrides = join_values(overrides)
    try:
        with input_errors():
            cfg = load_config(args.config, overrides)
        train(cfg)
    except InputError as exc:  # one line on rank 0, exit code 2 on every rank
        exit_on_input_error(exc)
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
