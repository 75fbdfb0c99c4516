#!/usr/bin/env python
"""Convert any supported checkpoint for use with convmae_det, and report what it contains.

    python tools/convert_checkpoint.py SRC DST [--config-file CFG] [--strict] [--allow-partial]
        [--unsafe-load] [opts ...]

SRC: official ConvMAE / FastConvMAE pretraining (full or stripped, v2 with cls_token), EasyCV
(``state_dict`` with ``backbone.`` / ``encoder.`` / ``module.`` prefixes), MAE ViT, ImageNet-
finetuned ConvViT, detectron2 ``.pth`` / ``.pkl``, official fine-tuned detectors (both layouts) and
the official UperNet segmenter (mmseg layout).

With ``--config-file`` (a LazyConfig ``.py`` or yacs ``.yaml``) the weights are mapped onto that
config's model: DST holds exactly the model's key names and shapes and loads with a plain
``DetectionCheckpointer(model).load(DST)``. Without it, DST holds the encoder under its canonical
top-level names (decoder, mask token, final norm and classifier dropped).

The report lists loaded / resized / intentionally ignored / initialised / missing / unexpected /
shape-mismatched keys; ``--strict`` exits with an error when anything is unexplained. With
``--config-file``, a SRC that fills less than half of the model's encoder tensors (e.g. a file with
unrelated keys) is refused (exit code 2, nothing written) unless ``--allow-partial`` is given.
SRC is read without running pickled code; ``--unsafe-load`` is for trusted legacy files only.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (applies compatibility fixes)
from convmae_det.checkpoint import (  # noqa: E402
    MIN_ENCODER_COVERAGE,
    CheckpointError,
    convert_checkpoint,
    encoder_coverage,
    extract_encoder,
    load_checkpoint_file,
    save_checkpoint_atomic,
)
from convmae_det.engine.preflight import check_output_dir  # noqa: E402
from convmae_det.model_from_config import (  # noqa: E402
    ConfigError,
    build_model_from_config,
    load_any_config,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="checkpoint to read")
    parser.add_argument("dst", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--config-file", default="", help="map onto this config's model")
    parser.add_argument("--strict", action="store_true", help="fail on anything unexplained")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help=f"write DST even when SRC fills less than {MIN_ENCODER_COVERAGE * 100:.0f}%% of the "
        "model's encoder tensors (refused otherwise; only with --config-file)",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow arbitrary unpickling of SRC (only for files you trust)",
    )
    parser.add_argument("opts", nargs="*", help="config overrides key=value")
    # intermixed: options may follow SRC DST (REMAINDER would swallow them as overrides)
    args = parser.parse_intermixed_args(argv)

    try:
        check_output_dir("DST", os.path.dirname(os.path.abspath(args.dst)))
        ckpt = load_checkpoint_file(args.src, allow_unsafe=args.unsafe_load)
        if args.config_file:
            cfg, kind = load_any_config(args.config_file, args.opts)
            model = build_model_from_config(cfg, kind, device="cpu")
            state, report = convert_checkpoint(ckpt, model, strict=args.strict, source=args.src)
            coverage = encoder_coverage(report, model.state_dict().keys())
        else:
            state, report = extract_encoder(ckpt, source=args.src)
    except (CheckpointError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(max_keys=20))
    if args.config_file and not args.allow_partial:
        loaded, total, scope = coverage
        if loaded < MIN_ENCODER_COVERAGE * total:
            print(
                f"error: {args.src}: only {loaded} of the {total} tensors of the model's {scope} "
                f"matched the checkpoint (under {MIN_ENCODER_COVERAGE:.0%}); nothing written. "
                "Pass --allow-partial to write it anyway",
                file=sys.stderr,
            )
            return 2
    out = {
        "model": state,
        "__author__": "convmae_det",
        "convmae_det_conversion": report.to_dict(),
    }
    if os.path.abspath(args.dst) == os.path.abspath(args.src):
        print("error: DST must differ from SRC (nothing is overwritten)", file=sys.stderr)
        return 2
    try:
        save_checkpoint_atomic(out, args.dst)
    except OSError as exc:  # e.g. disk full: one line naming DST, no partial file left
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
