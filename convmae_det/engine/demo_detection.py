"""The detection part of ``make demo``: train a toy-sized detector on the embedded toy shapes on
the CPU, evaluate it on the held-out split (COCO box / mask AP) and draw a few predictions.

    from convmae_det.engine.demo_detection import run_detection_demo
    metrics = run_detection_demo("demo_output/detection")   # {"box_AP": ..., "mask_AP": ...}
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from PIL import Image

from ..visualization.overlay import draw_prediction
from .config import load_lazy_config
from .lazy import build_checkpointer, lazy_train

__all__ = ["DEFAULT_DEMO_CONFIG", "run_detection_demo", "draw_predictions"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DEMO_CONFIG = os.path.join(_REPO, "configs", "toy", "mask_rcnn_convvitdet_toy.py")
logger = logging.getLogger(__name__)


@torch.no_grad()
def draw_predictions(
    cfg, weights: str, output_dir: str, *, dataset: str = "toy_coco_val", num_images: int = 4
) -> list:
    """Run the model of ``cfg`` with ``weights`` on the first images of ``dataset`` and save
    ``pred_{i}.png`` (predicted masks, boxes, classes, scores >= 0.5). Returns the file paths."""
    model = instantiate(cfg.model).eval()
    build_checkpointer(model).load(weights)
    meta = MetadataCatalog.get(dataset)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for i, record in enumerate(DatasetCatalog.get(dataset)[:num_images]):
        rgb = np.asarray(Image.open(record["file_name"]).convert("RGB"))
        image = torch.as_tensor(rgb.transpose(2, 0, 1).copy())
        if cfg.model.get("input_format", "BGR") == "BGR":
            image = image.flip(0)
        out = model([{"image": image, "height": rgb.shape[0], "width": rgb.shape[1]}])[0]
        picture = draw_prediction(rgb, out, meta, confidence_threshold=0.5, scale=2)
        path = os.path.join(output_dir, f"pred_{i}.png")
        Image.fromarray(picture).save(path)
        paths.append(path)
    return paths


def run_detection_demo(
    output_dir: str,
    *,
    config_file: str = DEFAULT_DEMO_CONFIG,
    init_checkpoint: str = "",
    overrides: Sequence[str] = (),
    num_visualizations: int = 4,
) -> Dict[str, Any]:
    """Train the toy detector of ``config_file`` from scratch (or from ``init_checkpoint``, e.g.
    the toy pretraining checkpoint), evaluate it on ``toy_coco_val`` and draw predictions.

    Returns:
        {"box_AP", "mask_AP", "box_AP50", "mask_AP50", "train_seconds", "eval_seconds",
         "iterations", "images_per_second", "output_dir", "visualizations", "results"}; AP in
        percent (COCO AP@[.5:.95]). Also written to ``output_dir/demo_metrics.json``.
    """
    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, name="detectron2")
    setup_logger(output_dir, name="convmae_det")
    opts = [f"train.output_dir={output_dir}"] + list(overrides)
    if init_checkpoint:
        opts.append(f"train.init_checkpoint={init_checkpoint}")
    cfg = load_lazy_config(config_file, opts)
    timings: Dict[str, float] = {}
    results = lazy_train(cfg, timings=timings)
    box, segm = results.get("bbox", {}), results.get("segm", {})
    iters = int(cfg.train.max_iter)
    batch = int(cfg.dataloader.train.total_batch_size)
    weights = os.path.join(output_dir, "model_final.pth")
    vis = []
    if num_visualizations > 0 and os.path.isfile(weights):
        name = cfg.dataloader.test.dataset.names
        vis = draw_predictions(
            cfg,
            weights,
            os.path.join(output_dir, "vis"),
            dataset=name,
            num_images=num_visualizations,
        )
    metrics = {
        "box_AP": box.get("AP", float("nan")),
        "mask_AP": segm.get("AP", float("nan")),
        "box_AP50": box.get("AP50", float("nan")),
        "mask_AP50": segm.get("AP50", float("nan")),
        "train_seconds": round(timings["train_seconds"], 1),
        "eval_seconds": round(timings["eval_seconds"], 1),
        "iterations": iters,
        "images_per_second": round(iters * batch / max(timings["train_seconds"], 1e-9), 2),
        "output_dir": output_dir,
        "visualizations": vis,
        "results": results,
    }
    with open(os.path.join(output_dir, "demo_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    logging.getLogger("detectron2").info(
        f"Toy detection demo: box AP {metrics['box_AP']:.1f}, mask AP {metrics['mask_AP']:.1f} "
        f"(held-out {cfg.dataloader.test.dataset.names}); training {metrics['train_seconds']} s "
        f"for {iters} iterations, evaluation {metrics['eval_seconds']} s"
    )
    return metrics


def _main(argv: Optional[Sequence[str]] = None) -> int:  # used by tools/run_demo_detection.py
    import argparse

    parser = argparse.ArgumentParser(description="toy detection demo (CPU)")
    parser.add_argument("--output-dir", default="demo_output/detection")
    parser.add_argument("--config-file", default=DEFAULT_DEMO_CONFIG)
    parser.add_argument("--init-checkpoint", default="")
    parser.add_argument("opts", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)
    m = run_detection_demo(
        args.output_dir,
        config_file=args.config_file,
        init_checkpoint=args.init_checkpoint,
        overrides=args.opts,
    )
    print(
        f"toy detection: box AP {m['box_AP']:.1f}  mask AP {m['mask_AP']:.1f}  "
        f"(AP50 {m['box_AP50']:.1f} / {m['mask_AP50']:.1f}); train {m['train_seconds']} s, "
        f"eval {m['eval_seconds']} s; outputs in {m['output_dir']}"
    )
    return 0
