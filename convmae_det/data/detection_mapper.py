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
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from detectron2.data import DatasetMapper
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

__all__ = ["DetectionDatasetMapper", "empty_instances"]


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
    """``DatasetMapper`` (same configurable arguments) that maps images without instances; see
    the module docstring. Output: ``image`` (3, H, W) uint8 in ``image_format``, and in training
    ``instances`` with ``gt_boxes`` (N, 4), ``gt_classes`` (N,) and ``gt_masks`` (N masks)."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        if self.is_train and "annotations" not in dataset_dict:
            dataset_dict = {**dataset_dict, "annotations": []}
        return super().__call__(dataset_dict)

    def _transform_annotations(self, dataset_dict, transforms, image_shape) -> None:
        if any(obj.get("iscrowd", 0) == 0 for obj in dataset_dict["annotations"]):
            super()._transform_annotations(dataset_dict, transforms, image_shape)
            return
        dataset_dict.pop("annotations")
        mask_format = self.instance_mask_format if self.use_instance_mask else ""
        dataset_dict["instances"] = empty_instances(tuple(image_shape), mask_format=mask_format)
