#!/usr/bin/env python
"""Plot a training run's curves (losses, lr, AP / mIoU against the iteration) as PNGs.

python tools/plot_metrics.py OUTPUT_DIR [--output DIR]

OUTPUT_DIR is a training output folder with ``metrics.json`` (every job; pretraining runs of
earlier versions wrote ``metrics.jsonl``, also read), or that file. A folder without one, or a file without values to
plot, is refused with one line (exit code 2).
"""

import argparse
import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="training output folder (metrics.json / metrics.jsonl) or file")
    parser.add_argument("--output", default=None, help="where to write (default: RUN/plots)")
    args = parser.parse_args(argv)
    from convmae_det.visualization.curves import plot_metrics

    folder = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
    try:
        paths = plot_metrics(args.run, args.output or os.path.join(folder, "plots"))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
