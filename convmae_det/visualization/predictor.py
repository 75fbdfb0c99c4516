"""A predictor for both config kinds: LazyConfig ``.py`` and yacs ``.yaml``.

detectron2's ``DefaultPredictor`` only reads yacs configs; :class:`Predictor` takes either, builds
the model (random weights unless ``weights`` is given), applies the config's test-time resize and
the model's input format (RGB or BGR), and returns the model's output for one image at the image's
own size.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

from ..data.detection_mapper import UnreadableImageError, read_image_checked
from ..model_from_config import build_model_from_config, load_any_config

__all__ = [
    "Predictor",
    "UnreadableImageError",
    "input_format",
    "read_input_image",
    "test_augmentations",
    "test_metadata",
    "unreadable_inputs_summary",
]

logger = logging.getLogger(__name__)


def input_format(cfg: Any, kind: str) -> str:
    """ "RGB" or "BGR": the channel order the model of ``cfg`` expects."""
    if kind == "lazy":
        return str(cfg.model.get("input_format", "BGR"))
    return str(cfg.INPUT.FORMAT)


def read_input_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, EXIF orientation applied (detectron2's
    ``read_image``). Raises :class:`UnreadableImageError` naming the file and the cause
    (``reason``: "truncated", "not an image", "missing", ...)."""
    return read_image_checked(path, "RGB")


def unreadable_inputs_summary(skipped: Sequence[Tuple[str, str]], total: int) -> str:
    """``"2 of 7 inputs could not be read: a.jpg (truncated), b.txt (not an image)"`` for the
    (path, reason) of the skipped inputs out of ``total``."""
    listed = ", ".join(f"{path} ({reason})" for path, reason in skipped)
    return f"{len(skipped)} of {total} inputs could not be read: {listed}"


def _is_semantic_yacs(cfg: Any) -> bool:
    return "Semantic" in cfg.MODEL.META_ARCHITECTURE or "Seg" in cfg.MODEL.META_ARCHITECTURE


def test_augmentations(cfg: Any, kind: str) -> List[T.Augmentation]:
    """The test-time resize of a config: LazyConfig ``dataloader.test.mapper.augmentations``;
    yacs ``TEST.SEM_SEG.MIN_SIZE/MAX_SIZE`` for segmenters, ``INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST``
    otherwise (no resize when the min size is 0)."""
    if kind == "lazy":
        from detectron2.config import instantiate

        try:
            augs = cfg.dataloader.test.mapper.augmentations
        except (AttributeError, KeyError):
            return []
        return list(instantiate(augs) or [])
    if _is_semantic_yacs(cfg) and "SEM_SEG" in cfg.TEST:
        t = cfg.TEST.SEM_SEG
        return [T.ResizeShortestEdge(t.MIN_SIZE, t.MAX_SIZE)] if t.MIN_SIZE > 0 else []
    size = cfg.INPUT.MIN_SIZE_TEST
    return [T.ResizeShortestEdge(size, cfg.INPUT.MAX_SIZE_TEST)] if size > 0 else []


def test_metadata(cfg: Any, kind: str):
    """Metadata of the config's (first) test dataset, or an empty one."""
    name = None
    try:
        if kind == "lazy":
            names = cfg.dataloader.test.dataset.names
            name = names if isinstance(names, str) else list(names)[0]
        elif len(cfg.DATASETS.TEST):
            name = cfg.DATASETS.TEST[0]
    except (AttributeError, KeyError):
        name = None
    return MetadataCatalog.get(name or "__unused")


class Predictor:
    """Run a detector or segmenter of either config kind on single images.

    Args:
        config_file: LazyConfig ``.py`` or yacs ``.yaml``.
        opts: overrides (``key=value`` for LazyConfig; ``KEY VALUE`` pairs for yacs).
        weights: checkpoint read with :class:`ConvMAECheckpointer` (any supported format); ""
            keeps the config's own ``train.init_checkpoint`` / ``MODEL.WEIGHTS`` if set.
        device: "cpu", "cuda", ...; default: CUDA when available.
    Attributes:
        cfg, kind ("lazy" | "yacs"), model, metadata, input_format, augmentations.
    """

    def __init__(
        self,
        *,
        config_file: str = "",
        opts: Optional[List[str]] = None,
        weights: str = "",
        device: Optional[str] = None,
        cfg: Any = None,
        kind: Optional[str] = None,
    ):
        import convmae_det.data  # noqa: F401  (dataset registration / metadata)

        if cfg is None:
            cfg, kind = load_any_config(config_file, opts)
        elif kind is None:
            raise ValueError("Predictor(cfg=...) also needs kind='lazy' or 'yacs'")
        self.cfg, self.kind = cfg, kind
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model_from_config(cfg, kind, device=self.device).eval()
        if not weights:
            weights = cfg.train.get("init_checkpoint", "") if kind == "lazy" else cfg.MODEL.WEIGHTS
        if weights:
            from ..checkpoint import ConvMAECheckpointer

            ConvMAECheckpointer(self.model).load(weights)
        self.weights = weights
        self.metadata = test_metadata(cfg, kind)
        self.input_format = input_format(cfg, kind)
        self.augmentations = T.AugmentationList(test_augmentations(cfg, kind))

    @torch.no_grad()
    def __call__(self, image: np.ndarray, *, image_format: str = "RGB") -> Dict[str, Any]:
        """
        Args:
            image: (H, W, 3) uint8 in ``image_format`` ("RGB" or "BGR", e.g. from cv2).
        Returns:
            the model's output for this image at (H, W): ``{"instances": Instances}`` for
            detectors, ``{"sem_seg": (K, H, W) scores}`` for segmenters.
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format={image_format!r}; expected 'RGB' or 'BGR'")
        if image_format != self.input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        aug = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug)
        tensor = torch.as_tensor(aug.image.astype("float32").transpose(2, 0, 1))
        inputs = {"image": tensor.to(self.device), "height": height, "width": width}
        return self.model([inputs])[0]

    @property
    def task(self) -> str:
        """ "sem_seg" for semantic segmenters, "instances" otherwise."""
        if self.kind == "yacs":
            return "sem_seg" if _is_semantic_yacs(self.cfg) else "instances"
        return "sem_seg" if hasattr(self.model, "sem_seg_head") else "instances"
