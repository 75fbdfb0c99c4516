#!/usr/bin/env python
"""Generate the embedded toy shapes dataset (COCO format) ahead of time.

    python datasets/generate_toy_coco.py [--root DIR] [--splits toy_coco_train toy_coco_val ...]

Without ``--root`` the data goes to ``$DETECTRON2_DATASETS/toy_coco`` (default
``datasets/toy_coco``), where the registered ``toy_coco_*`` datasets look for it. Training and
evaluation generate missing splits on first use anyway; this script only does it up front.
"""

import argparse
import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convmae_det.data.datasets.toy_coco import TOY_SPLITS, ensure_toy_split, toy_coco_root  # noqa


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="", help="output folder (default: %(default)r -> "
                        "$DETECTRON2_DATASETS/toy_coco)")  # fmt: skip
    parser.add_argument("--splits", nargs="*", default=list(TOY_SPLITS), choices=list(TOY_SPLITS))
    args = parser.parse_args(argv)
    root = args.root or toy_coco_root()
    for name in args.splits:
        json_file, image_root = ensure_toy_split(name, root)
        print(f"{name}: {json_file} ({image_root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
