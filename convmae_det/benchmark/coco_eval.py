"""COCO evaluation speed: ``COCOEvaluator.evaluate()`` of each backend on the same detections.

A synthetic COCO-style evaluation that exercises what COCO val does: thousands of images, up to
100 detections per image with boxes and RLE masks, crowd regions, images without ground truth,
images without detections, non-contiguous category ids and objects in every area range. The
detections go through ``COCOEvaluator.process()`` once (not timed; the same for both backends),
then ``evaluate()`` of an evaluator per backend is timed, interleaved, so the ratio is measured
under the same machine load.

    python tools/benchmark.py --coco-eval 2000       # the command line
    result = benchmark_coco_eval(num_images=2000)    # {"backends": {...}, "speedup": ...}
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..evaluation.coco_backend import COCOEVAL_BACKENDS

__all__ = [
    "COCO_STAT_NAMES",
    "SyntheticCOCOEvaluation",
    "benchmark_coco_eval",
    "coco_evaluator_stats",
    "synthetic_coco_evaluation",
]

# the 12 numbers of COCOeval.summarize(), in its order
COCO_STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
_CATEGORY_IDS = (1, 3, 7, 12)  # non-contiguous, as in COCO


class SyntheticCOCOEvaluation:
    """Ground truth (a COCO json dict) and per-image model outputs that score in a known range.

    Attributes:
        gt: the COCO-format ground-truth dict (``images``, ``annotations``, ``categories``).
        inputs: per image ``{"image_id", "height", "width"}`` as ``COCOEvaluator.process`` wants.
        outputs: per image ``{"instances": Instances}`` with ``pred_boxes`` (XYXY), ``scores``,
            ``pred_classes`` (contiguous ids) and ``pred_masks`` (N x H x W bool).
    """

    def __init__(self, gt: Dict[str, Any], inputs: List[dict], outputs: List[dict]):
        self.gt, self.inputs, self.outputs = gt, inputs, outputs


def _object_mask(height: int, width: int, box: Tuple[int, int, int, int]) -> np.ndarray:
    """A box with a notch cut out of one corner (so box and mask areas differ)."""
    x, y, w, h = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y : y + h, x : x + w] = True
    if w > 3 and h > 3:
        mask[y + h // 2 : y + h, x : x + w // 2] = False
    return mask


def _random_box(rng: np.random.Generator, height: int, width: int) -> Tuple[int, int, int, int]:
    # sides from 2 to ~0.8 of the image: small (< 32^2), medium and large (> 96^2) areas
    w = int(rng.integers(2, int(0.8 * width)))
    h = int(rng.integers(2, int(0.8 * height)))
    return int(rng.integers(0, width - w)), int(rng.integers(0, height - h)), w, h


def synthetic_coco_evaluation(
    num_images: int = 1000,
    *,
    seed: int = 0,
    height: int = 256,
    width: int = 256,
    max_detections: int = 100,
) -> SyntheticCOCOEvaluation:
    """Build the synthetic evaluation (deterministic for a seed). Every 13th image has no ground
    truth (detections only), every 11th no detections, about 5% of the objects are crowd regions
    (RLE), and each object draws 0-12 jittered detections (80% of them of its class, the others
    of a random class); images are topped up
    with background detections to ``max_detections`` on every 3rd image."""
    from detectron2.structures import Boxes, Instances
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    categories = [{"id": c, "name": f"class{c}"} for c in _CATEGORY_IDS]
    images, annotations, inputs, outputs = [], [], [], []
    for index in range(num_images):
        image_id = index + 1
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{index}"})
        inputs.append({"image_id": image_id, "height": height, "width": width})
        num_gt = 0 if index % 13 == 0 else int(rng.integers(1, 15))
        det_boxes, det_masks, det_scores, det_classes = [], [], [], []
        for _ in range(num_gt):
            box = _random_box(rng, height, width)
            mask = _object_mask(height, width, box)
            crowd = bool(rng.random() < 0.05)
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            category = int(rng.integers(0, len(_CATEGORY_IDS)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": _CATEGORY_IDS[category],
                    "bbox": [float(v) for v in box],
                    "area": float(mask.sum()),
                    "iscrowd": int(crowd),
                    "segmentation": rle if crowd else _polygon(box),
                }
            )
            if index % 11 == 0:
                continue
            for _ in range(int(rng.integers(0, 13))):
                dx, dy = (int(v) for v in rng.integers(-box[2] // 4 - 1, box[2] // 4 + 2, 2))
                x = int(np.clip(box[0] + dx, 0, width - box[2]))
                y = int(np.clip(box[1] + dy, 0, height - box[3]))
                det_boxes.append((x, y, box[2], box[3]))
                det_masks.append(_object_mask(height, width, (x, y, box[2], box[3])))
                det_scores.append(float(rng.random()))
                right = rng.random() < 0.8
                det_classes.append(category if right else int(rng.integers(0, len(_CATEGORY_IDS))))
        if index % 11 != 0 and index % 3 == 0:
            while len(det_boxes) < max_detections:
                box = _random_box(rng, height, width)
                det_boxes.append(box)
                det_masks.append(_object_mask(height, width, box))
                det_scores.append(float(rng.random()) * 0.5)
                det_classes.append(int(rng.integers(0, len(_CATEGORY_IDS))))
        keep = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")
        keep = keep[:max_detections]
        instances = Instances((height, width))
        xyxy = [(x, y, x + w, y + h) for x, y, w, h in det_boxes]
        instances.pred_boxes = Boxes(torch.tensor([xyxy[i] for i in keep]).reshape(-1, 4).float())
        instances.scores = torch.tensor([det_scores[i] for i in keep], dtype=torch.float32)
        instances.pred_classes = torch.tensor([det_classes[i] for i in keep], dtype=torch.int64)
        instances.pred_masks = torch.from_numpy(
            np.stack([det_masks[i] for i in keep])
            if len(keep)
            else np.zeros((0, height, width), dtype=bool)
        )
        outputs.append({"instances": instances})
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return SyntheticCOCOEvaluation(gt, inputs, outputs)


def _polygon(box: Tuple[int, int, int, int]) -> List[List[float]]:
    """The notched box of :func:`_object_mask` as a COCO polygon."""
    x, y, w, h = (float(v) for v in box)
    if w > 3 and h > 3:
        hw, hh = float(int(w) // 2), float(int(h) // 2)
        points = [x, y, x + w, y, x + w, y + h, x + hw, y + h, x + hw, y + hh, x, y + hh]
    else:
        points = [x, y, x + w, y, x + w, y + h, x, y + h]
    return [points]


@contextmanager
def _backend(name: Optional[str]) -> Iterator[None]:
    """``name``: "faster_coco_eval" / "pycocotools" (our path with that scorer), "detectron2"
    (the installed detectron2's own path: pycocotools, deep copies), None (the default)."""
    from ..evaluation.coco_backend import detectron2_cocoeval

    old = os.environ.get("CONVMAE_COCOEVAL")
    if name in COCOEVAL_BACKENDS:
        os.environ["CONVMAE_COCOEVAL"] = name
    try:
        if name == "detectron2":
            with detectron2_cocoeval():
                yield
        else:
            yield
    finally:
        if old is None:
            os.environ.pop("CONVMAE_COCOEVAL", None)
        else:
            os.environ["CONVMAE_COCOEVAL"] = old


def _register(data: SyntheticCOCOEvaluation, folder: str) -> str:
    from detectron2.data import MetadataCatalog

    json_file = os.path.join(folder, "synthetic_coco_gt.json")
    with open(json_file, "w") as f:
        json.dump(data.gt, f)
    name = f"synthetic_coco_eval_{abs(hash(json_file))}"
    MetadataCatalog.get(name).set(
        json_file=json_file,
        thing_classes=[c["name"] for c in data.gt["categories"]],
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(_CATEGORY_IDS)},
        evaluator_type="coco",
    )
    return name


def _evaluator(name: str, data: SyntheticCOCOEvaluation, backend: Optional[str]):
    from detectron2.evaluation import COCOEvaluator

    with _backend(backend):
        evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False)
        evaluator.reset()
        for inp, out in zip(data.inputs, data.outputs):
            evaluator.process([inp], [out])
    return evaluator


def _evaluate(evaluator, backend: Optional[str]) -> Tuple[Dict[str, Any], float]:
    # evaluate() maps the category ids of its stored predictions in place, so a repeated
    # evaluate() starts from a copy of what process() stored
    if not hasattr(evaluator, "_processed"):
        evaluator._processed = copy.deepcopy(evaluator._predictions)
    evaluator._predictions = copy.deepcopy(evaluator._processed)
    with _backend(backend):
        start = time.perf_counter()
        results = evaluator.evaluate()
        return results, time.perf_counter() - start


def coco_evaluator_stats(
    data: SyntheticCOCOEvaluation, backend: Optional[str]
) -> Dict[str, Dict[str, float]]:
    """``COCOEvaluator(...).evaluate()`` on ``data`` with ``backend`` ("faster_coco_eval",
    "pycocotools", "detectron2" or None for the default): ``{"bbox": {...}, "segm": {...}}``, detectron2's
    result dicts (AP in percent, per-category APs included)."""
    with tempfile.TemporaryDirectory() as folder:
        name = _register(data, folder)
        results, _ = _evaluate(_evaluator(name, data, backend), backend)
    return {task: dict(results[task]) for task in ("bbox", "segm")}


def benchmark_coco_eval(
    num_images: int = 1000, *, repeats: int = 3, seed: int = 0, max_detections: int = 100
) -> Dict[str, Any]:
    """Time ``evaluate()`` (bbox + segm) on the same detections, interleaved ``repeats`` times:
    "detectron2" (the installed detectron2 as shipped: pycocotools' pure-Python COCOeval),
    "pycocotools" (our path scored by pycocotools) and "faster_coco_eval" (our default).
    Returns per-path seconds (median, all runs), the speedup of the default over detectron2's
    path, and the largest difference between their AP figures."""
    from ..evaluation.coco_backend import cocoeval_backend

    with _backend(None):
        if cocoeval_backend() != "faster_coco_eval":
            raise RuntimeError("faster-coco-eval is not installed: pip install faster-coco-eval")
    data = synthetic_coco_evaluation(num_images, seed=seed, max_detections=max_detections)
    backends = ("detectron2", "pycocotools", "faster_coco_eval")
    seconds: Dict[str, List[float]] = {b: [] for b in backends}
    figures: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        name = _register(data, folder)
        evaluators = {b: _evaluator(name, data, b) for b in backends}
        for _ in range(repeats):
            for b in backends:
                figures[b], elapsed = _evaluate(evaluators[b], b)
                seconds[b].append(elapsed)
    largest = max(
        abs(figures["detectron2"][task][key] - figures[b][task][key])
        for b in backends[1:]
        for task in ("bbox", "segm")
        for key in figures["detectron2"][task]
    )
    median = {b: statistics.median(s) for b, s in seconds.items()}
    return {
        "mode": "coco_eval",
        "num_images": num_images,
        "num_detections": int(sum(len(o["instances"]) for o in data.outputs)),
        "num_ground_truth": len(data.gt["annotations"]),
        "repeats": repeats,
        "backends": {b: {"seconds_median": median[b], "seconds": seconds[b]} for b in backends},
        "speedup": median["detectron2"] / median["faster_coco_eval"],
        "largest_ap_difference": largest,
        "threads": torch.get_num_threads(),
    }
