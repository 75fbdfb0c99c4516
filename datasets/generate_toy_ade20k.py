#!/usr/bin/env python
"""Write the deterministic toy ADE20K (6 classes, 64 train / 16 val images) to disk.

    python datasets/generate_toy_ade20k.py [--root $DETECTRON2_DATASETS] [--seed 0]

The result is ``ROOT/toy_ade20k/ADEChallengeData2016/{images,annotations,annotations_detectron2}``,
registered as ``toy_ade20k_sem_seg_{train,val}``. Training generates it on first use anyway; this
script is for looking at the data or regenerating it.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convmae_det.data.toy_ade20k import generate_toy_ade20k  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dest = os.path.join(args.root, "toy_ade20k", "ADEChallengeData2016")
    counts = generate_toy_ade20k(dest, seed=args.seed)
    print(f"wrote {counts} images to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
