"""The sliding-window grid of segmentation inference (mmseg's ``slide_inference``), shared by
the eager segmenter (:mod:`convmae_det.modeling.segmentor`) and the exported-model runner
(:mod:`convmae_det.deploy.runner`), which must run without the model code."""

from __future__ import annotations

from typing import List, Sequence, Tuple

__all__ = ["sliding_window_boxes"]


def sliding_window_boxes(
    height: int, width: int, crop_size: Tuple[int, int], stride: Tuple[int, int]
) -> List[Box]:
    """Windows ``(y1, y2, x1, x2)`` covering an image, mmseg's ``slide_inference`` grid.

    ``max(H - crop + stride - 1, 0) // stride + 1`` windows per axis, every ``stride`` pixels; a
    window crossing the border is moved back inside, one larger than the image is clipped to it.
    """
    (ch, cw), (sh, sw) = crop_size, stride
    if min(ch, cw, sh, sw) <= 0:
        raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes
