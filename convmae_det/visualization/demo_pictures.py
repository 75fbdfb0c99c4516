"""The pictures of ``make demo``: detector and segmenter overlays on toy validation images, a
pretraining reconstruction grid and the training curves, all in ``<demo_dir>/pictures``."""

from __future__ import annotations

import glob
import logging
import os
import shutil
from typing import List

import numpy as np
from PIL import Image

__all__ = ["write_demo_pictures"]

logger = logging.getLogger(__name__)


def _last_pretrain_checkpoint(folder: str) -> str:
    from ..engine.pretrain_checkpoint import find_last_checkpoint

    last = find_last_checkpoint(folder) if os.path.isdir(folder) else None
    if last:
        return last
    found = sorted(glob.glob(os.path.join(folder, "checkpoint-*.pth")))
    return found[-1] if found else ""


def _overlays(predictor, records, out_dir: str, prefix: str, **draw_kw) -> List[str]:
    from .overlay import draw_prediction

    paths = []
    for i, record in enumerate(records):
        rgb = np.asarray(Image.open(record["file_name"]).convert("RGB"))
        picture = draw_prediction(rgb, predictor(rgb), predictor.metadata, **draw_kw)
        path = os.path.join(out_dir, f"{prefix}_{i}.png")
        Image.fromarray(picture).save(path)
        paths.append(path)
    return paths


def write_demo_pictures(
    demo_dir: str,
    *,
    num_images: int = 3,
    confidence_threshold: float = 0.5,
    scale: int = 2,
    device: str = "cpu",
) -> List[str]:
    """Write the demo's pictures for whatever parts of ``demo_dir`` exist:

    * ``detection/model_final.pth`` -> ``pictures/detection_{i}.png`` (toy_coco_val overlays);
    * ``segmentation/model_final.pth`` -> ``pictures/segmentation_{i}.png`` (with legend);
    * ``pretrain/checkpoint-*.pth`` -> ``pictures/recon_*.png`` (reconstruction grids);
    * ``classification/predictions.png`` (top-5 classes, drawn by the classification demo) ->
      ``pictures/classification.png``;
    * ``*/metrics.json(l)`` -> ``pictures/{detection,segmentation,pretrain}_curves.png`` etc.
      (``classification_finetune_*`` for the fine-tuning run).

    Returns the written paths (missing parts are skipped with a log line).
    """
    import convmae_det.data  # noqa: F401  (registers the toy datasets)
    from detectron2.data import DatasetCatalog

    from .demo_detection import DEFAULT_DEMO_CONFIG
    from ..engine.seg_demo import TOY_CONFIG
    from .curves import plot_metrics
    from .predictor import Predictor

    pictures = os.path.join(demo_dir, "pictures")
    os.makedirs(pictures, exist_ok=True)
    paths: List[str] = []
    parts = (
        ("detection", DEFAULT_DEMO_CONFIG, "toy_coco_val", []),
        ("segmentation", TOY_CONFIG, "toy_ade20k_sem_seg_val", ["MODEL.DEVICE", device]),
    )
    for part, config, dataset, opts in parts:
        weights = os.path.join(demo_dir, part, "model_final.pth")
        if not os.path.isfile(weights):
            logger.info("No %s; skipping the %s pictures", weights, part)
            continue
        predictor = Predictor(config_file=config, opts=opts, weights=weights, device=device)
        records = DatasetCatalog.get(dataset)[:num_images]
        paths += _overlays(
            predictor,
            records,
            pictures,
            part,
            confidence_threshold=confidence_threshold,
            scale=scale,
        )
    checkpoint = _last_pretrain_checkpoint(os.path.join(demo_dir, "pretrain"))
    if checkpoint:
        from .reconstruction import load_pretrain_model, save_reconstruction_grids

        try:
            model = load_pretrain_model(checkpoint)
        except (ValueError, RuntimeError, KeyError) as exc:
            logger.warning("No reconstructions from %s: %s", checkpoint, str(exc)[:500])
        else:
            images = [d["file_name"] for d in DatasetCatalog.get("toy_coco_val")[:2]]
            paths += save_reconstruction_grids(model, images, pictures, scale=3)
    drawn = os.path.join(demo_dir, "classification", "predictions.png")
    if os.path.isfile(drawn):
        shutil.copyfile(drawn, os.path.join(pictures, "classification.png"))
        paths.append(os.path.join(pictures, "classification.png"))
    for part in ("pretrain", "detection", "segmentation", "classification/finetune"):
        folder = os.path.join(demo_dir, part)
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("metrics.json", "metrics.jsonl")):
            try:
                paths += plot_metrics(folder, pictures, prefix=f"{part.replace('/', '_')}_")
            except ValueError as exc:
                logger.warning("No curves for %s: %s", part, exc)
    return paths
