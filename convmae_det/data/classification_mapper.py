"""Image classification data: the record -> tensor mapper and the official ConvMAE / MAE
transforms (fine-tuning, linear probing, evaluation).

A record is a dict of :func:`convmae_det.data.datasets.imagenet.load_image_folder`
(``file_name``, ``image_id``, ``label``). :class:`ClassificationMapper` reads the image with the
data package's one checked reader (``read_image_checked``: EXIF orientation, errors naming the file)
and applies a transform that returns a normalised float tensor (3, H, W), e.g. one built by
:func:`build_classification_transform`. Every random choice of those transforms is drawn from
the global ``random`` / ``numpy`` / ``torch`` generators, which
:class:`~convmae_det.data.resumable_loader.ResumableTrainLoader` seeds per sample: the batches are
reproducible and resume exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .detection_mapper import UnreadableImageError, read_image_checked

__all__ = [
    "ClassificationMapper",
    "build_classification_transform",
    "ImageReadError",
    "RECIPES",
]

RECIPES = ("finetune", "linprobe")
_PATCH = 16  # input sizes are multiples of the encoder's total stride


ImageReadError = UnreadableImageError
"""An image file that cannot be read or decoded (the data package's one unreadable-image error,
raised by :func:`~convmae_det.data.detection_mapper.read_image_checked`); the message names the
file and the cause."""


class ClassificationMapper:
    """Maps a classification record to the model input.

    Args:
        transform: callable PIL RGB image -> normalised float tensor (3, H, W), e.g.
            :func:`build_classification_transform`.
        image_format: channel order of the returned tensor: "RGB" (the transform's order) or
            "BGR" (channels reversed, for models trained on BGR input).

    Returns (``__call__``):
        ``{"image": float tensor (3, H, W), "label": int, "image_id": record["image_id"],
        "file_name": str}``.

    Raises:
        ImageReadError: the image cannot be read; the message names the file (with
            ``ResumableTrainLoader(skip_bad_samples=True)`` the sample is logged, counted and
            replaced).
        KeyError: the record has no ``label``.
    """

    def __init__(
        self, transform: Callable[[Image.Image], torch.Tensor], *, image_format: str = "RGB"
    ):
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format={image_format!r}: expected 'RGB' or 'BGR'")
        self.transform = transform
        self.image_format = image_format

    def __call__(self, record: Dict[str, Any]) -> Dict[str, Any]:
        file_name = record["file_name"]
        if "label" not in record:
            raise KeyError(f"record of {file_name} has no 'label'")
        image = self.transform(Image.fromarray(read_image_checked(file_name)))
        if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
            found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise TypeError(
                f"the transform must return a tensor (3, H, W); it returned {found} for "
                f"{file_name}"
            )
        if self.image_format == "BGR":
            image = image.flip(0)
        return {
            "image": image,
            "label": int(record["label"]),
            "image_id": record.get("image_id"),
            "file_name": file_name,
        }

    def __repr__(self) -> str:
        return (
            f"ClassificationMapper(image_format={self.image_format!r},\n"
            f"  transform={self.transform})"
        )


def _interpolation_mode(interpolation: str) -> InterpolationMode:
    try:
        return InterpolationMode(interpolation)
    except ValueError:
        known = [m.value for m in InterpolationMode]
        raise ValueError(f"interpolation={interpolation!r}: expected one of {known}") from None


def build_classification_transform(
    *,
    is_training: bool,
    input_size: int = 224,
    recipe: str = "finetune",
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    color_jitter: Optional[float] = None,
    interpolation: str = "bicubic",
    crop_pct: Optional[float] = None,
    scale: Sequence[float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """The transform PIL RGB image -> normalised float tensor (3, input_size, input_size) of the
    official ConvMAE / MAE recipes.

    * ``recipe="finetune"``, training: ``timm.data.create_transform`` (random resized crop,
      flip, RandAugment ``auto_augment``, normalisation, random erasing ``re_*``); timm ignores
      ``color_jitter`` when ``auto_augment`` is set.
    * ``recipe="linprobe"``, training: ``RandomResizedCrop(input_size)``,
      ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (no RandAugment, no erasing; the
      ``auto_augment`` / ``re_*`` / ``color_jitter`` arguments are not used).
    * evaluation (either recipe): the shorter side resized to ``int(input_size / crop_pct)``,
      a centre crop of ``input_size``, ``ToTensor``, ``Normalize``; ``crop_pct`` defaults to
      224/256 for ``input_size <= 224`` (resize to 256, crop 224) and 1.0 above.

    ``interpolation`` ("bicubic", "bilinear", ...) is used by every resize; ``scale`` is the
    range of the random crop's area (fraction of the image) in training, (0.08, 1) as the
    official recipes.

    Raises:
        ValueError: unknown ``recipe`` or ``interpolation``, ``input_size`` not a positive
            multiple of 16, ``crop_pct`` outside (0, 1], ``re_prob`` outside [0, 1].
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: expected one of {RECIPES}")
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(f"input_size={input_size!r}: expected a positive multiple of {_PATCH}")
    if input_size <= 0 or input_size % _PATCH:
        raise ValueError(f"input_size={input_size}: expected a positive multiple of {_PATCH}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct}: expected a value in (0, 1]")
    scale = tuple(float(v) for v in scale)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale={scale}: expected (min, max) area fractions, 0 < min <= max <= 1")
    if not 0.0 <= re_prob <= 1.0:
        raise ValueError(f"re_prob={re_prob}: expected a probability in [0, 1]")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    if is_training and recipe == "finetune":
        if interpolation != "random":
            _interpolation_mode(interpolation)
        return create_transform(
            input_size=input_size,
            is_training=True,
            scale=scale,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            interpolation=interpolation,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
            mean=mean,
            std=std,
        )
    mode = _interpolation_mode(interpolation)
    if is_training:  # linear probing
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(input_size, scale=scale, interpolation=mode),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose(
        [
            transforms.Resize(int(input_size / crop_pct), interpolation=mode),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
