#!/usr/bin/env python
"""Toy detection demo on the CPU: train a toy-sized ConvViTDet Mask R-CNN on the embedded toy
shapes, evaluate box / mask AP on the held-out split and draw a few predictions.

    python tools/run_demo_detection.py [--output-dir demo_output/detection]
        [--init-checkpoint toy_pretrain.pth] [key=value ...]
"""

import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401
import convmae_det.data  # noqa: E402,F401
from convmae_det.visualization.demo_detection import demo_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(demo_main())
