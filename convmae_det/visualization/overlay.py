"""Instance and semantic overlays, and the top classes of a classifier: masks blended exactly on their pixels, then outlines, boxes,
class names and scores drawn with detectron2's ``Visualizer``; a class legend for segmentations.

Mask blending is done here (``out = (1 - alpha) * image + alpha * colour`` on the mask pixels and
nowhere else), so an overlay drawn without boxes, outlines or labels differs from the input
exactly where a predicted mask lies. The legend shows each class in the colour it has on the
overlay: its colour blended with ``alpha`` over the mean of the image pixels it covers.

Labels follow ``Visualizer.overlay_instances``: at the box corner, below (or beside) small boxes,
font size growing with the box height, a lighter shade of the instance colour. They are placed in
score order, kept inside the picture, and a label that would cover one already placed tries the
other corners of its box and is left out when none is free, so a low threshold gives fewer
labels rather than an unreadable stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from detectron2.structures import Instances
from detectron2.utils.visualizer import _SMALL_OBJECT_AREA_THRESH, GenericMask, Visualizer
from PIL import Image, ImageDraw, ImageFont

from .palette import RGB, class_colors, instance_colors

__all__ = [
    "blend_masks",
    "draw_instances",
    "draw_instances_with_labels",
    "draw_semantic",
    "draw_classification",
    "top_classes",
    "class_label",
    "draw_legend",
    "draw_prediction",
    "legend_colors",
    "PlacedLabel",
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


@dataclass
class PlacedLabel:
    """A label drawn on an instance overlay.

    Attributes:
        instance: index of the instance in the ``Instances`` drawn.
        text: "name 87%".
        position: the text anchor (x, y) in pixels.
        extent: (x0, y0, x1, y1) of the drawn text in pixels.
        font_size: in points, as ``Visualizer.draw_text`` takes it.
    """

    instance: int
    text: str
    position: Tuple[float, float]
    extent: Tuple[float, float, float, float]
    font_size: float


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 0 and min(a[3], b[3]) - max(a[1], b[1]) > 0


def _label_candidates(
    box: Sequence[float], height: int, scale: float
) -> List[Tuple[Tuple[float, float], str]]:
    """Anchors (position, horizontal alignment) for a box's label: ``overlay_instances``' choice
    first (top-left corner; under the box, or beside it at the bottom edge, for small boxes),
    then the other corners."""
    x0, y0, x1, y1 = box
    first = ((x0, y0), "left")
    if (y1 - y0) * (x1 - x0) < _SMALL_OBJECT_AREA_THRESH * scale or y1 - y0 < 40 * scale:
        first = ((x1, y0), "left") if y1 >= height - 5 else ((x0, y1), "left")
    others = [((x0, y0), "left"), ((x1, y0), "right"), ((x0, y1), "left"), ((x1, y1), "right")]
    return [first] + [c for c in others if c != first]


def _text_extent(vis: Visualizer, text_artist, renderer) -> Tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in image pixels of a drawn text (its dark background included)."""
    patch = text_artist.get_bbox_patch()
    if patch is not None:
        text_artist.update_bbox_position_size(renderer)
        bb = patch.get_window_extent(renderer)
    else:
        bb = text_artist.get_window_extent(renderer)
    inv = vis.output.ax.transData.inverted()
    (ax0, ay0), (ax1, ay1) = inv.transform([[bb.x0, bb.y0], [bb.x1, bb.y1]])
    xs, ys = sorted((float(ax0), float(ax1))), sorted((float(ay0), float(ay1)))
    return (xs[0], ys[0], xs[1], ys[1])


def _place_labels(
    vis: Visualizer,
    boxes: np.ndarray,
    texts: Sequence[str],
    colors: Sequence[np.ndarray],
    order: Sequence[int],
) -> List[PlacedLabel]:
    """Draw ``texts[i]`` for ``i`` in ``order`` with ``Visualizer.draw_text`` at the first free
    anchor of :func:`_label_candidates`, shifted inside the picture; skip a label when no anchor
    is free. Returns the labels drawn."""
    out = vis.output
    h, w = out.height, out.width
    renderer = out.canvas.get_renderer()
    placed: List[PlacedLabel] = []
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        height_ratio = (y1 - y0) / np.sqrt(h * w)
        size = float(np.clip((height_ratio - 0.02) / 0.08 + 1, 1.2, 2) * 0.5)
        size *= vis._default_font_size
        color = vis._change_color_brightness(colors[i], brightness_factor=0.7)
        for (x, y), align in _label_candidates((x0, y0, x1, y1), h, out.scale):
            vis.draw_text(texts[i], (x, y), color=color, horizontal_alignment=align, font_size=size)
            artist = out.ax.texts[-1]
            ext = _text_extent(vis, artist, renderer)
            dx = max(0.0, -ext[0]) - max(0.0, ext[2] - w)  # keep it inside the picture
            dy = max(0.0, -ext[1]) - max(0.0, ext[3] - h)
            if dx or dy:
                x, y = x + dx, y + dy
                artist.set_position((x, y))
                ext = (ext[0] + dx, ext[1] + dy, ext[2] + dx, ext[3] + dy)
            if not any(_overlap(ext, p.extent) for p in placed):
                placed.append(PlacedLabel(i, texts[i], (x, y), ext, size))
                break
            artist.remove()
    return placed


def draw_instances_with_labels(
    image: np.ndarray,
    instances: Instances,
    metadata=None,
    *,
    alpha: float = 0.5,
    color_mode: str = "class",
    draw_boxes: bool = True,
    draw_labels: bool = True,
    draw_outlines: bool = True,
) -> Tuple[np.ndarray, List[PlacedLabel]]:
    """:func:`draw_instances`, also returning the labels drawn (:class:`PlacedLabel`, highest
    score first)."""
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
        return out, []
    vis = Visualizer(out, metadata, scale=1.0)
    normalized = [_normalized(c) for c in colors]
    for i in order:
        color = normalized[i]
        if draw_outlines and masks is not None:
            for poly in GenericMask(masks[i], *masks[i].shape).polygons:
                vis.draw_polygon(poly.reshape(-1, 2), color, edge_color=color, alpha=0.0)
        if draw_boxes and inst.has("pred_boxes"):
            vis.draw_box(inst.pred_boxes.tensor[i].tolist(), edge_color=color, alpha=0.8)
    placed: List[PlacedLabel] = []
    if draw_labels and inst.has("pred_boxes"):
        texts = []
        for i in range(n):
            name = names[classes[i]] if classes[i] < len(names) else str(classes[i])
            texts.append(name if scores[i] is None else f"{name} {scores[i] * 100:.0f}%")
        by_score = sorted(range(n), key=lambda i: -(scores[i] or 0.0))
        placed = _place_labels(vis, inst.pred_boxes.tensor.numpy(), texts, normalized, by_score)
    return vis.get_output().get_image(), placed


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
        (H, W, 3) uint8 RGB. Labels are placed as described in the module docstring.
    """
    return draw_instances_with_labels(
        image,
        instances,
        metadata,
        alpha=alpha,
        color_mode=color_mode,
        draw_boxes=draw_boxes,
        draw_labels=draw_labels,
        draw_outlines=draw_outlines,
    )[0]


def legend_colors(
    image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[RGB], alpha: float
) -> List[RGB]:
    """The colour each mask has on the overlay of :func:`blend_masks`: its colour blended with
    ``alpha`` over the mean of the image pixels it covers (exactly the overlay colour on a uniform
    background; the mean overlay colour of the region otherwise, to rounding)."""
    out: List[RGB] = []
    pixels = image.reshape(-1, image.shape[-1]).astype(np.float64)
    for mask, color in zip(masks, colors):
        m = np.asarray(mask, dtype=bool).reshape(-1)
        under = pixels[m].mean(0) if m.any() else np.full(3, 255.0)
        seen = (1.0 - alpha) * under + alpha * np.asarray(color, dtype=np.float64)
        out.append(tuple(int(v) for v in np.clip(np.rint(seen), 0, 255)))  # type: ignore[misc]
    return out


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
    pixels) in the colours they have on the overlay (:func:`legend_colors`) is appended on the
    right. Returns (H, W [+ legend width], 3) uint8 RGB."""
    sem_seg = np.asarray(sem_seg)
    if sem_seg.shape != image.shape[:2]:
        raise ValueError(f"sem_seg {sem_seg.shape} does not match the image {image.shape[:2]}")
    valid = sem_seg[sem_seg != ignore_value]
    num = int(valid.max()) + 1 if valid.size else 0
    palette = class_colors(metadata, stuff=True, num_classes=num)
    present = [int(c) for c in np.unique(valid)]
    masks = [sem_seg == c for c in present]
    out = blend_masks(image, masks, [palette[c] for c in present], alpha)
    if not legend:
        return out
    names = list(getattr(metadata, "stuff_classes", None) or []) if metadata is not None else []
    total = max(sem_seg.size, 1)
    seen = legend_colors(image, masks, [palette[c] for c in present], alpha)
    entries = [
        (f"{names[c] if c < len(names) else c} {100.0 * m.sum() / total:.0f}%", color)
        for c, m, color in zip(present, masks, seen)
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


def top_classes(scores, k: int = 5) -> List[Tuple[int, float]]:
    """The ``k`` most probable ``(class id, probability)`` of a classifier's (K,) ``scores``."""
    import torch

    scores = torch.as_tensor(scores).float().cpu()
    values, ids = scores.topk(min(int(k), scores.numel()))
    return [(int(i), float(v)) for i, v in zip(ids, values)]


def class_label(class_id: int, metadata=None) -> str:
    """The name of ``class_id`` in ``metadata.classes`` (classifiers) or ``thing_classes``, else
    its number."""
    names = getattr(metadata, "classes", None) or getattr(metadata, "thing_classes", None)
    names = list(names or [])
    return names[class_id] if 0 <= class_id < len(names) else str(class_id)


def draw_classification(image: np.ndarray, scores, metadata=None, *, topk: int = 5) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image with a panel on its right listing the ``topk`` classes of
    ``scores`` ((K,) probabilities), most probable first, as "name 91.2%" in class colours."""
    colors = class_colors(metadata, num_classes=len(scores))
    entries = [
        (f"{class_label(c, metadata)} {100.0 * p:.1f}%", colors[c % len(colors)])
        for c, p in top_classes(scores, topk)
    ]
    height = max(image.shape[0], 8 + 27 * len(entries))
    if height > image.shape[0]:  # a small image: pad it below so the panel fits
        pad = np.full((height - image.shape[0],) + image.shape[1:], 255, dtype=image.dtype)
        image = np.concatenate([image, pad], axis=0)
    panel = draw_legend(entries, height=height, font_size=18)
    return np.concatenate([image, panel], axis=1)


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
    if "pred_class" in output and "scores" in output:
        return draw_classification(image, output["scores"], metadata)
    if "sem_seg" in output:
        seg = output["sem_seg"].argmax(0).cpu().numpy()
        if scale > 1:
            seg = seg.repeat(scale, 0).repeat(scale, 1)
        return draw_semantic(image, seg, metadata, alpha=alpha, legend=legend)
    raise ValueError(
        f"cannot draw a model output with keys {sorted(output)}; expected "
        "'instances', 'sem_seg' or a classifier's 'scores' / 'pred_class'"
    )
