"""Annotations that cannot be used as written: named (file and annotation id) when a COCO json is
loaded, dropped from the training set, and turned into ignored regions in the evaluation ground
truth.

Training (:func:`drop_invalid_instances`, applied by the training loader). detectron2's
``load_coco_json`` drops polygons with fewer than 3 points (and an instance left without any) with
a message that names neither file nor annotation, and keeps

* an instance whose ``segmentation`` is an empty list (the key is then absent): the mapper builds
  masks only if the *first* instance of an image has one, so such an instance either breaks the
  image (``KeyError: 'segmentation'``) or silently removes the masks of all its instances;
* a polygon of zero area (repeated or collinear points): its box is valid, but its mask is
  empty, so the mask head learns "nothing here" inside a box labelled as an object;
* a box of negative width or height (``[x, y, -5, 10]``) or with non-finite coordinates: without
  ``recompute_boxes`` the mapper removes it silently as an empty box, with it the mask box is
  trained, and either way the annotation contradicts itself.

:func:`drop_invalid_instances` removes such instances as a whole (box, class and mask together),
keeps the valid polygons of an instance that also has degenerate ones, and removes an image whose
every instance was dropped (its objects would otherwise be trained as background). Crowd
instances are left alone (the mapper removes them); the mask checks are skipped for a box-only
training set.

Loading (:func:`load_coco_json_checked`, the loader of the toy and builtin COCO datasets): the
json file is checked first (:func:`coco_annotation_problems`) and one warning names the file and
the id of every annotation that ``load_coco_json`` would drop or keep broken; the records keep the
annotation ``id``, so the training warning names ids too.

Evaluation (:func:`clean_coco_ground_truth`, used by
:class:`convmae_det.engine.detection_eval.CheckedCOCOEvaluator`): COCO evaluation reads the json
file itself, and pycocotools fails on a first polygon of 2 points (``Argument 'bb' has incorrect
type``) or an empty segmentation list, after a whole training run. Malformed polygons (fewer than
3 points, odd length, non-finite) are removed; an annotation left without a region or with a
malformed box becomes an ignored (crowd) region where a region remains, so that neither a
detection of it nor a miss counts, the way training does not learn it; otherwise it is removed.
Zero-area polygons are left to the evaluator (pycocotools scores them, as the official protocol
does).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from operator import mul
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.structures import BoxMode

__all__ = [
    "MIN_POLYGON_AREA",
    "AnnotationProblem",
    "polygon_area",
    "malformed_polygon_reason",
    "invalid_polygon_reason",
    "invalid_box_reason",
    "drop_invalid_instances",
    "coco_annotation_problems",
    "clean_coco_ground_truth",
    "describe_problems",
    "json_file_problems",
    "load_coco_json_checked",
    "use_checked_coco_loader",
]

logger = logging.getLogger(__name__)

MIN_POLYGON_AREA = 1e-6  # square pixels; below this a polygon is degenerate (collinear points)
_EXAMPLES = 5  # dropped instances named in the warning
_json_problems: Dict[Tuple[str, int, int], List["AnnotationProblem"]] = {}
_warned: set = set()  # json files (path, size, mtime) already named in a warning


def polygon_area(polygon: Sequence[float]) -> float:
    """Area (shoelace formula) of a COCO polygon ``[x0, y0, x1, y1, ...]``."""
    xs, ys = list(polygon[0::2]), list(polygon[1::2])
    twice = sum(map(mul, xs, ys[1:] + ys[:1])) - sum(map(mul, xs[1:] + xs[:1], ys))
    return abs(twice) / 2.0


def _finite_numbers(values: Sequence[Any]) -> bool:
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def malformed_polygon_reason(polygon: Any) -> Optional[str]:
    """Why a COCO polygon cannot be rasterised at all (pycocotools fails or misreads it), or None:
    not an even-length list, fewer than 3 points, non-numeric or non-finite coordinates."""
    if not isinstance(polygon, (list, tuple)) or len(polygon) % 2:
        return "not an even-length list of coordinates"
    if len(polygon) < 6:
        return f"fewer than 3 points ({len(polygon) // 2})"
    if not _finite_numbers(polygon):
        return "non-numeric or non-finite coordinates"
    return None


def invalid_polygon_reason(polygon: Any) -> Optional[str]:
    """Why a COCO polygon cannot be trained on (malformed, or of zero area), or None."""
    reason = malformed_polygon_reason(polygon)
    if reason is None and not polygon_area(polygon) >= MIN_POLYGON_AREA:
        return "zero area"
    return reason


def invalid_box_reason(bbox: Any, bbox_mode: Any = BoxMode.XYWH_ABS) -> Optional[str]:
    """Why an absolute box (``XYWH_ABS``, as in COCO files, or ``XYXY_ABS``) is malformed: not 4
    numbers, non-finite, or of negative width or height; None when it is usable (boxes of other
    modes are not checked). A box of zero size is left to the mapper, which removes it."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bbox is not 4 numbers"
    if not _finite_numbers(bbox):
        return "bbox has non-numeric or non-finite coordinates"
    mode = int(bbox_mode)
    if mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return None
    xywh = mode == BoxMode.XYWH_ABS
    width, height = (bbox[2], bbox[3]) if xywh else (bbox[2] - bbox[0], bbox[3] - bbox[1])
    if width < 0 or height < 0:
        return f"bbox of negative width or height ({width:g} x {height:g})"
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
    """The training records without the instances that have no usable mask or box (see the
    module docstring); records are copied where they change, the input is not modified.

    Args:
        dataset_dicts: detectron2 dataset dicts (``file_name``, ``annotations``, ...).
        with_masks: whether the model trains on masks (``DatasetMapper.use_instance_mask``);
            without masks, and for a training set without any segmentation, only boxes are
            checked.
    Returns:
        the kept records, in order (``dataset_dicts`` itself when nothing was dropped).
    """
    has_masks = with_masks and any(
        "segmentation" in a and not a.get("iscrowd", 0)
        for r in dataset_dicts
        for a in r.get("annotations", ())
    )
    out, dropped, images_removed, any_change = [], [], 0, False
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
            reason = None
            if "bbox" in anno:
                reason = invalid_box_reason(anno["bbox"], anno.get("bbox_mode", BoxMode.XYWH_ABS))
            new = None if reason else anno
            if reason is None and has_masks:
                new, reason = _check_instance(anno)
            changed |= new is not anno
            if new is None:
                dropped.append(_describe(record, i, anno, reason))
            else:
                kept.append(new)
        any_change |= changed
        if not changed:
            out.append(record)
        elif any(not a.get("iscrowd", 0) for a in kept):
            out.append({**record, "annotations": kept})
        else:
            images_removed += 1
    if dropped:
        examples = "; ".join(dropped[:_EXAMPLES]) + (" ..." if len(dropped) > _EXAMPLES else "")
        logger.warning(
            f"Dropped {len(dropped)} training instance(s) without a usable mask or box (box, class "
            f"and mask removed together) and {images_removed} image(s) left without instances: "
            f"{examples}"
        )
    return out if any_change else dataset_dicts


# ------------------------------------------------------------------------- COCO json files
@dataclass(frozen=True)
class AnnotationProblem:
    """One annotation of a COCO json file that cannot be used as written.

    Attributes:
        index: position in the file's ``annotations`` list.
        ann_id: its ``id`` (None when absent).
        image: the ``file_name`` of its image (or the image id when unknown).
        reason: what is wrong.
        unusable: True when nothing of it can be trained on or scored (training drops it,
            evaluation ignores it); False when only some polygons are malformed (removed).
        valid_polygons: the polygons that remain usable (None for an RLE or a missing mask).
    """

    index: int
    ann_id: Any
    image: Any
    reason: str
    unusable: bool
    valid_polygons: Optional[Tuple[Tuple[float, ...], ...]] = None

    def describe(self) -> str:
        which = f"id {self.ann_id}" if self.ann_id is not None else f"#{self.index}"
        return f"annotation {which} (image {self.image!r}): {self.reason}"


def _segmentation_problem(segm: Any, has_masks: bool) -> Tuple[Optional[str], bool, Any]:
    """(reason or None, unusable, the valid polygons or None) of a json ``segmentation``."""
    if segm is None:
        return ("no segmentation", True, None) if has_masks else (None, False, None)
    if isinstance(segm, dict):
        return None, False, None
    if not isinstance(segm, list):
        return f"segmentation of type {type(segm).__name__}", True, None
    if not segm:
        return "empty segmentation", True, None
    reasons = [malformed_polygon_reason(p) for p in segm]
    valid = tuple(tuple(p) for p, r in zip(segm, reasons) if r is None)
    if len(valid) == len(segm):
        return None, False, valid
    bad = "; ".join(f"polygon {k + 1} of {len(segm)}: {r}" for k, r in enumerate(reasons) if r)
    return bad, not valid, valid


def coco_annotation_problems(coco: Dict[str, Any]) -> List[AnnotationProblem]:
    """The annotations of a parsed COCO json (``images``, ``annotations``) whose box or
    segmentation is malformed (see :func:`malformed_polygon_reason`, :func:`invalid_box_reason`;
    an annotation without ``segmentation`` in a file whose others have one), crowds included."""
    annotations = coco.get("annotations") or []
    images = {img.get("id"): img.get("file_name", img.get("id")) for img in coco.get("images", [])}
    has_masks = any("segmentation" in a for a in annotations)
    problems = []
    for index, anno in enumerate(annotations):
        reason, unusable, valid = _segmentation_problem(anno.get("segmentation"), has_masks)
        box_reason = invalid_box_reason(anno.get("bbox")) if "bbox" in anno else None
        if box_reason:
            reason, unusable = "; ".join(r for r in (reason, box_reason) if r), True
        if reason:
            image = images.get(anno.get("image_id"), anno.get("image_id"))
            problems.append(
                AnnotationProblem(index, anno.get("id"), image, reason, unusable, valid)
            )
    return problems


def describe_problems(problems: Sequence[AnnotationProblem], examples: int = _EXAMPLES) -> str:
    """``id 1 (image 'a.jpg'): reason; ...`` for the first ``examples`` problems."""
    text = "; ".join(p.describe() for p in problems[:examples])
    return text + (f"; ... ({len(problems) - examples} more)" if len(problems) > examples else "")


def _bounds(polygons: Sequence[Sequence[float]]) -> List[float]:
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def clean_coco_ground_truth(
    coco: Dict[str, Any], problems: Sequence[AnnotationProblem]
) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """A copy of ``coco`` that COCO evaluation can score (the input is not modified).

    Malformed polygons are removed. An unusable annotation becomes an ignored region
    (``iscrowd=1``) covering its remaining valid polygons, or its box when the box is valid, and
    is removed when neither exists.

    Returns:
        (the cleaned dict, counts ``{"polygons_removed", "ignored", "removed"}``).
    """
    by_index = {p.index: p for p in problems}
    counts = {"polygons_removed": 0, "ignored": 0, "removed": 0}
    annotations = []
    for index, anno in enumerate(coco.get("annotations") or []):
        problem = by_index.get(index)
        if problem is None:
            annotations.append(anno)
            continue
        anno = copy.deepcopy(anno)
        valid = [list(p) for p in problem.valid_polygons or ()]
        if not problem.unusable:
            counts["polygons_removed"] += len(anno["segmentation"]) - len(valid)
            anno["segmentation"] = valid
            annotations.append(anno)
            continue
        box = anno.get("bbox")
        box_ok = "bbox" in anno and invalid_box_reason(box) is None
        if isinstance(anno.get("segmentation"), dict) and box_ok:
            region = anno["segmentation"]  # RLE kept; the box was the problem
        elif valid:
            region = valid
        elif box_ok and box[2] > 0 and box[3] > 0:
            x, y, w, h = box
            region = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        else:
            counts["removed"] += 1
            continue
        anno["segmentation"] = region
        if not box_ok:
            anno["bbox"] = _bounds(region)
            anno["area"] = anno["bbox"][2] * anno["bbox"][3]
        anno["iscrowd"] = 1
        counts["ignored"] += 1
        annotations.append(anno)
    return {**coco, "annotations": annotations}, counts


def _file_key(json_file: str) -> Tuple[str, int, int]:
    stat = os.stat(json_file)
    return os.path.abspath(json_file), stat.st_size, stat.st_mtime_ns


def json_file_problems(json_file: str) -> List[AnnotationProblem]:
    """:func:`coco_annotation_problems` of a json file (parsed once per version of the file)."""
    key = _file_key(json_file)
    if key not in _json_problems:
        with open(json_file) as f:
            _json_problems[key] = coco_annotation_problems(json.load(f))
    return _json_problems[key]


def load_coco_json_checked(
    json_file: str, image_root: str, dataset_name: Optional[str] = None, **kwargs: Any
) -> List[Dict[str, Any]]:
    """detectron2's ``load_coco_json`` (annotation ``id`` kept in the records) after a warning
    naming the file and the id of every malformed annotation (see the module docstring); a file
    already named in this process is logged again at debug level (log.txt) only."""
    from detectron2.data.datasets.coco import load_coco_json
    from detectron2.utils.file_io import PathManager

    local = PathManager.get_local_path(json_file)
    problems = json_file_problems(local)
    if problems:
        unusable = sum(p.unusable for p in problems)
        key = _file_key(local)  # a warning the first time in this process, then debug lines
        level = logging.DEBUG if key in _warned else logging.WARNING
        _warned.add(key)
        logger.log(
            level,
            f"{json_file}: {len(problems)} annotation(s) cannot be used as written "
            f"({unusable} unusable: training drops them, evaluation ignores them; "
            f"{len(problems) - unusable} with malformed polygons: removed): "
            f"{describe_problems(problems)}",
        )
    keys = list(kwargs.pop("extra_annotation_keys", None) or [])
    keys += [] if "id" in keys else ["id"]
    return load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=keys, **kwargs)


def use_checked_coco_loader(name: str) -> bool:
    """Load the registered COCO-json dataset ``name`` (metadata ``json_file`` and
    ``image_root``) with :func:`load_coco_json_checked`. Returns False (nothing changed) for a
    dataset without both."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(name)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if not json_file or not image_root:
        return False
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_json_checked(json_file, image_root, name))
    return True
