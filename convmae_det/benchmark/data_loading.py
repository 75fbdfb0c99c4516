"""Training-mapper throughput: images per second per CPU core, decode included.

Each shipped training mapper runs on realistic synthetic inputs written to a temporary folder:

* ``detection``: COCO-size JPEGs (640 x 480) with 5-30 polygon instances (8-40 vertices each)
  through the LSJ mapper of ``configs/common/coco_loader_lsj.py`` at 1024 (flip, scale 0.1-2.0,
  crop, ``recompute_boxes``), polygon masks as the COCO configs use;
* ``segmentation``: ADE20K-size JPEGs (683 x 512) and label PNGs (150 classes in regions, 255
  unlabelled)
  through the training mapper of ``configs/ADE20K/upernet_convmae_b_512_160k.yaml`` (crop 512);
* ``pretrain``: ImageNet-size JPEGs (500 x 375) through the pretraining transform
  (RandomResizedCrop 224, flip, normalise).

One thread (torch, OpenCV), so the figure is per core; the loader's workers scale it.

    python tools/benchmark.py --data all --data-images 60
    benchmark_data_loading("detection", num_images=60)  # {"images_per_second": ..., ...}
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

__all__ = ["DATA_SUBJECTS", "benchmark_data_loading", "synthetic_mapper_inputs"]

DATA_SUBJECTS = ("detection", "segmentation", "pretrain")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradients, a few filled shapes and sensor-like noise: JPEG-compresses like a
    photo (a flat or pure-noise image would decode unrealistically fast or slow)."""
    import cv2

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [
            127 + 100 * np.sin(xx / rng.uniform(40, 120) + c) * np.cos(yy / rng.uniform(40, 120))
            for c in range(3)
        ],
        axis=-1,
    )
    for _ in range(12):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(10, width // 4)), int(rng.integers(10, height // 4)))
        color = [float(v) for v in rng.integers(0, 256, 3)]
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _polygon(rng: np.random.Generator, height: int, width: int) -> List[float]:
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    radius = rng.uniform(8, min(height, width) / 3)
    n = int(rng.integers(8, 41))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + r * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + r * np.sin(angles), 0, height - 1)
    return [float(v) for xy in zip(xs, ys) for v in xy]


def synthetic_mapper_inputs(subject: str, folder: str, num_images: int, seed: int = 0) -> list:
    """Write ``num_images`` inputs for ``subject`` under ``folder``; returns what the mapper
    takes: detectron2 dataset dicts (detection, segmentation) or file paths (pretrain)."""
    import cv2
    from detectron2.structures import BoxMode

    rng = np.random.default_rng(seed)
    size = {"detection": (480, 640), "segmentation": (512, 683), "pretrain": (375, 500)}[subject]
    height, width = size
    records = []
    for i in range(num_images):
        path = os.path.join(folder, f"{subject}_{i:05d}.jpg")
        cv2.imwrite(path, _natural_image(rng, height, width), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if subject == "pretrain":
            records.append(path)
            continue
        record = {"file_name": path, "height": height, "width": width, "image_id": i}
        if subject == "detection":
            annotations = []
            for _ in range(int(rng.integers(5, 31))):
                poly = _polygon(rng, height, width)
                xs, ys = poly[0::2], poly[1::2]
                box = [min(xs), min(ys), max(xs), max(ys)]
                annotations.append(
                    {
                        "bbox": box,
                        "bbox_mode": BoxMode.XYXY_ABS,
                        "category_id": int(rng.integers(0, 80)),
                        "segmentation": [poly],
                        "iscrowd": 0,
                    }
                )
            record["annotations"] = annotations
        else:
            # converted ADE20K labels: 0-149, 255 = unlabelled
            label = np.full((height, width), 255, dtype=np.uint8)
            for _ in range(int(rng.integers(5, 20))):
                poly = np.asarray(_polygon(rng, height, width), dtype=np.int32).reshape(-1, 2)
                cv2.fillPoly(label, [poly], int(rng.integers(0, 150)))
            label_path = os.path.join(folder, f"{subject}_{i:05d}.png")
            cv2.imwrite(label_path, label)
            record["sem_seg_file_name"] = label_path
        records.append(record)
    return records


def _detection_mapper() -> Callable:
    from detectron2.config import instantiate

    from ..engine.config import load_lazy_config

    cfg = load_lazy_config(os.path.join(_ROOT, "configs", "common", "coco_loader_lsj.py"))
    return instantiate(cfg.dataloader.train.mapper)


def _segmentation_mapper() -> Callable:
    from detectron2.config import get_cfg

    from ..config import add_convmae_config, merge_config_file_safely
    from ..data.sem_seg_mapper import SemSegDatasetMapper

    cfg = get_cfg()
    add_convmae_config(cfg)
    path = os.path.join(_ROOT, "configs", "ADE20K", "upernet_convmae_b_512_160k.yaml")
    merge_config_file_safely(cfg, path)
    return SemSegDatasetMapper(cfg, True)


def _pretrain_mapper() -> Callable:
    from ..engine.pretrain_data import _LoadAndTransform, build_pretrain_transform

    return _LoadAndTransform(build_pretrain_transform(224))


_MAPPERS = {
    "detection": _detection_mapper,
    "segmentation": _segmentation_mapper,
    "pretrain": _pretrain_mapper,
}


def _one_thread() -> Tuple[int, int]:
    import cv2

    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    return before


def benchmark_data_loading(
    subject: str,
    *,
    num_images: int = 60,
    warmup: int = 3,
    seed: int = 0,
    profile: bool = False,
    mapper: Callable = None,
) -> Dict[str, Any]:
    """Map ``num_images`` synthetic inputs of ``subject`` once each (after ``warmup``), on one
    thread. Returns images/s per core, ms/image (median and mean), the inputs' description and,
    with ``profile``, the functions that took the most time (cProfile, cumulative)."""
    import cv2

    if subject not in DATA_SUBJECTS:
        raise ValueError(f"data subject {subject!r}; expected one of {DATA_SUBJECTS}")
    mapper = mapper or _MAPPERS[subject]()
    threads = _one_thread()
    try:
        with tempfile.TemporaryDirectory() as folder:
            inputs = synthetic_mapper_inputs(subject, folder, num_images + warmup, seed=seed)
            rng_state = torch.get_rng_state(), np.random.get_state()
            torch.manual_seed(seed)
            np.random.seed(seed)
            for item in inputs[:warmup]:
                mapper(item)
            times = []
            profiler = cProfile.Profile() if profile else None
            if profiler:
                profiler.enable()
            for item in inputs[warmup:]:
                start = time.perf_counter()
                mapper(item)
                times.append(time.perf_counter() - start)
            if profiler:
                profiler.disable()
            torch.set_rng_state(rng_state[0])
            np.random.set_state(rng_state[1])
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    result = {
        "mode": "data",
        "subject": subject,
        "num_images": num_images,
        "ms_per_img_median": 1000 * float(np.median(times)),
        "ms_per_img_mean": 1000 * float(np.mean(times)),
        "images_per_second_per_core": float(len(times) / sum(times)),
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        result["profile"] = text.getvalue()
    return result
