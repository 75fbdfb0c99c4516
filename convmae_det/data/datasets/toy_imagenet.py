"""A small, deterministic classification dataset of shapes in the ImageNet folder layout.

Five classes, the toy shapes of :mod:`convmae_det.data.datasets.toy_coco` (circle, triangle,
square, star, cross). Each image is 64x64 RGB and shows one shape of its class with a random
colour, size (circumradius 16-28 px), tilt (+-20 degrees), aspect and position (centre within
8 px of the image centre)
on a plain background (one colour, a gentle gradient, pixel noise), drawn with the shape helpers
of ``toy_coco``.

Generated on first use into ``$DETECTRON2_DATASETS/toy_imagenet`` (default
``datasets/toy_imagenet``) as ``{train,val}/<class>/<class>_NNNN.png``, the layout of
:mod:`convmae_det.data.datasets.imagenet`. Image ``i`` of class ``c`` is drawn from
``numpy.random.default_rng([seed, c, i])``, so the files depend only on the split's seed. The
marker file ``toy_imagenet.json`` (format version, seeds, counts) is written last; a set whose
marker or image counts differ from the current ones (stale or partial) is generated again.

==================== ================ ========= ==============================
name                 images           seed      use
==================== ================ ========= ==============================
toy_imagenet_train   600 (120/class)  0         training
toy_imagenet_val     120 (24/class)   1000003   held-out evaluation
==================== ================ ========= ==============================
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from PIL import Image, ImageDraw

from .imagenet import load_image_folder
from .registration import register_dataset
from .toy_coco import (
    TOY_CLASSES,
    generation_lock,
    shape_fill,
    shape_polygon,
)

__all__ = [
    "TOY_IMAGENET_SPLITS",
    "toy_imagenet_root",
    "ensure_toy_imagenet",
    "draw_toy_shape",
    "register_toy_imagenet",
]

logger = logging.getLogger(__name__)

# name -> (split folder, images per class, seed)
TOY_IMAGENET_SPLITS: Dict[str, Tuple[str, int, int]] = {
    "toy_imagenet_train": ("train", 120, 0),
    "toy_imagenet_val": ("val", 24, 1_000_003),
}
_FORMAT_VERSION = 3
_IMAGE_SIZE = 64
_RADIUS_RANGE = (16.0, 28.0)  # circumradius in pixels, uniform
_MAX_TILT = np.pi / 9  # rotation of +-20 degrees
_MAX_SHIFT = 8.0  # centre within +-8 px of the image centre
_MIN_CONTRAST = 60.0  # distance of the mean shape colour from the mean background under it
_MARKER = "toy_imagenet.json"
_TMP_PREFIX = ".toy_imagenet-"


def toy_imagenet_root() -> str:
    """``$DETECTRON2_DATASETS/toy_imagenet`` (default ``datasets/toy_imagenet``)."""
    return os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "toy_imagenet"
    )


def _plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float background: one random colour, a gentle linear gradient and pixel
    noise. Plainer than the detection set's textures, so that the shape's outline is what tells
    the classes apart and a toy model learns it in a few hundred CPU iterations."""
    base = rng.uniform(30, 225, size=3)
    ramp = np.linspace(-1.0, 1.0, size)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    img = base + rng.uniform(10, 30) * grad[..., None] + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(img, 0, 255)


def draw_toy_shape(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """One (64, 64, 3) uint8 RGB image showing a shape of class ``TOY_CLASSES[class_index]``."""
    size = _IMAGE_SIZE
    img = _plain_background(rng, size)
    r = float(rng.uniform(*_RADIUS_RANGE))
    aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
    theta = float(rng.uniform(-_MAX_TILT, _MAX_TILT))  # upright, slightly tilted
    cx, cy = size / 2 + rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2)
    pts = shape_polygon(TOY_CLASSES[class_index], cx, cy, r, theta, aspect)
    mask_img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in pts], fill=255)
    mask = (np.asarray(mask_img, dtype=np.float32) / 255.0)[..., None]
    inside = mask[..., 0] > 0.5
    under = img[inside].mean(0)
    fill = shape_fill(rng, size, size)
    for _ in range(4):  # a few more colours when the shape would hardly stand out
        if np.linalg.norm(fill[inside].mean(0) - under) >= _MIN_CONTRAST:
            break
        fill = shape_fill(rng, size, size)
    img = img * (1 - mask) + fill * mask
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _expected_marker() -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "image_size": _IMAGE_SIZE,
        "classes": list(TOY_CLASSES),
        "splits": {
            split: {"seed": seed, "images_per_class": per_class}
            for split, per_class, seed in TOY_IMAGENET_SPLITS.values()
        },
    }


def _is_current(root: str) -> bool:
    """The marker matches the current format and every class folder holds its images."""
    try:
        with open(os.path.join(root, _MARKER)) as f:
            if json.load(f) != _expected_marker():
                return False
        for split, per_class, _ in TOY_IMAGENET_SPLITS.values():
            for name in TOY_CLASSES:
                files = os.listdir(os.path.join(root, split, name))
                if sum(f.endswith(".png") for f in files) != per_class:
                    return False
    except (OSError, ValueError):
        return False
    return True


def _generate(root: str) -> None:
    """Write both splits into a temporary folder, move them into place, then the marker.
    Call with the generation lock held."""
    for leftover in os.listdir(root):  # folders of an interrupted generation
        if leftover.startswith(_TMP_PREFIX):
            shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root)
    try:
        for split, per_class, seed in TOY_IMAGENET_SPLITS.values():
            for c, name in enumerate(TOY_CLASSES):
                folder = os.path.join(tmp, split, name)
                os.makedirs(folder)
                for i in range(per_class):
                    image = draw_toy_shape(np.random.default_rng([seed, c, i]), c)
                    Image.fromarray(image).save(os.path.join(folder, f"{name}_{i:04d}.png"))
        marker = os.path.join(root, _MARKER)
        if os.path.exists(marker):
            os.remove(marker)
        for split, _, _ in TOY_IMAGENET_SPLITS.values():
            shutil.rmtree(os.path.join(root, split), ignore_errors=True)
            os.replace(os.path.join(tmp, split), os.path.join(root, split))
        with open(marker + ".tmp", "w") as f:
            json.dump(_expected_marker(), f, indent=1)
        os.replace(marker + ".tmp", marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_toy_imagenet(root: Optional[str] = None) -> str:
    """Generate the toy set under ``root`` (default :func:`toy_imagenet_root`) unless the
    current version is already there; returns the (absolute) root. Safe to call from several
    processes at once: generation holds a file lock."""
    root = os.path.abspath(root or toy_imagenet_root())
    if not _is_current(root):
        with generation_lock(root):
            if not _is_current(root):
                logger.info(f"Generating the toy classification dataset into {root} ...")
                _generate(root)
    return root


def _load(name: str):
    meta = MetadataCatalog.get(name)
    ensure_toy_imagenet(meta.dataset_root)
    return load_image_folder(meta.image_root, classes=TOY_CLASSES)


def register_toy_imagenet(
    names: Sequence[str] = tuple(TOY_IMAGENET_SPLITS), root: Optional[str] = None
) -> None:
    """Register the toy splits under ``root`` (default :func:`toy_imagenet_root`, read now).
    Data is generated lazily, by ``DatasetCatalog.get`` or :func:`ensure_toy_imagenet`.
    Registering again with another root replaces the registration."""
    root = os.path.abspath(root or toy_imagenet_root())
    for name in names:
        image_root = os.path.join(root, TOY_IMAGENET_SPLITS[name][0])
        register_dataset(
            name,
            lambda name=name: _load(name),
            keep_if=("image_root", image_root),
            image_root=image_root,
            dataset_root=root,
            evaluator_type="classification",
            classes=list(TOY_CLASSES),
            generated_on_first_use=True,
        )


register_toy_imagenet()
