#!/usr/bin/env python
"""Convert ADE20K (SceneParsing, ADEChallengeData2016) labels for training with detectron2.

    python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS]

Reads ``ADEChallengeData2016/annotations/{training,validation}/*.png`` (0 = "other", 1..150 =
classes) and writes ``annotations_detectron2/{training,validation}/*.png`` with 0 -> 255 (ignored)
and k -> k-1 (mmseg's ``reduce_zero_label``), the layout ``ade20k_sem_seg_{train,val}`` read.
"""

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convmae_det.data.datasets.ade20k import convert_ade20k_label  # noqa: E402


def convert_split(src_dir: str, dst_dir: str, workers: int = 8) -> int:
    """Convert every PNG of ``src_dir`` into ``dst_dir``; returns the number of files."""
    os.makedirs(dst_dir, exist_ok=True)
    names = sorted(n for n in os.listdir(src_dir) if n.endswith(".png"))

    def one(name: str) -> None:
        raw = np.asarray(Image.open(os.path.join(src_dir, name)))
        try:
            out = convert_ade20k_label(raw)
        except ValueError as exc:
            raise ValueError(f"{os.path.join(src_dir, name)}: {exc}") from None
        Image.fromarray(out).save(os.path.join(dst_dir, name))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, names))
    return len(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
        help="folder that contains ADEChallengeData2016 (default: $DETECTRON2_DATASETS or datasets)",
    )
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    for split in ("training", "validation"):
        src = os.path.join(base, "annotations", split)
        if not os.path.isdir(src):
            print(
                f"error: {src} not found; download ADEChallengeData2016.zip (SceneParsing "
                f"benchmark) and unzip it into {args.root}",
                file=sys.stderr,
            )
            return 2
        n = convert_split(src, os.path.join(base, "annotations_detectron2", split), args.workers)
        print(f"{split}: converted {n} label maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
