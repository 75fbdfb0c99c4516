"""detectron2's builtin COCO-format instance datasets (``coco_2017_train``, ``coco_2017_val``, ...,
``evaluator_type`` "coco") are loaded with
:func:`convmae_det.data.annotation_checks.load_coco_json_checked`: the same records, plus the
annotation ``id``, after one warning naming the file and the id of every malformed annotation
(polygons of fewer than 3 points, empty segmentations, boxes of negative size), which
detectron2's loader drops or keeps without naming them."""

from __future__ import annotations

from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..annotation_checks import use_checked_coco_loader

__all__ = ["checked_builtin_coco_names"]


def _builtin_coco_names() -> List[str]:
    names = []
    for name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("evaluator_type") == "coco" and not meta.get("generated_on_first_use"):
            names.append(name)
    return names


checked_builtin_coco_names = [n for n in _builtin_coco_names() if use_checked_coco_loader(n)]
