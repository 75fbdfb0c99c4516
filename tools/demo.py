#!/usr/bin/env python
"""Draw a detector's, segmenter's or classifier's predictions on images or a video.

    python tools/demo.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py \
        --input 'datasets/toy/*.png' --output out/ --opts train.init_checkpoint=model_final.pth
    python tools/demo.py --config-file configs/ADE20K/upernet_convmae_toy.yaml \
        --input img.jpg --output out/ --opts MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file ... --video-input clip.mp4 --output clip_pred.mp4
    python tools/demo.py --config-file configs/toy/convvit_toy_finetune.py \
        --input 'datasets/toy_imagenet/val/star/*.png' --output out/ --weights model_final.pth
    python tools/demo.py --exported out/det_onnx --input img.jpg --output out/

LazyConfig (.py, overrides ``key=value``) and yacs (.yaml, overrides ``KEY VALUE``) both work;
an unknown override key or a value of the wrong type is refused (one ``error:`` line, exit 2).

Before drawing, the tool says what it shows: the checkpoint report (one line when every parameter
was loaded; a ``WARNING`` when weights are missing, partial or mostly not in the file), the classes
the model knows, and the inference paths. Then one line per image (instances above the threshold,
by class; the classes of a segmentation; a classifier's top-5 classes with their probabilities,
drawn in a panel beside the image) and, with several inputs, a summary.

Inference uses SDPA attention and channels-last convolutions in fp32 (same detections as the plain
path, ``--plain``). ``--dtype bf16`` runs under autocast where the CPU (AVX512-BF16 or AMX) or GPU
has native bf16, and is refused elsewhere; its detections are close to, not equal to, fp32.

``--exported DIR`` draws from a folder written by ``tools/export_model.py`` (TorchScript or ONNX,
CPU, fp32) instead of building the model: no config, weights or model code are read, so the
options of the eager model (``--config-file``, ``--weights``, ``--opts``, ``--plain``,
``--dtype bf16``, ``--device cuda``) are refused with it.
"""

import argparse
import glob
import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (compatibility fixes)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--config-file", metavar="FILE", help="LazyConfig .py or .yaml")
    model.add_argument(
        "--exported",
        metavar="DIR",
        help="a folder written by tools/export_model.py (runs without the model code)",
    )
    p.add_argument("--input", nargs="+", help="images, folders or glob patterns")
    p.add_argument("--video-input", help="a video file")
    p.add_argument("--output", help="output folder (images) or file (single image / video)")
    p.add_argument("--weights", default="", help="checkpoint (else the config's own weights)")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--mask-alpha", type=float, default=0.5)
    p.add_argument("--color-mode", choices=("class", "instance"), default="class")
    p.add_argument("--scale", type=int, default=1, help="integer upscaling of the pictures")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: autocast, where the CPU (AVX512-BF16 / AMX) or GPU has native bf16",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="the plain reference path (explicit attention, NCHW) instead of SDPA + channels-last",
    )
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides")
    return p


def _expand(inputs):
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files += sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(exts)
            )
        elif any(c in item for c in "*?["):
            files += sorted(glob.glob(os.path.expanduser(item)))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise SystemExit(f"--input {item!r}: no such file, folder or matching glob")
    return files


def _counts_text(counts, name_of, task: str, total_pixels: int = 0) -> str:
    """ "3 circle, 2 star" (instances) or "wall 41%, floor 30%" (pixels of a segmentation)."""
    if task == "sem_seg":
        return ", ".join(
            f"{name_of(c)} {100.0 * n / max(total_pixels, 1):.0f}%" for c, n in counts.most_common()
        )
    return ", ".join(f"{n} {name_of(c)}" for c, n in counts.most_common())


def _image_line(
    path, counts, name_of, task: str, threshold: float, seconds: float, output=None
) -> str:
    if task == "classification":
        from convmae_det.visualization.overlay import top_classes

        top = top_classes(output["scores"], 5)
        shown = ", ".join(f"{name_of(c)} {100.0 * p:.1f}%" for c, p in top)
        return f"{path}: {name_of(top[0][0])} (top-{len(top)}: {shown}), {seconds:.2f} s"
    if task == "sem_seg":
        total = sum(counts.values())
        what = f"{len(counts)} classes ({_counts_text(counts, name_of, task, total)})"
    else:
        n = sum(counts.values())
        what = f"{n} instance{'s' if n != 1 else ''} >= {threshold:.2f}"
        what += f" ({_counts_text(counts, name_of, task)})" if n else ""
    return f"{path}: {what}, {seconds:.2f} s"


def _summary_line(drawn: int, totals, images_with, name_of, task: str, threshold: float) -> str:
    if task == "classification":
        per_class = ", ".join(f"{name_of(c)} {k}" for c, k in totals.most_common())
        return f"summary: {drawn} images classified; top-1 classes: {per_class}"
    if task == "sem_seg":
        seen = ", ".join(f"{name_of(c)} ({n})" for c, n in images_with.most_common())
        return f"summary: {drawn} images drawn; classes (images they appear in): {seen or 'none'}"
    n = sum(totals.values())
    per_class = ", ".join(f"{name_of(c)} {k}" for c, k in totals.most_common())
    return f"summary: {drawn} images drawn, {n} instances >= {threshold:.2f}" + (
        f": {per_class}" if n else ""
    )


class UsageError(ValueError):
    """Options that do not go together."""


def _eager_only_options(args) -> list:
    """The options given with ``--exported`` that only apply to the eager model."""
    given = []
    if args.weights:
        given.append("--weights")
    if args.opts:
        given.append("--opts")
    if args.plain:
        given.append("--plain")
    if args.dtype != "fp32":
        given.append(f"--dtype {args.dtype}")
    if args.device and not str(args.device).startswith("cpu"):
        given.append(f"--device {args.device}")
    return given


def _build_predictor(args, torch):
    """The eager ``Predictor`` of ``--config-file`` or the ``ExportedPredictor`` of
    ``--exported``; the lines that say what it shows (checkpoint report or export description,
    classes, inference paths)."""
    if args.exported:
        from convmae_det.deploy import ExportedPredictor

        eager_only = _eager_only_options(args)
        if eager_only:
            raise UsageError(
                f"--exported runs the exported graph on the CPU in fp32; {', '.join(eager_only)} "
                "applies to the eager model only (export again with those settings instead)"
            )
        predictor = ExportedPredictor(args.exported)
        lines = [predictor.describe()]
    else:
        from convmae_det.visualization.predictor import Predictor, inference_paths

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        paths = inference_paths(args.dtype, device=device, plain=args.plain)
        predictor = Predictor(
            config_file=args.config_file,
            opts=args.opts,
            weights=args.weights,
            device=device,
            paths=paths,
        )
        lines = list(predictor.weights_report.lines())
    return predictor, lines + list(predictor.describe_model()) + [predictor.describe_paths()]


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import time
    from collections import Counter

    import numpy as np
    import torch
    import tqdm
    from PIL import Image

    from convmae_det.checkpoint import CheckpointError
    from convmae_det.deploy.manifest import ExportedModelError
    from convmae_det.model_from_config import ConfigError
    from convmae_det.visualization.overlay import draw_prediction
    from convmae_det.visualization.predictor import (
        UnreadableImageError,
        UnsupportedDtypeError,
        count_instances,
        read_input_image,
        unreadable_inputs_summary,
    )

    if not args.input and not args.video_input:
        raise SystemExit("give --input images/folders/globs or --video-input FILE")
    try:
        predictor, lines = _build_predictor(args, torch)
    except (
        ConfigError,
        UnsupportedDtypeError,
        FileNotFoundError,
        CheckpointError,
        ExportedModelError,
        UsageError,
    ) as exc:
        # a bad / refused config, override, dtype, checkpoint or export: one line, no traceback
        message = str(exc.args[0] if exc.args else exc).splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        return 2
    for line in lines:
        print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout)
    sys.stdout.flush()
    draw_kw = dict(
        confidence_threshold=args.confidence_threshold,
        alpha=args.mask_alpha,
        color_mode=args.color_mode,
        scale=args.scale,
    )
    task = predictor.task
    threshold = args.confidence_threshold
    totals: Counter = Counter()  # instances per class (detectors)
    images_with: Counter = Counter()  # images each class appears in
    seconds_total = 0.0
    last_output = [None]  # the output of the last image (a classifier's line shows its scores)

    def draw(rgb):
        nonlocal seconds_total
        start = time.perf_counter()
        output = predictor(rgb)
        seconds = time.perf_counter() - start
        seconds_total += seconds
        counts = count_instances(output, threshold)
        totals.update(counts)
        images_with.update(counts.keys())
        last_output[0] = output
        return draw_prediction(rgb, output, predictor.metadata, **draw_kw), counts, seconds

    status = 0
    drawn = 0
    if args.input:
        files = _expand(args.input)
        single = len(files) == 1 and args.output and os.path.splitext(args.output)[1]
        if not single:
            os.makedirs(args.output or "demo_pictures", exist_ok=True)
        skipped = []  # an unreadable input is named, skipped, and counted at the end
        for path in tqdm.tqdm(files, disable=len(files) < 2):
            try:
                rgb = read_input_image(path)
            except UnreadableImageError as exc:
                tqdm.tqdm.write(f"warning: skipped {path}: {exc.reason} ({exc.detail})", sys.stderr)
                skipped.append((path, exc.reason))
                continue
            try:
                picture, counts, seconds = draw(rgb)
            except ValueError as exc:
                if not args.exported:
                    raise
                # an image size the export does not take: named, skipped, counted
                tqdm.tqdm.write(f"warning: skipped {path}: {exc}", sys.stderr)
                skipped.append((path, "size the export does not take"))
                continue
            drawn += 1
            out = (
                args.output
                if single
                else os.path.join(
                    args.output or "demo_pictures",
                    os.path.splitext(os.path.basename(path))[0] + ".png",
                )
            )
            Image.fromarray(np.asarray(picture)).save(out)
            line = _image_line(
                path, counts, predictor.class_name, task, threshold, seconds, last_output[0]
            )
            tqdm.tqdm.write(f"{line} -> {out}", sys.stdout)
        if len(files) > 1 and drawn:
            print(
                _summary_line(drawn, totals, images_with, predictor.class_name, task, threshold)
                + f"; inference {1000.0 * seconds_total / drawn:.0f} ms/image"
            )
        if skipped:
            print(unreadable_inputs_summary(skipped, len(files)), file=sys.stderr)
        if len(skipped) == len(files):  # nothing drawn
            print(f"error: no input could be drawn ({len(files)} given)", file=sys.stderr)
            status = 2
    if args.video_input:
        import cv2

        cap = cv2.VideoCapture(args.video_input)
        if not cap.isOpened():
            raise SystemExit(f"--video-input {args.video_input!r}: cannot be opened")
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        out = args.output or os.path.splitext(args.video_input)[0] + "_pred.mp4"
        writer = None
        frames = 0
        totals.clear()
        images_with.clear()
        for _ in tqdm.tqdm(range(total) if total else iter(int, 1), total=total):
            ok, frame = cap.read()
            if not ok:
                break
            picture = draw(frame[:, :, ::-1])[0][:, :, ::-1]
            frames += 1
            if writer is None:
                h, w = picture.shape[:2]
                writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            writer.write(np.ascontiguousarray(picture))
        cap.release()
        if writer is not None:
            writer.release()
        print(
            _summary_line(frames, totals, images_with, predictor.class_name, task, threshold)
            .replace("images drawn", "frames drawn")
            .replace("(images they", "(frames they")
        )
        print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
