"""The segmentation part of the end-to-end demo: train the toy UperNet on CPU, evaluate, compare.

:func:`run_segmentation_demo` trains ``configs/ADE20K/upernet_convmae_toy.yaml`` on the toy
ADE20K (generated on first use), evaluates mIoU on its validation split with sliding-window
inference, and evaluates the constant-prediction baseline (the most frequent training class
everywhere) through the same evaluator, so both numbers are directly comparable.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from PIL import Image

from ..data.sem_seg_mapper import SemSegDatasetMapper, read_label
from .seg_train_loop import do_seg_train, get_seg_cfg

__all__ = [
    "TOY_CONFIG",
    "ConstantSegmenter",
    "most_frequent_class",
    "evaluate_constant_baseline",
    "run_segmentation_demo",
]

TOY_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "ADE20K",
    "upernet_convmae_toy.yaml",
)
logger = logging.getLogger("convmae_det")


class ConstantSegmenter(nn.Module):
    """Predicts one class everywhere: ``[{"sem_seg": (K, height, width)}]`` one-hot scores."""

    def __init__(self, num_classes: int, class_id: int):
        super().__init__()
        self.num_classes = num_classes
        self.class_id = class_id

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        outs = []
        for x in batched_inputs:
            h, w = x.get("height", x["image"].shape[-2]), x.get("width", x["image"].shape[-1])
            scores = torch.zeros(self.num_classes, h, w)
            scores[self.class_id] = 1.0
            outs.append({"sem_seg": scores})
        return outs


def most_frequent_class(dataset_name: str, num_classes: int, ignore_value: int = 255) -> int:
    """The class with the most labelled pixels in a dataset (ignore excluded)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for d in DatasetCatalog.get(dataset_name):
        label = read_label(d["sem_seg_file_name"]).reshape(-1)
        counts += np.bincount(label[label != ignore_value], minlength=num_classes)[:num_classes]
    return int(counts.argmax())


def evaluate_constant_baseline(cfg, dataset_name: str) -> Dict[str, float]:
    """mIoU etc. of predicting the most frequent training class everywhere on ``dataset_name``."""
    head = cfg.MODEL.SEM_SEG_HEAD
    cls = most_frequent_class(cfg.DATASETS.TRAIN[0], head.NUM_CLASSES, head.IGNORE_VALUE)
    loader = build_detection_test_loader(cfg, dataset_name, mapper=SemSegDatasetMapper(cfg, False))
    evaluator = SemSegEvaluator(dataset_name, distributed=False)
    res = inference_on_dataset(ConstantSegmenter(head.NUM_CLASSES, cls), loader, evaluator)
    out = dict(res["sem_seg"])
    out["class_id"] = cls
    return out


def _save_example(cfg, model: nn.Module, dataset_name: str, path: str) -> None:
    """Draw the prediction for the first validation image next to its ground truth."""
    from detectron2.utils.visualizer import Visualizer

    d = DatasetCatalog.get(dataset_name)[0]
    mapper = SemSegDatasetMapper(cfg, False)
    item = mapper(d)
    model.eval()
    with torch.no_grad():
        pred = model([item])[0]["sem_seg"].argmax(0).cpu().numpy()
    image = np.asarray(Image.open(d["file_name"]).convert("RGB"))
    meta = MetadataCatalog.get(dataset_name)
    gt = read_label(d["sem_seg_file_name"])
    left = Visualizer(image, meta, scale=2.0).draw_sem_seg(gt, alpha=0.5).get_image()
    right = Visualizer(image, meta, scale=2.0).draw_sem_seg(pred, alpha=0.5).get_image()
    raw = Visualizer(image, meta, scale=2.0).get_output().get_image()
    Image.fromarray(np.concatenate([raw, left, right], axis=1)).save(path)


def run_segmentation_demo(
    output_dir: str,
    *,
    config_file: Optional[str] = None,
    opts: Optional[List[str]] = None,
    num_threads: Optional[int] = 1,
) -> Dict[str, float]:
    """Train and evaluate the toy segmenter on the CPU; print and return the numbers.

    ``num_threads``: torch intra-op threads while the demo runs (restored afterwards; None keeps
    the current setting). One thread is the default: the tiny model gains little from more, the
    data-loader worker uses another core, and oversubscribed cores slow training many times over.

    Returns a dict with ``miou``, ``baseline_miou``, ``baseline_class``, ``pixel_acc``,
    ``train_seconds``, ``test_seconds``, ``iterations`` and ``example`` (a PNG: image, ground
    truth, prediction).
    """
    cfg = get_seg_cfg(config_file or TOY_CONFIG, opts)
    cfg.OUTPUT_DIR = output_dir
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    os.makedirs(output_dir, exist_ok=True)
    if not logging.getLogger("convmae_det").handlers:
        setup_logger(output_dir, name="convmae_det")
        setup_logger(output_dir, name="detectron2")
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _run(cfg, output_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg, output_dir: str) -> Dict[str, float]:
    seed_all_rng(cfg.SEED)
    model = build_model(cfg)

    timings: Dict[str, float] = {}
    dataset = cfg.DATASETS.TEST[0]
    metrics = do_seg_train(cfg, model, timings=timings)[dataset]["sem_seg"]  # evaluates at the end
    train_seconds, test_seconds = timings["train_seconds"], timings["eval_seconds"]
    baseline = evaluate_constant_baseline(cfg, dataset)
    example = os.path.join(output_dir, "segmentation_example.png")
    _save_example(cfg, model, dataset, example)

    classes = MetadataCatalog.get(dataset).stuff_classes
    result = {
        "miou": float(metrics["mIoU"]),
        "pixel_acc": float(metrics["pACC"]),
        "baseline_miou": float(baseline["mIoU"]),
        "baseline_class": classes[baseline["class_id"]],
        "train_seconds": train_seconds,
        "test_seconds": test_seconds,
        "iterations": cfg.SOLVER.MAX_ITER,
        "example": example,
    }
    per_class = ", ".join(f"{c} {metrics.get('IoU-' + c, float('nan')):.1f}" for c in classes)
    print(
        f"[segmentation] toy UperNet-ConvViT: mIoU {result['miou']:.2f} (pixel acc "
        f"{result['pixel_acc']:.2f}) vs constant '{result['baseline_class']}' baseline mIoU "
        f"{result['baseline_miou']:.2f}; {cfg.SOLVER.MAX_ITER} iterations in "
        f"{train_seconds:.0f} s, evaluation {test_seconds:.1f} s\n"
        f"[segmentation] per-class IoU: {per_class}\n[segmentation] example: {example}"
    )
    return result
