#!/usr/bin/env python
"""Draw a detector's or segmenter's predictions on images or a video.

    python tools/demo.py --config-file configs/toy/mask_rcnn_convvitdet_toy.py \
        --input 'datasets/toy/*.png' --output out/ --opts train.init_checkpoint=model_final.pth
    python tools/demo.py --config-file configs/ADE20K/upernet_convmae_toy.yaml \
        --input img.jpg --output out/ --opts MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file ... --video-input clip.mp4 --output clip_pred.mp4

LazyConfig (.py, overrides ``key=value``) and yacs (.yaml, overrides ``KEY VALUE``) both work.
"""

import argparse
import glob
import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (compatibility fixes)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig .py or .yaml")
    p.add_argument("--input", nargs="+", help="images, folders or glob patterns")
    p.add_argument("--video-input", help="a video file")
    p.add_argument("--output", help="output folder (images) or file (single image / video)")
    p.add_argument("--weights", default="", help="checkpoint (else the config's own weights)")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--mask-alpha", type=float, default=0.5)
    p.add_argument("--color-mode", choices=("class", "instance"), default="class")
    p.add_argument("--scale", type=int, default=1, help="integer upscaling of the pictures")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
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


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import numpy as np
    import tqdm
    from PIL import Image

    from convmae_det.visualization.overlay import draw_prediction
    from convmae_det.visualization.predictor import (
        Predictor,
        UnreadableImageError,
        read_input_image,
        unreadable_inputs_summary,
    )

    if not args.input and not args.video_input:
        raise SystemExit("give --input images/folders/globs or --video-input FILE")
    from convmae_det.model_from_config import ConfigError

    try:
        predictor = Predictor(
            config_file=args.config_file, opts=args.opts, weights=args.weights, device=args.device
        )
    except ConfigError as exc:  # a bad / refused config file: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    draw_kw = dict(
        confidence_threshold=args.confidence_threshold,
        alpha=args.mask_alpha,
        color_mode=args.color_mode,
        scale=args.scale,
    )

    def draw(rgb):
        return draw_prediction(rgb, predictor(rgb), predictor.metadata, **draw_kw)

    status = 0
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
            picture = draw(rgb)
            out = (
                args.output
                if single
                else os.path.join(
                    args.output or "demo_pictures",
                    os.path.splitext(os.path.basename(path))[0] + ".png",
                )
            )
            Image.fromarray(np.asarray(picture)).save(out)
            if len(files) < 2:
                print(f"wrote {out}")
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
        for _ in tqdm.tqdm(range(total) if total else iter(int, 1), total=total):
            ok, frame = cap.read()
            if not ok:
                break
            picture = draw(frame[:, :, ::-1])[:, :, ::-1]
            if writer is None:
                h, w = picture.shape[:2]
                writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            writer.write(np.ascontiguousarray(picture))
        cap.release()
        if writer is not None:
            writer.release()
        print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
