"""Instance and semantic overlays: masks blended exactly on their pixels, then outlines, boxes,
class names and scores drawn with detectron2's ``Visualizer``; a class legend for segmentations.

Mask blending is done here (``out = (1 - alpha) * image + alpha * colour`` on the mask pixels and
nowhere else), so an overlay drawn without boxes, outlines or labels differs from the input
exactly where a predicted mask lies.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from detectron2.structures import Instances
from detectron2.utils.visualizer import GenericMask, Visualizer
from PIL import Image, ImageDraw, ImageFont

from .palette import RGB, class_colors, instance_colors

__all__ = [
    "blend_masks",
    "draw_instances",
    "draw_semantic",
    "draw_legend",
    "draw_prediction",
    "COLOR_MODES",
]

COLOR_MODES = ("class", "instance")


def blend_masks(
    image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[RGB], alpha: float = 0.5
) -> np.ndarray:
    """Blend boolean masks (each (H, W)) into an (H, W, 3) uint8 RGB image, in order (later
    masks on top). Pixels outside every mask are returned unchanged."""
    out = image.astype(np.float32).copy()
    for mask, color in zip(masks, colors):
        m = np.asarray(mask, dtype=bool)
        out[m] = (1.0 - alpha) * out[m] + alpha * np.asarray(color, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _normalized(color: RGB) -> np.ndarray:
    return np.asarray(color, dtype=np.float64) / 255.0


def draw_instances(
    image: np.ndarray,
    instances: Instances,
    metadata=None,
    *,
    alpha: float = 0.5,
    color_mode: str = "class",
    draw_boxes: bool = True,
    draw_labels: bool = True,
    draw_outlines: bool = True,
) -> np.ndarray:
    """Overlay predicted instances on an image.

    Args:
        image: (H, W, 3) uint8 RGB, the size the instances refer to.
        instances: with ``pred_boxes``, ``pred_classes``, ``scores`` and optionally ``pred_masks``
            ((N, H, W) bool); already filtered by score.
        metadata: dataset metadata (``thing_classes``, ``thing_colors``).
        alpha: mask opacity in [0, 1].
        color_mode: "class" (fixed colour per class) or "instance" (one colour per instance).
    Returns:
        (H, W, 3) uint8 RGB.
    """
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode={color_mode!r}; expected one of {COLOR_MODES}")
    inst = instances.to("cpu")
    n = len(inst)
    classes = inst.pred_classes.tolist() if inst.has("pred_classes") else [0] * n
    scores = inst.scores.tolist() if inst.has("scores") else [None] * n
    names = list(getattr(metadata, "thing_classes", None) or []) if metadata is not None else []
    if color_mode == "class":
        palette = class_colors(metadata, num_classes=max(classes, default=-1) + 1)
        colors = [palette[c] for c in classes]
    else:
        colors = instance_colors(n)
    # Largest first, so small objects stay visible on top.
    order = list(range(n))
    masks = None
    if inst.has("pred_masks"):
        masks = inst.pred_masks.numpy().astype(bool)
        order = sorted(order, key=lambda i: -int(masks[i].sum()))
    out = image
    if masks is not None:
        out = blend_masks(image, [masks[i] for i in order], [colors[i] for i in order], alpha)
    if not (draw_boxes or draw_labels or draw_outlines) or n == 0:
        return out
    vis = Visualizer(out, metadata, scale=1.0)
    for i in order:
        color = _normalized(colors[i])
        if draw_outlines and masks is not None:
            for poly in GenericMask(masks[i], *masks[i].shape).polygons:
                vis.draw_polygon(poly.reshape(-1, 2), color, edge_color=color, alpha=0.0)
        if draw_boxes and inst.has("pred_boxes"):
            vis.draw_box(inst.pred_boxes.tensor[i].tolist(), edge_color=color, alpha=0.8)
        if draw_labels:
            name = names[classes[i]] if classes[i] < len(names) else str(classes[i])
            text = name if scores[i] is None else f"{name} {scores[i] * 100:.0f}%"
            x0, y0, x1, y1 = inst.pred_boxes.tensor[i].tolist()
            size = max(9, int(0.045 * max(image.shape[:2])))
            vis.draw_text(
                text,
                (x0, max(y0 - size * 1.2, 0)),
                color=np.maximum(color * 0.6, 0) if color.mean() > 0.6 else color,
                horizontal_alignment="left",
                font_size=size,
            )
    return vis.get_output().get_image()


def draw_semantic(
    image: np.ndarray,
    sem_seg: np.ndarray,
    metadata=None,
    *,
    alpha: float = 0.6,
    ignore_value: int = 255,
    legend: bool = True,
) -> np.ndarray:
    """Colour every pixel of ``sem_seg`` ((H, W) class ids) by its class; ``ignore_value`` pixels
    keep the image. With ``legend`` a panel naming the classes present (with their share of the
    pixels) is appended on the right. Returns (H, W [+ legend width], 3) uint8 RGB."""
    sem_seg = np.asarray(sem_seg)
    if sem_seg.shape != image.shape[:2]:
        raise ValueError(f"sem_seg {sem_seg.shape} does not match the image {image.shape[:2]}")
    valid = sem_seg[sem_seg != ignore_value]
    num = int(valid.max()) + 1 if valid.size else 0
    palette = class_colors(metadata, stuff=True, num_classes=num)
    present = [int(c) for c in np.unique(valid)]
    out = blend_masks(image, [sem_seg == c for c in present], [palette[c] for c in present], alpha)
    if not legend:
        return out
    names = list(getattr(metadata, "stuff_classes", None) or []) if metadata is not None else []
    total = max(sem_seg.size, 1)
    entries = [
        (
            f"{names[c] if c < len(names) else c} {100.0 * (sem_seg == c).sum() / total:.0f}%",
            palette[c],
        )
        for c in present
    ]
    panel = draw_legend(entries, height=out.shape[0])
    return np.concatenate([out, panel], axis=1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def draw_legend(
    entries: Sequence[tuple], *, height: int, width: Optional[int] = None, font_size: int = 0
) -> np.ndarray:
    """A white (height, width, 3) uint8 panel listing ``(text, RGB colour)`` entries as coloured
    squares followed by their text; the width fits the longest text when not given."""
    size = font_size or max(10, min(18, height // max(len(entries) + 1, 8)))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max([probe.textlength(t, font=font) for t, _ in entries] or [0])
    width = width or int(size * 2.2 + text_w + 10)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    step = int(size * 1.5)
    for i, (text, color) in enumerate(entries):
        y = 6 + i * step
        if y + size > height:
            break
        draw.rectangle([6, y, 6 + size, y + size], fill=tuple(color), outline=(0, 0, 0))
        draw.text((12 + size, y - 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(panel)


def _upscale_instances(inst: Instances, s: int) -> Instances:
    h, w = inst.image_size
    out = Instances((h * s, w * s))
    for key, value in inst.get_fields().items():
        if key == "pred_boxes":
            value = value.clone()
            value.scale(s, s)
        elif key == "pred_masks":
            value = value.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
        out.set(key, value)
    return out


def draw_prediction(
    image: np.ndarray,
    output: dict,
    metadata=None,
    *,
    confidence_threshold: float = 0.5,
    alpha: float = 0.5,
    color_mode: str = "class",
    scale: int = 1,
    legend: bool = True,
) -> np.ndarray:
    """Draw a model output on its (H, W, 3) uint8 RGB image: ``instances`` (kept when score >=
    ``confidence_threshold``) or ``sem_seg`` ((K, H, W) scores, argmax). ``scale`` (integer)
    enlarges the picture with nearest neighbours before drawing, so text stays sharp."""
    scale = int(scale)
    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
    if "instances" in output:
        inst = output["instances"].to("cpu")
        if inst.has("scores"):
            inst = inst[inst.scores >= confidence_threshold]
        if scale > 1:
            inst = _upscale_instances(inst, scale)
        return draw_instances(image, inst, metadata, alpha=alpha, color_mode=color_mode)
    if "sem_seg" in output:
        seg = output["sem_seg"].argmax(0).cpu().numpy()
        if scale > 1:
            seg = seg.repeat(scale, 0).repeat(scale, 1)
        return draw_semantic(image, seg, metadata, alpha=alpha, legend=legend)
    raise ValueError(
        f"cannot draw a model output with keys {sorted(output)}; expected "
        "'instances' or 'sem_seg'"
    )
