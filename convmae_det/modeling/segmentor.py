"""Encoder-decoder semantic segmentor: detectron2's SemanticSegmentor plus an auxiliary head and
the mmseg test modes (whole image, sliding window, multi-scale + flip).

Inference on one image (C, H, W), already resized by the test mapper (short side 512):

* ``whole``: pad to the backbone's size divisibility, run once, crop the logits back;
* ``slide``: windows of ``crop_size`` every ``stride`` (the last window of a row / column is
  shifted back inside the image), logits of overlapping windows averaged;
* ``scales`` / ``flip``: the image is resized by each ratio (and flipped), each result is brought
  back to (H, W), turned into probabilities and averaged (mmseg ``aug_test``).

Single scale without flip returns logits, otherwise averaged probabilities; both are (K, H, W)
and are resized to the dataset's ``height`` x ``width`` like ``SemanticSegmentor`` does.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor, build_backbone
from detectron2.modeling.meta_arch.semantic_seg import build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..utils.sliding_window import sliding_window_boxes

__all__ = [
    "EncoderDecoderSegmentor",
    "sliding_window_boxes",
    "slide_inference",
    "whole_inference",
    "TEST_MODES",
]

TEST_MODES = ("whole", "slide")
Box = Tuple[int, int, int, int]  # y1, y2, x1, x2


def _pad_to(x: torch.Tensor, divisor: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph = (math.ceil(h / divisor) * divisor - h) if divisor > 1 else 0
    pw = (math.ceil(w / divisor) * divisor - w) if divisor > 1 else 0
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def whole_inference(
    fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, *, size_divisibility: int = 1
) -> torch.Tensor:
    """Run ``fn`` ((1, 3, H', W') -> (1, K, H', W') logits) on a zero-padded (1, 3, H, W) image
    and return the (1, K, H, W) logits of the unpadded area."""
    h, w = image.shape[-2:]
    return fn(_pad_to(image, size_divisibility))[..., :h, :w]


def slide_inference(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    num_classes: int,
    crop_size: Tuple[int, int],
    stride: Tuple[int, int],
    size_divisibility: int = 1,
) -> torch.Tensor:
    """Sliding-window inference on a (1, 3, H, W) image; returns (1, K, H, W) averaged logits.

    Each window goes through :func:`whole_inference` (so windows smaller than ``crop_size`` are
    zero-padded to ``size_divisibility``); every pixel is divided by the number of windows that
    cover it.
    """
    h, w = image.shape[-2:]
    logits = image.new_zeros((1, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    for y1, y2, x1, x2 in sliding_window_boxes(h, w, crop_size, stride):
        crop = image[..., y1:y2, x1:x2]
        logits[..., y1:y2, x1:x2] += whole_inference(fn, crop, size_divisibility=size_divisibility)
        count[..., y1:y2, x1:x2] += 1
    return logits / count


@META_ARCH_REGISTRY.register()
class EncoderDecoderSegmentor(SemanticSegmentor):
    """SemanticSegmentor with an optional auxiliary head and whole / sliding / multi-scale tests.

    Args:
        backbone, sem_seg_head, pixel_mean, pixel_std: as in ``SemanticSegmentor``.
        auxiliary_head: a head with the same contract whose losses are added in training (its
            loss weight lives in the head); unused in inference.
        test_mode: "whole" or "slide".
        crop_size, stride: sliding window (h, w) and step (h, w).
        scales: resize ratios of the test image (``(1.0,)``: single scale).
        flip: also run on the horizontally flipped image.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        sem_seg_head: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        auxiliary_head: Optional[nn.Module] = None,
        test_mode: str = "whole",
        crop_size: Tuple[int, int] = (512, 512),
        stride: Tuple[int, int] = (341, 341),
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
    ):
        super().__init__(
            backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        if test_mode not in TEST_MODES:
            raise ValueError(f"test_mode={test_mode!r}; expected one of {TEST_MODES}")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales={list(scales)} must be positive ratios")
        self.auxiliary_head = auxiliary_head
        self.test_mode = test_mode
        self.crop_size = tuple(crop_size)
        self.stride = tuple(stride)
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip

    @classmethod
    def from_config(cls, cfg) -> Dict:
        backbone = build_backbone(cfg)
        shape = backbone.output_shape()
        aux = None
        if cfg.MODEL.AUX_HEAD.ENABLED:
            from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

            aux = SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.AUX_HEAD.NAME)(cfg, shape)
        test = cfg.TEST.SEM_SEG
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, shape),
            "auxiliary_head": aux,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_mode": test.MODE,
            "crop_size": tuple(test.CROP_SIZE),
            "stride": tuple(test.STRIDE),
            "scales": tuple(test.SCALES),
            "flip": test.FLIP,
        }

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.num_classes

    def forward(self, batched_inputs: List[Dict]) -> object:
        """Training: dict of losses (``loss_sem_seg`` and the auxiliary ``loss_aux``).
        Inference: ``[{"sem_seg": (K, height, width)}]`` per image."""
        if not self.training:
            return [self._inference_one(x) for x in batched_inputs]
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        images = ImageList.from_tensors(
            images,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        if "sem_seg" not in batched_inputs[0]:
            raise ValueError("training inputs need a 'sem_seg' label map (use SemSegDatasetMapper)")
        targets = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_head.ignore_value,
            self.backbone.padding_constraints,
        ).tensor
        features = self.backbone(images.tensor)
        _, losses = self.sem_seg_head(features, targets)
        if self.auxiliary_head is not None:
            _, aux_losses = self.auxiliary_head(features, targets)
            losses.update(aux_losses)
        return losses

    # ------------------------------------------------------------------ inference
    def _encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised, padded -> (B, K, H, W) logits of the main head."""
        return self.sem_seg_head(self.backbone(x))[0]

    def _single_scale(self, image: torch.Tensor) -> torch.Tensor:
        div = self.backbone.size_divisibility
        if self.test_mode == "slide":
            return slide_inference(
                self._encode_decode,
                image,
                num_classes=self.num_classes,
                crop_size=self.crop_size,
                stride=self.stride,
                size_divisibility=div,
            )
        return whole_inference(self._encode_decode, image, size_divisibility=div)

    def inference(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) normalised image -> (1, K, H, W) logits (single scale, no flip) or
        probabilities averaged over ``scales`` x flips."""
        if self.scales == (1.0,) and not self.flip:
            return self._single_scale(image)
        h, w = image.shape[-2:]
        probs = 0.0
        runs = 0
        for s in self.scales:
            size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
            scaled = (
                image
                if size == (h, w)
                else F.interpolate(image, size, mode="bilinear", align_corners=False)
            )
            for flipped in (False, True) if self.flip else (False,):
                x = scaled.flip(-1) if flipped else scaled
                out = self._single_scale(x)
                out = out.flip(-1) if flipped else out
                out = F.interpolate(out, (h, w), mode="bilinear", align_corners=False)
                probs = probs + out.softmax(dim=1)
                runs += 1
        return probs / runs

    def _inference_one(self, item: Dict) -> Dict[str, torch.Tensor]:
        image = (item["image"].to(self.device) - self.pixel_mean) / self.pixel_std
        h, w = image.shape[-2:]
        out = self.inference(image[None])[0]
        height, width = item.get("height", h), item.get("width", w)
        return {"sem_seg": sem_seg_postprocess(out, (h, w), height, width)}
