#!/usr/bin/env python
"""The end-to-end demo behind ``make demo``: the whole pipeline on the embedded toy data, on CPU.

1. generate the toy COCO-style shapes dataset (deterministic) and pretrain a toy FastConvMAE on its
   training images (complementary masks, official checkpoint format);
2. load that checkpoint into a toy ConvViTDet Mask R-CNN (the loader's report is printed), train
   it, evaluate box / mask AP on the held-out images and draw its predicted masks;
3. train a toy ConvViT + UperNet segmenter, evaluate mIoU next to a constant-prediction baseline;
4. fine-tune and linear-probe the pretraining checkpoint on the toy shapes classification set,
   evaluate top-1 against chance and draw the fine-tuned model's top classes;
5. draw the predicted masks, reconstructions and training curves into ``pictures/`` and print a
   summary and the folder that holds every picture, log and metrics file.

    python tools/run_demo.py [--output-dir demo_output] [--pretrain-epochs 20] [--skip-pretrain]
        [--skip-detection] [--skip-segmentation] [--skip-classification]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import convmae_det  # noqa: E402,F401  (compatibility fixes)
import convmae_det.data  # noqa: E402,F401  (dataset registration)
from convmae_det.engine.pretrain_demo import DEMO_PRETRAIN_EPOCHS  # noqa: E402


def _banner(text: str) -> None:
    print(f"\n==== {text} ====", flush=True)


def run_pretraining_step(out: str, epochs: int) -> str:
    from convmae_det.data.datasets.toy_coco import ensure_toy_split
    from convmae_det.engine.pretrain_demo import run_pretrain_demo

    _, image_root = ensure_toy_split("toy_coco_train")
    return run_pretrain_demo(image_root, os.path.join(out, "pretrain"), epochs=epochs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=DEMO_PRETRAIN_EPOCHS,
        help="toy pretraining epochs of 50 iterations (a fixed budget, so every run is the same)",
    )
    parser.add_argument("--skip-pretrain", action="store_true")
    parser.add_argument("--skip-detection", action="store_true")
    parser.add_argument("--skip-segmentation", action="store_true")
    parser.add_argument("--skip-classification", action="store_true")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    summary = {}

    checkpoint = ""
    if not args.skip_pretrain:
        _banner(f"1/4 FastConvMAE pretraining on the toy images ({args.pretrain_epochs} epochs)")
        t = time.time()
        checkpoint = run_pretraining_step(out, args.pretrain_epochs)
        summary["pretrain"] = {"checkpoint": checkpoint, "seconds": round(time.time() - t, 1)}
        print(f"pretraining checkpoint: {checkpoint}")

    if not args.skip_detection:
        from convmae_det.visualization.demo_detection import run_detection_demo

        source = "the toy pretraining checkpoint" if checkpoint else "scratch"
        _banner(f"2/4 toy ConvViTDet Mask R-CNN from {source}")
        det = run_detection_demo(os.path.join(out, "detection"), init_checkpoint=checkpoint)
        summary["detection"] = {
            k: det[k]
            for k in ("box_AP", "mask_AP", "box_AP50", "mask_AP50", "train_seconds", "iterations")
            if k in det
        }
        summary["detection"]["pictures"] = det.get("visualizations", [])
        print(f"toy detector: box AP {det['box_AP']:.1f}, mask AP {det['mask_AP']:.1f}")

    if not args.skip_segmentation:
        from convmae_det.engine.seg_demo import run_segmentation_demo

        _banner("3/4 toy ConvViT + UperNet segmentation")
        seg = run_segmentation_demo(os.path.join(out, "segmentation"))
        summary["segmentation"] = seg
        print(
            f"toy segmenter: mIoU {seg['miou']:.1f} "
            f"(constant-prediction baseline {seg['baseline_miou']:.1f})"
        )

    if not args.skip_classification:
        from convmae_det.visualization.demo_classification import run_classification_demo

        source = "the toy pretraining checkpoint" if checkpoint else "scratch"
        _banner(f"4/4 toy ConvViT classification: fine-tuning and linear probe from {source}")
        cls = run_classification_demo(
            os.path.join(out, "classification"), init_checkpoint=checkpoint
        )
        summary["classification"] = cls
        print(
            f"toy classifier: fine-tuned top-1 {cls['finetune']['top1']:.1f}, linear probe "
            f"top-1 {cls['linprobe']['top1']:.1f} (chance {cls['chance_top1']:.1f})"
        )

    from convmae_det.visualization import write_demo_pictures

    _banner("pictures")
    pictures = write_demo_pictures(out)
    summary["pictures"] = pictures
    print(f"\nPictures ({len(pictures)}): {os.path.join(out, 'pictures')}")

    summary["total_seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    _banner("done")
    print(json.dumps(summary, indent=2, default=str))
    print(f"\nEverything (pictures, logs, metrics, checkpoints) is in: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
