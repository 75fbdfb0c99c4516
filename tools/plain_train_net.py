#!/usr/bin/env python
"""Train or evaluate a convmae_det semantic segmenter (UperNet + ConvViT) from a yacs config.

Examples::

    # the toy segmenter on the CPU (toy ADE20K generated on first use); then 2 processes (gloo)
    python tools/plain_train_net.py --config-file configs/ADE20K/upernet_convmae_toy.yaml
    python tools/plain_train_net.py --config-file configs/ADE20K/upernet_convmae_toy.yaml \\
        --num-gpus 2 OUTPUT_DIR output/upernet_toy_2proc
    # overrides: a short run into another folder
    python tools/plain_train_net.py --config-file configs/ADE20K/upernet_convmae_toy.yaml \\
        SOLVER.MAX_ITER 100 SOLVER.IMS_PER_BATCH 4 OUTPUT_DIR output/upernet_toy_short
    # ADE20K, 8 GPUs, from a ConvMAE pretraining checkpoint
    python tools/plain_train_net.py --config-file configs/ADE20K/upernet_convmae_b_512_160k.yaml \\
        --num-gpus 8 MODEL.WEIGHTS convmae_base.pth
    # evaluate weights; continue an interrupted run from the newest checkpoint in OUTPUT_DIR
    python tools/plain_train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/plain_train_net.py --config-file CFG --resume

Flags are detectron2's (``--config-file --resume --eval-only --num-gpus --num-machines
--machine-rank --dist-url`` + trailing ``KEY VALUE`` overrides). Without CUDA, ``--num-gpus N``
starts N CPU processes that train together over gloo. ``MODEL.WEIGHTS`` may be any checkpoint
format convmae_det reads (pretraining, official segmenter, our own). An unknown key or a value of
the wrong type in the overrides is refused with one line naming it (exit code 2). A run killed at
any moment continues exactly with ``--resume`` (same ``SEED``: the weights of an uninterrupted
run).
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (applies compatibility fixes)
import convmae_det.data  # noqa: E402,F401  (registers the datasets)
from convmae_det.checkpoint import ConvMAECheckpointer  # noqa: E402
from convmae_det.engine.seg_train_loop import do_seg_test, do_seg_train, get_seg_cfg  # noqa: E402
from convmae_det.engine.launcher import launch_tool  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

logger = logging.getLogger("convmae_det")


def setup(args):
    """Config from file and overrides, frozen; logging, seeding and the config dump."""
    cfg = get_seg_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # our own loggers (checkpoint reports, ETA) write to the same log.txt
    setup_logger(cfg.OUTPUT_DIR or None, distributed_rank=comm.get_rank(), name="convmae_det")
    return cfg


def main(args):
    cfg = setup(args)
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    if args.eval_only:
        ConvMAECheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return do_seg_test(cfg, model)
    return do_seg_train(cfg, model, resume=args.resume)  # evaluates after the last iteration


def preflight(args) -> None:
    """Refuse a missing config file, an unknown key or a value of the wrong type in the
    overrides, an unregistered or missing dataset (naming the expected folder and the prepare
    script), a missing local ``MODEL.WEIGHTS`` and an output folder that cannot be written, with
    one line (``error: ...``, exit code 2) before any process is started or any
    model is built. Toy datasets are generated here, once."""
    from convmae_det.engine.config import check_datasets
    from convmae_det.engine.preflight import check_output_dir, check_weights_file
    from detectron2.data import DatasetCatalog

    cfg = get_seg_cfg(args.config_file, args.opts)
    if not args.eval_only:  # 1 image per process through a BatchNorm after 1x1 pooling
        from convmae_det.engine.seg_train_loop import check_seg_batch_norm

        world = int(os.environ.get("WORLD_SIZE", 0)) or args.num_gpus * args.num_machines
        check_seg_batch_norm(cfg, world)
    names = [] if args.eval_only else [(n, "DATASETS.TRAIN") for n in cfg.DATASETS.TRAIN]
    names += [(n, "DATASETS.TEST") for n in cfg.DATASETS.TEST]
    check_datasets([(n, k) for n, k in names if n not in DatasetCatalog.list()])  # unregistered
    for name in dict.fromkeys(n for n, _ in names):
        DatasetCatalog.get(name)  # the dataset's own check: folder and prepare script named
    if args.eval_only or not args.resume:  # a resume loads the run's own checkpoint instead
        check_weights_file("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)
    check_output_dir("OUTPUT_DIR", cfg.OUTPUT_DIR)


def output_dir(args) -> str:
    """The folder the run writes (``OUTPUT_DIR``), held by one live run at a time."""
    return get_seg_cfg(args.config_file, args.opts).OUTPUT_DIR


def invoke_main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    print("Command Line Args:", args)
    launch_tool(main, args, preflight=preflight, output_dir=output_dir)


if __name__ == "__main__":
    invoke_main()
