"""Instances whose mask annotation cannot be trained on are dropped when the training set is built,
with a warning naming the image file and the annotation.

detectron2's ``load_coco_json`` already drops polygons with fewer than 3 points (and an instance
left without any), but keeps

* an instance whose ``segmentation`` is an empty list (the key is then absent): the mapper builds
  masks only if the *first* instance of an image has one, so such an instance either breaks the
  image (``KeyError: 'segmentation'``) or silently removes the masks of all its instances;
* a polygon of zero area (repeated or collinear points): its box is valid, but its mask is
  empty, so the mask head learns "nothing here" inside a box labelled as an object.

:func:`drop_invalid_instances` removes such instances as a whole (box, class and mask together),
keeps the valid polygons of an instance that also has degenerate ones, and removes an image whose
every instance was dropped (its objects would otherwise be trained as background). Crowd
instances are left alone (the mapper removes them), and so is a box-only training set.
"""

from __future__ import annotations

import logging
import math
from operator import mul
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["MIN_POLYGON_AREA", "polygon_area", "invalid_polygon_reason", "drop_invalid_instances"]

logger = logging.getLogger(__name__)

MIN_POLYGON_AREA = 1e-6  # square pixels; below this a polygon is degenerate (collinear points)
_EXAMPLES = 5  # dropped instances named in the warning


def polygon_area(polygon: Sequence[float]) -> float:
    """Area (shoelace formula) of a COCO polygon ``[x0, y0, x1, y1, ...]``."""
    xs, ys = list(polygon[0::2]), list(polygon[1::2])
    twice = sum(map(mul, xs, ys[1:] + ys[:1])) - sum(map(mul, xs[1:] + xs[:1], ys))
    return abs(twice) / 2.0


def invalid_polygon_reason(polygon: Any) -> Optional[str]:
    """Why a COCO polygon cannot be rasterised into a mask, or None when it is valid."""
    if not isinstance(polygon, (list, tuple)) or len(polygon) % 2:
        return "not an even-length list of coordinates"
    if len(polygon) < 6:
        return f"fewer than 3 points ({len(polygon) // 2})"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon):
        return "non-numeric or non-finite coordinates"
    if not polygon_area(polygon) >= MIN_POLYGON_AREA:
        return "zero area"
    return None


def _check_instance(anno: Dict[str, Any]) -> tuple:
    """(annotation to keep or None, reason when dropped)."""
    segm = anno.get("segmentation")
    if segm is None or (isinstance(segm, (list, tuple)) and len(segm) == 0):
        return None, "empty segmentation"
    if isinstance(segm, dict):  # RLE: decoded as is
        return anno, ""
    if not isinstance(segm, (list, tuple)):
        return None, f"segmentation of type {type(segm).__name__}"
    reasons = [invalid_polygon_reason(p) for p in segm]
    valid = [p for p, r in zip(segm, reasons) if r is None]
    if not valid:
        return None, "; ".join(sorted(set(reasons)))
    if len(valid) == len(segm):
        return anno, ""
    return {**anno, "segmentation": valid}, ""


def _describe(record: Dict[str, Any], index: int, anno: Dict[str, Any], reason: str) -> str:
    which = f"id {anno['id']}" if "id" in anno else f"#{index} of the image"
    image = record.get("file_name", record.get("image_id"))
    extra = f"category {anno.get('category_id')}, bbox {anno.get('bbox')}"
    return f"{image!r} annotation {which} ({extra}): {reason}"


def drop_invalid_instances(
    dataset_dicts: List[Dict[str, Any]], *, with_masks: bool = True
) -> List[Dict[str, Any]]:
    """The training records without the instances that have no usable mask (see the module
    docstring); records are copied where they change, the input is not modified.

    Args:
        dataset_dicts: detectron2 dataset dicts (``file_name``, ``annotations``, ...).
        with_masks: whether the model trains on masks (``DatasetMapper.use_instance_mask``);
            without masks, and for a training set without any segmentation, nothing is dropped.
    Returns:
        the kept records, in order.
    """
    has_masks = with_masks and any(
        "segmentation" in a and not a.get("iscrowd", 0)
        for r in dataset_dicts
        for a in r.get("annotations", ())
    )
    if not has_masks:
        return dataset_dicts
    out, dropped, images_removed = [], [], 0
    for record in dataset_dicts:
        annos = record.get("annotations")
        if not annos:
            out.append(record)
            continue
        kept, changed = [], False
        for i, anno in enumerate(annos):
            if anno.get("iscrowd", 0):
                kept.append(anno)
                continue
            new, reason = _check_instance(anno)
            changed |= new is not anno
            if new is None:
                dropped.append(_describe(record, i, anno, reason))
            else:
                kept.append(new)
        if not changed:
            out.append(record)
        elif any(not a.get("iscrowd", 0) for a in kept):
            out.append({**record, "annotations": kept})
        else:
            images_removed += 1
    if dropped:
        examples = "; ".join(dropped[:_EXAMPLES]) + (" ..." if len(dropped) > _EXAMPLES else "")
        logger.warning(
            f"Dropped {len(dropped)} training instance(s) without a usable mask (box, class and "
            f"mask removed together) and {images_removed} image(s) left without instances: "
            f"{examples}"
        )
    return out
