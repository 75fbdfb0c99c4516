#!/usr/bin/env python
"""Reconstruction grids of a ConvMAE / FastConvMAE pretraining checkpoint: per image, columns
original | masked | reconstruction | reconstruction + visible patches, one row per mask.

    python tools/visualize_pretrain.py --checkpoint out/pretrain/checkpoint-0029.pth \\
        --input img1.png img2.png --output recon/ [--model fastconvmae_b] [--seed 0] [--scale 2]

The model is read from the checkpoint: our pretraining stores its config, official ConvMAE /
FastConvMAE files their ``--model`` (``convmae_convvit_base_patch16`` -> ``convmae_b``,
``fastconvmae_convvit_base_patch16`` -> ``fastconvmae_b``). ``--model`` names it when the file does
not. A checkpoint that cannot be read or built is refused with one line (exit code 2).
"""

import argparse
import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (allow-lists the official checkpoints' argparse.Namespace)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="images or folders")
    parser.add_argument("--output", default="reconstructions")
    parser.add_argument(
        "--model",
        default=None,
        help="pretraining model (convmae_b, fastconvmae_b, convmae_toy, fastconvmae_toy) when the "
        "file does not say it",
    )
    parser.add_argument("--img-size", type=int, default=None, help="override the model img_size")
    parser.add_argument("--seed", type=int, default=0, help="masking seed")
    parser.add_argument("--scale", type=int, default=1, help="integer upscaling of the grids")
    args = parser.parse_args(argv)
    from convmae_det.checkpoint import CheckpointError
    from convmae_det.engine.preflight import check_output_dir
    from convmae_det.visualization.reconstruction import (
        load_pretrain_model,
        save_reconstruction_grids,
    )

    files = []
    for item in args.input:
        if os.path.isdir(item):
            files += sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith((".png", ".jpg", ".jpeg"))
            )
        else:
            files.append(item)
    overrides = {"img_size": args.img_size} if args.img_size else {}
    try:
        check_output_dir("--output", args.output)
        model = load_pretrain_model(args.checkpoint, name=args.model, **overrides)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    for path in save_reconstruction_grids(
        model, files, args.output, seed=args.seed, scale=args.scale
    ):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
