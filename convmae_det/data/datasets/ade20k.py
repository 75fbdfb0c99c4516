"""ADE20K scene parsing: colours and checks for detectron2's builtin names, and the toy copy.

On import:

* ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val`` (registered by detectron2) get a fixed
  150-colour ``stuff_colors`` palette, and their loader is replaced by one that names the
  expected folders and ``datasets/prepare_ade20k_sem_seg.py`` when the data is missing;
* ``toy_ade20k_sem_seg_train`` / ``toy_ade20k_sem_seg_val`` are registered: a small synthetic
  dataset in the same layout, generated deterministically on first use into
  ``$DETECTRON2_DATASETS/toy_ade20k/ADEChallengeData2016`` (default root ``datasets``).
"""

from __future__ import annotations

import os
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from ..ade20k_labels import convert_ade20k_label
from ..toy_ade20k import TOY_ADE20K_CLASSES, ensure_toy_ade20k
from .registration import register_dataset

__all__ = [
    "ADE20K_PALETTE",
    "label_palette",
    "convert_ade20k_label",
    "register_ade20k",
    "register_toy_ade20k",
    "datasets_root",
    "PREPARE_SCRIPT",
]

PREPARE_SCRIPT = "datasets/prepare_ade20k_sem_seg.py"
_SPLITS = (("train", "training"), ("val", "validation"))


def label_palette(num: int) -> List[List[int]]:
    """``num`` distinct RGB colours: the bit-interleaved colour map of ids 1..num (no black)."""
    colors = []
    for label in range(1, num + 1):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append([r, g, b])
    return colors


ADE20K_PALETTE = label_palette(len(ADE20K_SEM_SEG_CATEGORIES))


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``datasets``), as detectron2 reads it."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _checked_loader(image_dir: str, gt_dir: str, name: str):
    def load() -> List[Dict]:
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(
                f"{name}: ADE20K images not found at {image_dir}. Expected the "
                "ADEChallengeData2016 release under $DETECTRON2_DATASETS (currently "
                f"{datasets_root()!r}), then run `python {PREPARE_SCRIPT}` to write "
                "annotations_detectron2/."
            )
        if not os.path.isdir(gt_dir):
            raise FileNotFoundError(
                f"{name}: prepared labels not found at {gt_dir}. Run `python {PREPARE_SCRIPT}` "
                "(it maps label 0 -> 255 and k -> k-1 into annotations_detectron2/)."
            )
        return load_sem_seg(gt_dir, image_dir, gt_ext="png", image_ext="jpg")

    return load


def register_ade20k(root: str) -> None:
    """(Re-)register ``ade20k_sem_seg_{train,val}`` under ``root`` with checks and a palette."""
    base = os.path.join(root, "ADEChallengeData2016")
    for split, dirname in _SPLITS:
        name = f"ade20k_sem_seg_{split}"
        image_dir = os.path.join(base, "images", dirname)
        gt_dir = os.path.join(base, "annotations_detectron2", dirname)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, _checked_loader(image_dir, gt_dir, name))
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "stuff_classes"):
            meta.set(
                stuff_classes=ADE20K_SEM_SEG_CATEGORIES[:],
                image_root=image_dir,
                sem_seg_root=gt_dir,
                evaluator_type="sem_seg",
                ignore_label=255,
            )
        if not hasattr(meta, "stuff_colors"):
            meta.set(stuff_colors=[list(c) for c in ADE20K_PALETTE])


def _toy_loader(base: str, image_dir: str, gt_dir: str):
    def load() -> List[Dict]:
        ensure_toy_ade20k(base)
        return load_sem_seg(gt_dir, image_dir, gt_ext="png", image_ext="jpg")

    return load


def register_toy_ade20k(root: str) -> None:
    """Register ``toy_ade20k_sem_seg_{train,val}`` at ``root/toy_ade20k/ADEChallengeData2016``."""
    base = os.path.join(root, "toy_ade20k", "ADEChallengeData2016")
    for split, dirname in _SPLITS:
        name = f"toy_ade20k_sem_seg_{split}"
        image_dir = os.path.join(base, "images", dirname)
        gt_dir = os.path.join(base, "annotations_detectron2", dirname)
        register_dataset(
            name,
            _toy_loader(base, image_dir, gt_dir),
            stuff_classes=list(TOY_ADE20K_CLASSES),
            stuff_colors=[list(c) for c in ADE20K_PALETTE[: len(TOY_ADE20K_CLASSES)]],
            image_root=image_dir,
            sem_seg_root=gt_dir,
            evaluator_type="sem_seg",
            ignore_label=255,
        )


register_ade20k(datasets_root())
register_toy_ade20k(datasets_root())
