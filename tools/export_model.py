#!/usr/bin/env python
"""Export a detector or segmenter to TorchScript or ONNX for deployment.

    python tools/export_model.py --config-file CFG --format torchscript|onnx --output DIR \
        [--weights W] [--sample-image IMG] [--opset N] [--skip-verify] \
        [--benchmark N [--threads T]] [overrides ...]

CFG is a LazyConfig ``.py`` (Mask R-CNN detectors) or a yacs ``.yaml`` (UperNet segmenter);
overrides are ``key=value`` (LazyConfig) or ``KEY VALUE`` pairs (yacs). W defaults to the config's
``train.init_checkpoint`` / ``MODEL.WEIGHTS`` (none: a random model, with a warning). The graph is
traced on IMG (default: a synthetic image of the test size) and accepts other sizes. Before DIR is
written, the export runs through :class:`convmae_det.deploy.ExportedPredictor` on the sample and on
a narrower crop and must match eager PyTorch (``--skip-verify`` skips that). DIR is written under
a temporary name next to it and renamed when complete; an earlier export in DIR is replaced.

``--benchmark N`` then times eager PyTorch (the demo's predictor) and the export, interleaved, N
rounds on the sample with T threads each.

Exit codes: 0 done; 2 a mistake in the arguments, config, weights or an option the export cannot
reproduce (one line ``error: ...``, nothing written); 1 the export itself failed (one line,
nothing written). Running the folder: ``convmae_det.deploy.ExportedPredictor(DIR)``, see
docs/DEPLOYMENT.md.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (applies compatibility fixes)
from convmae_det.checkpoint import CheckpointError  # noqa: E402
from convmae_det.deploy import (  # noqa: E402
    DEFAULT_OPSET,
    FORMATS,
    ExportedModelError,
    ExportError,
    export_from_config,
)
from convmae_det.engine.preflight import debug_mode  # noqa: E402

USER_MISTAKES = (ValueError, KeyError, TypeError, FileNotFoundError, OSError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config to export")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--weights", default="", help="checkpoint (default: the config's)")
    parser.add_argument("--sample-image", default="", metavar="IMG", help="image to trace on")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument(
        "--skip-verify", action="store_true", help="do not compare the export with eager PyTorch"
    )
    parser.add_argument(
        "--benchmark", type=int, default=0, metavar="N", help="time eager vs export, N rounds"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for --benchmark")
    parser.add_argument("opts", nargs="*", help="config overrides")
    return parser


def _benchmark(args, result) -> None:
    from convmae_det.deploy.timing import benchmark_exported, report_lines

    image = None
    if args.sample_image:
        from convmae_det.visualization.predictor import read_input_image

        image = read_input_image(args.sample_image)
    report = benchmark_exported(
        result.output, image=image, rounds=args.benchmark, threads=args.threads or None
    )
    print("\n".join(report_lines(report)))


def main(argv=None) -> int:
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.opset < 7:
            raise ValueError(f"--opset {args.opset}: expected an ONNX opset >= 7")
        if args.benchmark < 0 or args.threads < 0:
            raise ValueError("--benchmark and --threads take counts >= 0")
        sample = None
        if args.sample_image:
            from convmae_det.visualization.predictor import read_input_image

            sample = read_input_image(args.sample_image)
        result = export_from_config(
            args.config_file,
            args.output,
            fmt=args.format,
            weights=args.weights,
            opts=args.opts,
            sample_image=sample,
            opset=args.opset,
            verify=not args.skip_verify,
        )
    except ExportError as exc:
        if debug_mode():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ExportedModelError, *USER_MISTAKES) as exc:
        if debug_mode():
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    if args.benchmark:
        _benchmark(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
