"""What a benchmark runs: built-in backbone presets, models from config files, synthetic inputs
and one step function per mode.

Modes:
    ``backbone``        backbone forward, eval mode, no grad (B, 3, H, W) -> features;
    ``backbone_train``  backbone forward + backward of a scalar made from every output, train mode,
                        no optimizer step;
    ``train``           full detectron2 model: losses on synthetic instances (or label maps for a
                        semantic segmentor), backward, AdamW step;
    ``inference``       full detectron2 model in eval mode, post-processing included (boxes and
                        masks pasted at the input resolution);
    ``pretrain``        pretraining model: masked-reconstruction loss, backward, AdamW step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..fast_paths import FastPaths, autocast
from ..modeling.det_backbone import PAPER_DET_WINDOW_BLOCKS, VITDET_WINDOW_BLOCKS

__all__ = [
    "BenchmarkSetupError",
    "MODES",
    "BACKBONE_PRESETS",
    "PRETRAIN_PRESETS",
    "DEFAULT_SIZES",
    "build_preset",
    "synthetic_detection_batch",
    "synthetic_classification_batch",
    "make_step",
]

MODES = ("backbone", "backbone_train", "train", "inference", "pretrain")


class BenchmarkSetupError(ValueError):
    """Benchmark settings that cannot run (the message names the setting and what was expected)."""


_TOY = dict(embed_dims=(32, 48, 64), depths=(1, 1, 3), num_heads=4)

# Encoder layouts of SPEC section 4 (Base) and two CPU-sized toys with the same structure.
BACKBONE_PRESETS: Dict[str, Dict[str, Any]] = {
    # paper / multi-scale detector: shared BEiT tables, window 16, global 0, 3, 6, 10, frozen abs pos
    "convvitdet_b": dict(
        rel_pos="shared",
        window_size=16,
        window_block_indexes=list(PAPER_DET_WINDOW_BLOCKS),
        pos_embed_hw=(64, 64),
        rel_pos_hw=(64, 64),
        pos_embed_trainable=False,
        drop_path_rate=0.1,
    ),
    # ViTDet-style detector: decomposed rel-pos per block, window 14, global 1, 4, 7, 10
    "convmae_vitdet_b": dict(
        rel_pos="decomposed",
        window_size=14,
        window_block_indexes=list(VITDET_WINDOW_BLOCKS),
        rel_pos_hw=(64, 64),
        conv_norm_eps=1e-6,
        drop_path_rate=0.1,
    ),
    # plain ConvViT-B, global attention everywhere (pretraining / classification encoder)
    "convvit_b": dict(pos_embed_hw=(14, 14)),
    "toy": dict(
        _TOY,
        rel_pos="shared",
        window_size=4,
        window_block_indexes=[1],
        pos_embed_hw=(8, 8),
        rel_pos_hw=(8, 8),
    ),
    "toy_vitdet": dict(
        _TOY,
        rel_pos="decomposed",
        window_size=4,
        window_block_indexes=[0, 2],
        rel_pos_hw=(8, 8),
        conv_norm_eps=1e-6,
    ),
    # detectron2's own ViTDet ViT-B backbone (single-scale net, MAE layout), as the reference
    "vitdet_b": dict(_detectron2_vit=True),
}

PRETRAIN_PRESETS = ("convmae_b", "fastconvmae_b", "convmae_toy", "fastconvmae_toy")

DEFAULT_SIZES: Dict[str, Tuple[int, int]] = {
    "toy": (128, 128),
    "toy_vitdet": (128, 128),
    "convmae_toy": (64, 64),
    "fastconvmae_toy": (64, 64),
    "convmae_b": (224, 224),
    "fastconvmae_b": (224, 224),
    "convvit_b": (224, 224),
}


def _detectron2_vitdet_b() -> nn.Module:
    """detectron2's ViT-B of its ViTDet model-zoo config (``common/models/mask_rcnn_vitdet.py``),
    taken from the config rather than re-spelled."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    return instantiate(model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model.backbone.net)


def build_preset(name: str) -> nn.Module:
    """A backbone preset (ConvViT encoder, or detectron2's ViT for ``vitdet_b``) or a pretraining
    model (``convmae_b``, ``fastconvmae_b``, ``*_toy``)."""
    if name in BACKBONE_PRESETS:
        kwargs = dict(BACKBONE_PRESETS[name])
        if kwargs.pop("_detectron2_vit", False):
            return _detectron2_vitdet_b()
        from ..modeling.convvit import ConvViT

        return ConvViT(**kwargs)
    if name in PRETRAIN_PRESETS:
        try:
            from ..modeling.pretrain import build_pretrain_model
        except ImportError as exc:
            raise BenchmarkSetupError(
                f"preset {name!r} needs convmae_det.modeling.pretrain.build_pretrain_model, "
                f"which is not available in this installation ({exc})"
            ) from None
        return build_pretrain_model(name)
    known = sorted(BACKBONE_PRESETS) + list(PRETRAIN_PRESETS)
    raise KeyError(f"unknown preset {name!r}; expected one of {known}")


# ------------------------------------------------------------------------------ synthetic data
def _ellipse_polygon(box: torch.Tensor, points: int = 12) -> List[float]:
    x0, y0, x1, y1 = box.tolist()
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    out: List[float] = []
    for k in range(points):
        t = 2 * math.pi * k / points
        out += [cx + rx * math.cos(t), cy + ry * math.sin(t)]
    return out


def _ellipse_bitmasks(boxes: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    ys = torch.arange(hw[0], dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(hw[1], dtype=torch.float32)[None, :] + 0.5
    masks = []
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
        masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0)
    return torch.stack(masks) if masks else torch.zeros(0, *hw, dtype=torch.bool)


def synthetic_detection_batch(
    batch_size: int,
    image_size: Tuple[int, int],
    *,
    num_instances: int = 8,
    num_classes: int = 80,
    mask_format: str = "polygon",
    with_instances: bool = True,
    sem_seg_classes: Optional[int] = None,
    ignore_value: int = 255,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """detectron2 ``batched_inputs`` without a dataset: uint8 (3, H, W) images and, for training,
    ``Instances`` with ``gt_boxes`` (XYXY, 5-50% of each side), ``gt_classes`` and elliptic
    ``gt_masks`` as ``PolygonMasks`` or ``BitMasks`` (``mask_format``: "polygon" / "bitmask"),
    and/or a ``sem_seg`` (H, W) int64 label map with ``sem_seg_classes`` classes (about 5% of the
    pixels ``ignore_value``)."""
    from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

    if mask_format not in ("polygon", "bitmask"):
        raise BenchmarkSetupError(f"mask_format={mask_format!r}; expected 'polygon' or 'bitmask'")
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        item: Dict[str, Any] = {"image": image.to(device), "height": h, "width": w}
        if with_instances:
            n = num_instances
            size = torch.rand(n, 2, generator=gen) * 0.45 + 0.05
            size = size * torch.tensor([w, h])
            corner = torch.rand(n, 2, generator=gen) * (torch.tensor([w, h]) - size)
            boxes = torch.cat([corner, corner + size], dim=1)
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.randint(0, num_classes, (n,), generator=gen)
            if mask_format == "polygon":
                inst.gt_masks = PolygonMasks([[_ellipse_polygon(b)] for b in boxes])
            else:
                inst.gt_masks = BitMasks(_ellipse_bitmasks(boxes, (h, w)))
            item["instances"] = inst.to(device)
        if sem_seg_classes is not None:
            labels = torch.randint(0, sem_seg_classes, (h, w), generator=gen)
            labels[torch.rand(h, w, generator=gen) < 0.05] = ignore_value
            item["sem_seg"] = labels.to(device)
        batch.append(item)
    return batch


# ------------------------------------------------------------------------------ step functions
def _scalar_from(outputs: Any) -> torch.Tensor:
    """A scalar that depends on every floating tensor in ``outputs`` (dict / list / tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().mean()
    values = outputs.values() if isinstance(outputs, dict) else outputs
    terms = [_scalar_from(v) for v in values if isinstance(v, (torch.Tensor, dict, list, tuple))]
    if not terms:
        raise TypeError(f"cannot make a loss from backbone outputs of type {type(outputs)}")
    return torch.stack(terms).sum()


def _loss_from(outputs: Any) -> torch.Tensor:
    """The training loss of a model's outputs: ``outputs["loss"]``, else the sum of every
    ``loss*`` entry (detectron2 loss dicts), else the tensor itself / the first element."""
    if isinstance(outputs, dict):
        if "loss" in outputs:
            return outputs["loss"]
        losses = [v for k, v in outputs.items() if k.startswith("loss")]
        if not losses:
            raise TypeError(f"model returned a dict without losses: keys {sorted(outputs)}")
        return sum(losses)
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def _optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs: Dict[str, Any] = dict(lr=1e-4, weight_decay=0.05)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def _force_full_detections(model: nn.Module) -> None:
    """Keep every candidate detection (score threshold 0), so post-processing pastes the usual
    ``test_topk_per_image`` masks even with untrained weights."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None and hasattr(predictor, "test_score_thresh"):
        predictor.test_score_thresh = 0.0


def make_step(
    model: nn.Module,
    mode: str,
    *,
    batch_size: int,
    image_size: Tuple[int, int],
    paths: FastPaths,
    device: torch.device,
    num_instances: int = 8,
    mask_format: str = "polygon",
    full_detections: bool = True,
) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    """Prepare ``model`` (mode, device) and inputs; returns ``(step, info)`` where ``step()`` runs
    one iteration and ``info`` collects facts about the run (e.g. detections per image)."""
    if mode not in MODES:
        raise BenchmarkSetupError(f"mode={mode!r}; expected one of {MODES}")
    info: Dict[str, Any] = {}
    h, w = image_size
    fmt = torch.channels_last if paths.channels_last else torch.contiguous_format

    if mode in ("backbone", "backbone_train", "pretrain"):
        x = torch.randn(batch_size, 3, h, w, device=device).contiguous(memory_format=fmt)
        if mode == "backbone":
            model.eval()

            def step() -> Any:
                with torch.no_grad(), autocast(device, paths.dtype):
                    return model(x)

            return step, info
        model.train()
        opt = _optimizer(model, device) if mode == "pretrain" else None

        def step() -> Any:
            with autocast(device, paths.dtype):
                out = model(x)
                loss = _loss_from(out) if opt is not None else _scalar_from(out)
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            return loss

        return step, info

    classifier_classes = _classifier_classes(model)
    if classifier_classes is not None:
        if mode == "train" and getattr(model, "mixup", None) is not None and batch_size % 2:
            raise BenchmarkSetupError(
                f"--batch-size {batch_size}: the classifier trains with mixup / cutmix, which "
                "pairs the images of a batch; give an even batch size"
            )
        batch = synthetic_classification_batch(
            batch_size, image_size, num_classes=classifier_classes, device=device
        )
    else:
        batch = _detection_or_segmentation_batch(
            model, mode, batch_size, image_size, num_instances, mask_format, device
        )
    if mode == "inference":
        model.eval()
        if full_detections:
            _force_full_detections(model)

        def step() -> Any:
            with torch.no_grad(), autocast(device, paths.dtype):
                out = model(batch)
            dets = [len(o["instances"]) for o in out if "instances" in o]
            if dets:
                info["detections_per_img"] = sum(dets) / len(dets)
            return out

        return step, info

    from detectron2.utils.events import EventStorage

    model.train()
    opt = _optimizer(model, device)

    def step() -> Any:
        with EventStorage(0), autocast(device, paths.dtype):
            losses = model(batch)
        loss = sum(v.float() for v in losses.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, info


def _classifier_classes(model: nn.Module) -> Optional[int]:
    """Classes of an image classifier (``net.num_classes`` of an ``ImageClassifier``), else None."""
    net = getattr(model, "net", None)
    if hasattr(model, "criterion") and net is not None:
        return getattr(net, "num_classes", None)
    return None


def synthetic_classification_batch(
    batch_size: int, image_size: Tuple[int, int], *, num_classes: int, device: torch.device
) -> List[Dict[str, Any]]:
    """A classifier's ``batched_inputs`` without a dataset: normalised float (3, H, W) images
    (what the classification mapper gives) and labels ``i % num_classes``."""
    h, w = image_size
    gen = torch.Generator().manual_seed(0)
    return [
        {"image": torch.randn(3, h, w, generator=gen).to(device), "label": i % num_classes}
        for i in range(batch_size)
    ]


def _detection_or_segmentation_batch(
    model: nn.Module,
    mode: str,
    batch_size: int,
    image_size: Tuple[int, int],
    num_instances: int,
    mask_format: str,
    device: torch.device,
) -> List[Dict[str, Any]]:
    num_classes = getattr(getattr(model, "roi_heads", None), "num_classes", 80)
    seg_head = getattr(model, "sem_seg_head", None)  # semantic segmentors train on label maps
    return synthetic_detection_batch(
        batch_size,
        image_size,
        num_instances=num_instances,
        num_classes=num_classes,
        mask_format=mask_format,
        with_instances=mode == "train" and seg_head is None,
        sem_seg_classes=seg_head.num_classes if mode == "train" and seg_head is not None else None,
        ignore_value=getattr(seg_head, "ignore_value", 255),
        device=device,
    )
