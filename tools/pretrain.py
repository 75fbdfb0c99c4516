#!/usr/bin/env python
"""ConvMAE / FastConvMAE pretraining.

Examples::

    # toy demo on the CPU (generated images); the same on 2 CPU processes (gloo)
    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_toy.py
    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_toy.py --num-gpus 2 \\
        --output-dir output/pretrain/fastconvmae_toy_2proc
    # overrides: 2 epochs into another folder, on your own images (None: generated toy images)
    python tools/pretrain.py --config-file configs/pretrain/convmae_toy.py train.epochs=2 \\
        train.output_dir=output/pretrain/short train.data_path=/data/my_images
    # ImageNet, 8 GPUs (detectron2 launch) or torchrun
    python tools/pretrain.py --config-file configs/pretrain/fastconvmae_b_50ep.py --num-gpus 8 \\
        --data-path /data/imagenet/train
    torchrun --nproc-per-node 8 tools/pretrain.py --config-file ... --data-path ...
    # continue exactly where the newest complete checkpoint of output_dir left off
    python tools/pretrain.py --config-file ... --resume
    # resume points every 500 iterations (inside epochs), the newest 2 kept
    python tools/pretrain.py --config-file ... train.checkpoint_period_iters=500

Trailing ``key=value`` pairs override the config (``train.epochs=10 model.drop_path_rate=0.1``);
``key=None`` (or ``key=null``) sets Python's None, ``key='None'`` the string. Pretraining has no
evaluation step; ``tools/visualize_pretrain.py`` draws reconstructions of a checkpoint.
Checkpoints are official-format files in ``train.output_dir``: ``checkpoint-XXXX.pth`` after epoch
XXXX, ``checkpoint-XXXX-iterYYYYYY.pth`` YYYYYY iterations into it (resume points). A resumed run
repeats the uninterrupted one (same images, augmentation, masks and lr; the seeds are read back
from the checkpoint).
"""

import argparse
import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (compatibility fixes)
from convmae_det.engine.config import load_lazy_config  # noqa: E402
from convmae_det.engine.launcher import launch_tool  # noqa: E402
from convmae_det.engine.pretrain_loop import run_pretraining  # noqa: E402
from detectron2.config import LazyConfig  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402


def python_none_overrides(overrides: Sequence[str]) -> List[str]:
    """``key=None`` as Python's None: the overrides are parsed by hydra, which reads an unquoted
    ``None`` as the string 'None' (``train.data_path=None`` would then look for a folder named
    None). Rewritten to ``key=null``; a quoted ``key='None'`` stays a string."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{key}=null" if sep and value.strip() == "None" else item)
    return out


def load_config(args):
    """The config file with the overrides (unknown keys and wrong types refused) and flags."""
    cfg = load_lazy_config(args.config_file, python_none_overrides(args.opts))
    if args.data_path:
        cfg.train.data_path = args.data_path
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    if args.resume:
        cfg.train.resume = True
    return cfg


def preflight(args):
    """:func:`load_config`, then the data folder, ``train.init_checkpoint`` /
    ``train.resume_from`` and the output folder, before any process starts."""
    from convmae_det.engine.preflight import check_data_dir, check_output_dir, check_weights_file

    cfg = load_config(args)
    check_data_dir("train.data_path (--data-path)", cfg.train.get("data_path"))
    check_weights_file("train.init_checkpoint", cfg.train.get("init_checkpoint"))
    check_weights_file("train.resume_from", cfg.train.get("resume_from"))
    check_output_dir("train.output_dir (--output-dir)", cfg.train.output_dir)
    return cfg


def main(args) -> str:
    cfg = load_config(args)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    for name in ("convmae_det", "detectron2"):  # the trainer and its writers log as detectron2
        setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name=name)
    logger = setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name=__name__)
    logger.info("Command line: %s", " ".join(sys.argv))
    if comm.is_main_process():
        LazyConfig.save(cfg, os.path.join(cfg.train.output_dir, "config.yaml"))
    path = run_pretraining(cfg)
    logger.info("Last checkpoint: %s", path)
    return path


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    for action in parser._actions:  # detectron2's flag; pretraining has no evaluation step
        if "--eval-only" in action.option_strings:
            action.help = argparse.SUPPRESS
    parser.add_argument("--data-path", default=None, help="ImageFolder root or flat image folder")
    parser.add_argument("--output-dir", default=None, help="overrides train.output_dir")
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config-file is required (e.g. configs/pretrain/fastconvmae_toy.py)")
    if args.eval_only:
        parser.error("--eval-only: pretraining has no evaluation step")
    return args


def output_dir(args) -> str:
    """The folder the run writes (``train.output_dir`` / ``--output-dir``), held by one live run
    at a time."""
    return load_config(args).train.output_dir


if __name__ == "__main__":
    launch_tool(main, parse_args(), preflight=preflight, output_dir=output_dir)
