#!/usr/bin/env python
"""Train or evaluate a model described by a LazyConfig (``.py``) file.

Examples::

    # paper ConvViTDet Mask R-CNN on COCO, 8 GPUs, from a ConvMAE pretraining checkpoint
    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_convvitdet_b_25ep.py \\
        --num-gpus 8 train.init_checkpoint=convmae_base.pth
    # evaluate published / our weights
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=W.pth
    # continue an interrupted run from the last checkpoint in train.output_dir
    python tools/lazyconfig_train_net.py --config-file CFG --resume
    # the toy detector on the CPU (toy COCO generated on first use); then 2 processes (gloo)
    python tools/lazyconfig_train_net.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py
    python tools/lazyconfig_train_net.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py \\
        --num-gpus 2
    # overrides: a short run into another folder, evaluated on the small toy split
    python tools/lazyconfig_train_net.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py \\
        train.max_iter=200 train.output_dir=output/toy_short \\
        dataloader.test.dataset.names=toy_coco_mini
    # evaluate only, on the toy split (--eval-only does not need the training set)
    python tools/lazyconfig_train_net.py --eval-only \\
        --config-file configs/COCO/mask_rcnn_convvitdet_b_25ep.py \\
        train.init_checkpoint=W.pth dataloader.test.dataset.names=toy_coco_val

``key=value`` overrides after the flags change the config; unknown keys are refused. Without
CUDA the run uses the CPU (``--num-gpus N`` then starts N CPU processes on gloo). Checkpoints
(``train.init_checkpoint``) may be ConvMAE / FastConvMAE / MAE pretraining files, converted or
official fine-tuned detectors or detectron2 checkpoints; the loader logs what it matched.
"""

from __future__ import annotations

import json
import logging
import os
import sys

# Running by path puts tools/ first on sys.path; make the repository importable without install.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (compatibility fixes, dataset registration)
import convmae_det.data  # noqa: E402,F401
from convmae_det.engine import (  # noqa: E402
    check_datasets,
    datasets_to_check,
    default_lazy_setup,
    lazy_eval_only,
    lazy_train,
    load_lazy_config,
)
from convmae_det.engine.launcher import launch_tool  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.utils import comm  # noqa: E402

logger = logging.getLogger("detectron2")


def build_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail when train.init_checkpoint does not match the model completely",
    )
    return parser


def main(args) -> dict:
    cfg = load_lazy_config(args.config_file, args.opts)
    default_lazy_setup(cfg, args)
    strict = True if args.strict else None
    if args.eval_only:
        results = lazy_eval_only(cfg, strict=strict)
    else:
        results = lazy_train(cfg, resume=args.resume, strict=strict)
    if comm.is_main_process() and results:
        path = os.path.join(cfg.train.output_dir, "final_metrics.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        logger.info(f"Final metrics written to {path}")
    return results


def preflight(args) -> None:
    """Refuse bad overrides (unknown keys, wrong types), missing datasets (with ``--eval-only``
    only the test datasets: the training set is not read) and a missing local
    ``train.init_checkpoint`` (except when training with ``--resume``) and an output folder that
    cannot be written before any process is started."""
    from convmae_det.engine.preflight import check_output_dir, check_weights_file

    cfg = load_lazy_config(args.config_file, args.opts)
    check_datasets(datasets_to_check(cfg, eval_only=args.eval_only))
    weights = str(cfg.train.get("init_checkpoint", "") or "")
    needed = args.eval_only or not args.resume  # lazy_eval_only always loads it
    if needed:
        check_weights_file("train.init_checkpoint", weights)
    check_output_dir("train.output_dir", cfg.train.get("output_dir", ""))


def output_dir(args) -> str:
    """The folder the run writes (``train.output_dir``), held by one live run at a time."""
    return load_lazy_config(args.config_file, args.opts).train.get("output_dir", "")


def invoke_main() -> None:
    launch_tool(main, build_parser().parse_args(), preflight=preflight, output_dir=output_dir)


if __name__ == "__main__":
    invoke_main()
