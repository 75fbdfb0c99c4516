"""The training mapper of the instance-segmentation loaders: detectron2's ``DatasetMapper`` that
also maps an image without instances.

With ``recompute_boxes=True`` (boxes from the cropped masks, the LSJ recipe) detectron2's mapper
fails on an image without (non-crowd) instances: ``annotations_to_instances`` then sets no
``gt_masks`` and the box recomputation raises ``AttributeError: Cannot find field 'gt_masks'``.
Such images reach training with ``dataloader.train.dataset.filter_empty=False``, or when every
instance of an image is a crowd region. :class:`DetectionDatasetMapper` gives them empty
``gt_boxes`` (0, 4), ``gt_classes`` (0,) and ``gt_masks`` (polygons or (0, H, W) bitmasks), and
treats a record without an ``annotations`` key as one without instances, so that a batch mixing
such records with annotated ones still has ``instances`` everywhere. The model then learns the
image as background (zero box-regression and mask losses for it).

An image that cannot be read (truncated, not an image, missing, of another size than its record
says) raises :class:`UnreadableImageError`, an ``OSError`` naming the file and the cause, in
training and at test time alike (detectron2's message names neither); :func:`read_image_checked`
does the same for a single file (the demo).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError, read_image
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DetectionDatasetMapper",
    "UnreadableImageError",
    "empty_instances",
    "image_error_reason",
    "read_image_checked",
]

# what reading / decoding a broken file raises (PIL: OSError, SyntaxError for broken PNGs,
# DecompressionBombError; detectron2's check of the recorded size: SizeMismatchError)
_READ_ERRORS = (OSError, SyntaxError, SizeMismatchError, Image.DecompressionBombError)


class UnreadableImageError(OSError):
    """An image file that cannot be read; the message names the file and the cause.

    Attributes:
        path: the file.
        reason: short cause: "truncated", "not an image", "missing" or the error's own text.
        detail: the underlying error (``Type: message``).
    """

    def __init__(self, path: str, reason: str, detail: str = ""):
        message = f"{path}: cannot read the image: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(message)
        self.path, self.reason, self.detail = path, reason, detail

    def __reduce__(self):  # picklable across loader workers
        return type(self), (self.path, self.reason, self.detail)

    def __str__(self) -> str:
        return self.args[0]


def image_error_reason(exc: BaseException) -> str:
    """Short cause of an image read error: "missing", "not an image", "truncated", or the
    error's own text (e.g. detectron2's size mismatch)."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, UnidentifiedImageError) or "cannot identify image file" in text:
        return "not an image"
    if "truncated" in text.lower():
        return "truncated"
    return text.splitlines()[0] if text else type(exc).__name__


def _unreadable(path: str, exc: BaseException) -> UnreadableImageError:
    if isinstance(exc, UnreadableImageError):
        return exc
    return UnreadableImageError(str(path), image_error_reason(exc), f"{type(exc).__name__}: {exc}")


def read_image_checked(path: str, image_format: str = "RGB") -> np.ndarray:
    """detectron2's ``read_image`` (EXIF orientation applied, (H, W, C) uint8 in
    ``image_format``) raising :class:`UnreadableImageError` naming ``path`` and the cause."""
    try:
        return read_image(path, format=image_format)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def empty_instances(image_shape: Tuple[int, int], *, mask_format: str = "") -> Instances:
    """Instances of an image (H, W) without objects: ``gt_boxes`` (0, 4), ``gt_classes`` (0,)
    and, for ``mask_format`` "polygon" / "bitmask", ``gt_masks`` with 0 masks."""
    instances = Instances(image_shape)
    instances.gt_boxes = Boxes(torch.zeros(0, 4))
    instances.gt_classes = torch.zeros(0, dtype=torch.int64)
    if mask_format == "polygon":
        instances.gt_masks = PolygonMasks([])
    elif mask_format == "bitmask":
        instances.gt_masks = BitMasks(torch.zeros(0, *image_shape, dtype=torch.bool))
    elif mask_format:
        raise ValueError(f"mask_format={mask_format!r}; expected 'polygon' or 'bitmask'")
    return instances


class DetectionDatasetMapper(DatasetMapper):
    """``DatasetMapper`` (same configurable arguments) that maps images without instances and
    names unreadable files (:class:`UnreadableImageError`); see the module docstring. Output:
    ``image`` (3, H, W) uint8 in ``image_format``, and in training ``instances`` with
    ``gt_boxes`` (N, 4), ``gt_classes`` (N,) and ``gt_masks`` (N masks)."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        if self.is_train and "annotations" not in dataset_dict:
            dataset_dict = {**dataset_dict, "annotations": []}
        try:
            return super().__call__(dataset_dict)
        except _READ_ERRORS as exc:
            raise _unreadable(dataset_dict.get("file_name", "?"), exc) from exc

    def _transform_annotations(self, dataset_dict, transforms, image_shape) -> None:
        if any(obj.get("iscrowd", 0) == 0 for obj in dataset_dict["annotations"]):
            super()._transform_annotations(dataset_dict, transforms, image_shape)
            return
        dataset_dict.pop("annotations")
        mask_format = self.instance_mask_format if self.use_instance_mask else ""
        dataset_dict["instances"] = empty_instances(tuple(image_shape), mask_format=mask_format)
