"""Plot training loss and validation perplexity vs tokens for one or more runs.

python launchers/plot.py runs/tiny-cpu runs/other -o curves.png [--labels a b]
"""

from __future__ import annotations

import argparse
import sys

from frugal_dist.train.plot import plot_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("-o", "--output", default="curves.png", help="image file to write")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.runs, args.output, args.labels)
    except (ValueError, ImportError) as exc:
        print(f"plot error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
