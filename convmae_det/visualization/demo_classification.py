"""The classification part of ``make demo``: fine-tune and linear-probe the toy pretraining encoder
on the generated toy shapes classification set (5 classes), on the CPU, report top-1 / top-5 on the
held-out split against chance, and draw the fine-tuned model's top classes on validation images.

    from convmae_det.visualization.demo_classification import run_classification_demo
    m = run_classification_demo("demo_output/classification", init_checkpoint="checkpoint.pth")
    m["finetune"]["top1"], m["linprobe"]["top1"], m["chance_top1"]
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from PIL import Image

from .. import data as _data  # noqa: F401  (registers the toy datasets)
from ..engine.config import load_lazy_config
from ..engine.lazy import build_checkpointer, lazy_train
from .overlay import draw_classification

__all__ = [
    "FINETUNE_DEMO_CONFIG",
    "LINPROBE_DEMO_CONFIG",
    "draw_classifications",
    "run_classification_demo",
]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE_DEMO_CONFIG = os.path.join(_REPO, "configs", "toy", "convvit_toy_finetune.py")
LINPROBE_DEMO_CONFIG = os.path.join(_REPO, "configs", "toy", "convvit_toy_linprobe.py")
logger = logging.getLogger(__name__)


@torch.no_grad()
def draw_classifications(
    cfg, weights: str, path: str, *, per_class: int = 2, scale: int = 3, columns: int = 2
) -> str:
    """Classify the first ``per_class`` images of each class of ``cfg``'s test set with
    ``weights`` and save one picture (a grid of images, each with its top-5 panel). Returns
    ``path``."""
    model = instantiate(cfg.model).eval()
    build_checkpointer(model).load(weights)
    transform = instantiate(cfg.dataloader.test.mapper.transform)
    name = cfg.dataloader.test.dataset.names
    meta = MetadataCatalog.get(name)
    chosen: Dict[int, List[dict]] = {}
    for record in DatasetCatalog.get(name):
        if len(chosen.setdefault(record["label"], [])) < per_class:
            chosen[record["label"]].append(record)
    tiles = []
    for label in sorted(chosen):
        for record in chosen[label]:
            image = Image.open(record["file_name"]).convert("RGB")
            output = model([{"image": transform(image)}])[0]
            rgb = np.asarray(image).repeat(scale, 0).repeat(scale, 1)
            tiles.append(draw_classification(rgb, output["scores"], meta))
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    canvas = np.full((height * -(-len(tiles) // columns), width * columns, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * height : r * height + tile.shape[0], c * width : c * width + tile.shape[1]] = (
            tile
        )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def _train_one(config_file: str, output_dir: str, opts: Sequence[str]) -> Dict[str, Any]:
    cfg = load_lazy_config(config_file, [f"train.output_dir={output_dir}"] + list(opts))
    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, name="detectron2")
    setup_logger(output_dir, name="convmae_det")
    timings: Dict[str, float] = {}
    start = time.time()
    results = lazy_train(cfg, timings=timings).get("classification", {})
    return {
        "top1": float(results.get("top1", float("nan"))),
        "top5": float(results.get("top5", float("nan"))),
        "loss": float(results.get("loss", float("nan"))),
        "num_images": int(results.get("num_images", 0)),
        "iterations": int(cfg.train.max_iter),
        "train_seconds": round(timings.get("train_seconds", time.time() - start), 1),
        "output_dir": output_dir,
        "cfg": cfg,
    }


def run_classification_demo(
    output_dir: str,
    *,
    init_checkpoint: str = "",
    finetune_config: str = FINETUNE_DEMO_CONFIG,
    linprobe_config: str = LINPROBE_DEMO_CONFIG,
    overrides: Sequence[str] = (),
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Fine-tune, then linear-probe, the encoder of ``init_checkpoint`` (e.g. the toy
    pretraining checkpoint; "" trains the fine-tuned model from scratch and probes a random
    encoder) on ``toy_imagenet_train``; evaluate both on ``toy_imagenet_val``; draw the
    fine-tuned model's top classes.

    Returns:
        {"finetune": {"top1", "top5", "loss", "num_images", "iterations", "train_seconds",
        "output_dir"}, "linprobe": {...}, "chance_top1": 100 / classes, "picture": path};
        written to ``output_dir/demo_metrics.json`` as well.
    """
    output_dir = os.path.abspath(output_dir)
    if threads:
        torch.set_num_threads(int(threads))
    opts = list(overrides)
    if init_checkpoint:
        opts.append(f"train.init_checkpoint={init_checkpoint}")
    outcome: Dict[str, Any] = {}
    for step, config_file in (("finetune", finetune_config), ("linprobe", linprobe_config)):
        outcome[step] = _train_one(config_file, os.path.join(output_dir, step), opts)
    cfg = outcome["finetune"].pop("cfg")
    outcome["linprobe"].pop("cfg")
    classes = len(MetadataCatalog.get(cfg.dataloader.test.dataset.names).get("classes", []) or [])
    outcome["chance_top1"] = round(100.0 / classes, 2) if classes else float("nan")
    weights = os.path.join(outcome["finetune"]["output_dir"], "model_final.pth")
    outcome["picture"] = (
        draw_classifications(cfg, weights, os.path.join(output_dir, "predictions.png"))
        if os.path.isfile(weights)
        else ""
    )
    with open(os.path.join(output_dir, "demo_metrics.json"), "w") as f:
        json.dump(outcome, f, indent=2)
    logging.getLogger("detectron2").info(
        f"Toy classification demo: fine-tuned top-1 {outcome['finetune']['top1']:.1f}, linear "
        f"probe top-1 {outcome['linprobe']['top1']:.1f} (chance {outcome['chance_top1']:.1f})"
    )
    return outcome
