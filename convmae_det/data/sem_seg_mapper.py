"""Dataset mapper for semantic segmentation with the mmseg ADE20K recipe.

Training (SPEC 5): resize to ``scale`` x a random ratio in ``ratio_range`` (aspect kept), random
crop of ``crop_size`` in which no class covers more than ``cat_max_ratio`` (10 tries), horizontal
flip, photometric distortion, then padding to the crop size (image with the pixel mean, label
with ignore). Test: shortest edge to ``min_size`` with the longest capped at ``max_size``.

Images are read in ``INPUT.FORMAT`` (grayscale, palette and RGBA files converted to 3 channels).
Label maps are read as stored (no palette conversion) and checked: a value outside
``[0, num_classes)`` other than the ignore value, a label of another size than its image, and an
unreadable or truncated file raise an error naming the file.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = [
    "SemSegDatasetMapper",
    "RandomRatioResize",
    "PhotoMetricDistortion",
    "read_image",
    "read_label",
    "check_label",
    "build_sem_seg_train_augmentation",
    "check_num_classes",
]


class RandomRatioResize(T.Augmentation):
    """Resize keeping the aspect ratio so the image fits ``scale * r`` (long, short), with ``r``
    uniform in ``ratio_range`` (mmseg ``Resize(img_scale, ratio_range)``)."""

    def __init__(
        self, scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0)
    ):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        r = np.random.uniform(*self.ratio_range)
        long_side, short_side = int(self.scale[0] * r), int(self.scale[1] * r)
        f = min(long_side / max(h, w), short_side / min(h, w))
        return T.ResizeTransform(h, w, int(h * f + 0.5), int(w * f + 0.5), Image.BILINEAR)


def _distort(
    img: np.ndarray,
    *,
    brightness: Optional[float],
    contrast: Optional[float],
    contrast_first: bool,
    saturation: Optional[float],
    hue: Optional[int],
) -> np.ndarray:
    """Apply the chosen distortions to an (H, W, 3) uint8 RGB image (uint8 after every step)."""

    def affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    out = img.astype(np.uint8)
    if brightness is not None:
        out = affine(out, beta=brightness)
    if contrast is not None and contrast_first:
        out = affine(out, alpha=contrast)
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        if saturation is not None:
            hsv[..., 1] = affine(hsv[..., 1], alpha=saturation)
        if hue is not None:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + hue) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if contrast is not None and not contrast_first:
        out = affine(out, alpha=contrast)
    return out


class PhotoMetricDistortion(T.Augmentation):
    """mmseg's photometric distortion for RGB uint8 images; each step with probability 0.5:
    brightness + U(-delta, delta), contrast x U(lo, hi) (before or after the HSV steps, at random),
    saturation x U(lo, hi), hue + U{-hue_delta..hue_delta} (OpenCV hue units, 0..179)."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Tuple[float, float] = (0.5, 1.5),
        saturation_range: Tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        rand = np.random
        params = dict(
            brightness=(
                float(rand.uniform(-self.brightness_delta, self.brightness_delta))
                if rand.randint(2)
                else None
            ),
            contrast_first=bool(rand.randint(2)),
            contrast=float(rand.uniform(*self.contrast_range)) if rand.randint(2) else None,
            saturation=float(rand.uniform(*self.saturation_range)) if rand.randint(2) else None,
            hue=int(rand.randint(-self.hue_delta, self.hue_delta + 1)) if rand.randint(2) else None,
        )
        return T.ColorTransform(lambda img: _distort(img, **params))


def build_sem_seg_train_augmentation(cfg) -> List[T.Augmentation]:
    """The training augmentations of ``cfg.INPUT.SEM_SEG`` (without the final padding)."""
    s = cfg.INPUT.SEM_SEG
    augs: List[T.Augmentation] = [
        RandomRatioResize(tuple(s.SCALE), tuple(s.RATIO_RANGE)),
        T.RandomCrop_CategoryAreaConstraint(
            "absolute",
            (s.CROP_SIZE, s.CROP_SIZE),
            s.CAT_MAX_RATIO,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        ),
    ]
    if s.FLIP_PROB > 0:
        augs.append(T.RandomFlip(prob=s.FLIP_PROB, horizontal=True, vertical=False))
    if s.PHOTOMETRIC:
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(
                f"PhotoMetricDistortion expects INPUT.FORMAT RGB, got {cfg.INPUT.FORMAT}"
            )
        augs.append(PhotoMetricDistortion())
    return augs


def read_image(path: str, image_format: str = "RGB") -> np.ndarray:
    """(H, W, C) uint8 image in ``image_format`` (EXIF orientation applied). Grayscale, palette
    and RGBA files are converted as PIL's ``convert("RGB")`` does (alpha dropped). An unreadable
    or truncated file raises ``OSError`` naming it."""
    try:
        return utils.read_image(path, format=image_format)
    except Exception as exc:
        raise OSError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc


def read_label(path: str) -> np.ndarray:
    """(H, W) label map exactly as stored (palette PNGs give their indices). An unreadable or
    truncated file raises ``OSError`` naming it."""
    try:
        with PathManager.open(path, "rb") as f:
            label = np.asarray(Image.open(f))
    except Exception as exc:
        raise OSError(f"{path}: cannot read the label map ({type(exc).__name__}: {exc})") from exc
    if label.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label map, got shape {label.shape}")
    return label


def check_label(label: np.ndarray, *, num_classes: int, ignore_value: int, path: str) -> None:
    """Raise if ``label`` holds a value outside ``[0, num_classes)`` other than ``ignore_value``."""
    values = np.unique(label)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_value)]
    if bad.size:
        raise ValueError(
            f"{path}: label values {bad.tolist()} are outside [0, {num_classes}) and not the "
            f"ignore value {ignore_value}. ADE20K labels must be converted with "
            "datasets/prepare_ade20k_sem_seg.py (0 -> 255, k -> k-1); check "
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES."
        )


class SemSegDatasetMapper:
    """Turns a dataset dict (``file_name``, ``sem_seg_file_name``) into model inputs:
    ``image`` (3, H, W) uint8 tensor in ``image_format``, ``sem_seg`` (H, W) int64 in training,
    ``height``/``width`` of the original image for evaluation."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        num_classes: int,
        ignore_value: int = 255,
        crop_size: Optional[int] = None,
        pad_value: Sequence[float] = (0.0, 0.0, 0.0),
        check_labels: bool = True,
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.crop_size = crop_size
        self.pad_value = np.asarray([round(v) for v in pad_value], dtype=np.uint8)
        self.check_labels = check_labels

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        if is_train:
            augs = build_sem_seg_train_augmentation(cfg)
        else:
            t = cfg.TEST.SEM_SEG
            augs = [T.ResizeShortestEdge(t.MIN_SIZE, t.MAX_SIZE)] if t.MIN_SIZE > 0 else []
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "crop_size": cfg.INPUT.SEM_SEG.CROP_SIZE if is_train else None,
            "pad_value": cfg.MODEL.PIXEL_MEAN,
            "check_labels": cfg.INPUT.SEM_SEG.CHECK_LABELS,
        }

    def _pad(self, image: np.ndarray, label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        h, w = label.shape
        ph, pw = max(self.crop_size - h, 0), max(self.crop_size - w, 0)
        if ph == 0 and pw == 0:
            return image, label
        image = (
            np.concatenate([image, np.broadcast_to(self.pad_value, (h, pw, 3))], axis=1)
            if pw
            else image
        )
        image = (
            np.concatenate([image, np.broadcast_to(self.pad_value, (ph, w + pw, 3))], axis=0)
            if ph
            else image
        )
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_value)
        return image, label

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        label_path = dataset_dict.pop("sem_seg_file_name", None)
        label = None
        if label_path is not None and (self.is_train or self.check_labels):
            label = read_label(label_path)
            if label.shape != image.shape[:2]:
                raise ValueError(
                    f"{label_path}: label size {label.shape} differs from image "
                    f"{dataset_dict['file_name']} size {image.shape[:2]}"
                )
            if self.check_labels:
                check_label(
                    label,
                    num_classes=self.num_classes,
                    ignore_value=self.ignore_value,
                    path=label_path,
                )
        if not self.is_train:
            label = None
        elif label is None:
            raise ValueError(f"{dataset_dict['file_name']}: training needs 'sem_seg_file_name'")

        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image, label = aug_input.image, aug_input.sem_seg
        if self.is_train and self.crop_size:
            image, label = self._pad(image, label)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(label.astype(np.int64))
        return dataset_dict


def check_num_classes(dataset_name: str, num_classes: int) -> None:
    """Raise if the dataset's class list disagrees with ``num_classes`` (config mistake)."""
    n = len(MetadataCatalog.get(dataset_name).stuff_classes)
    if n != num_classes:
        raise ValueError(
            f"dataset {dataset_name} has {n} classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
            f"{num_classes}"
        )
