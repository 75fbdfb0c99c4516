"""Fixed, reproducible colours per class (COCO, ADE20K, the toy datasets) and per instance.

Colours never depend on a random generator: the same class gets the same colour in every run and
every figure. COCO uses detectron2's builtin category colours, ADE20K the palette registered with
the ADE20K datasets, the toy datasets the colours their registration sets.
"""

from __future__ import annotations

import colorsys
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "RGB",
    "coco_thing_colors",
    "ade20k_colors",
    "toy_coco_colors",
    "toy_ade20k_colors",
    "class_colors",
    "instance_colors",
]

RGB = Tuple[int, int, int]


def _as_rgb(colors: Sequence[Sequence[int]]) -> List[RGB]:
    return [tuple(int(v) for v in c[:3]) for c in colors]  # type: ignore[misc]


def coco_thing_colors() -> List[RGB]:
    """The 80 COCO thing colours of detectron2's ``COCO_CATEGORIES``, in contiguous-id order."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return _as_rgb([c["color"] for c in COCO_CATEGORIES if c["isthing"] == 1])


def ade20k_colors() -> List[RGB]:
    """The 150 ADE20K colours registered with ``ade20k_sem_seg_*`` (one palette for the project)."""
    from ..data.datasets.ade20k import ADE20K_PALETTE

    return _as_rgb(ADE20K_PALETTE)


def toy_coco_colors() -> List[RGB]:
    """Colours of the toy shapes (circle, triangle, square, star, cross)."""
    from ..data.datasets.toy_coco import TOY_COLORS

    return _as_rgb(TOY_COLORS)


def toy_ade20k_colors() -> List[RGB]:
    """Colours of the toy ADE20K classes: the first ADE20K palette entries, as registered."""
    from ..data.toy_ade20k import TOY_ADE20K_CLASSES

    return ade20k_colors()[: len(TOY_ADE20K_CLASSES)]


def _fallback_colors(num: int) -> List[RGB]:
    """``num`` distinct colours from the ADE20K-style bit-interleaved colour map."""
    from ..data.datasets.ade20k import label_palette

    return _as_rgb(label_palette(num))


def class_colors(metadata, *, stuff: bool = False, num_classes: Optional[int] = None) -> List[RGB]:
    """One RGB colour per class of a dataset's metadata.

    Uses ``metadata.thing_colors`` (instances) or ``metadata.stuff_colors`` (``stuff=True``) when
    registered; else the COCO / ADE20K palette when the class list matches theirs; else a
    deterministic colour map. Always returns at least ``num_classes`` colours when given.
    """
    key = "stuff" if stuff else "thing"
    names = list(getattr(metadata, f"{key}_classes", None) or []) if metadata is not None else []
    colors: List[RGB] = []
    registered = getattr(metadata, f"{key}_colors", None) if metadata is not None else None
    if registered:
        colors = _as_rgb(registered)
    elif names and len(names) == 80 and not stuff:
        colors = coco_thing_colors()
    elif names and len(names) == 150:
        colors = ade20k_colors()
    n = max(len(names), num_classes or 0, len(colors))
    if len(colors) < n:
        colors = colors + _fallback_colors(n)[len(colors) :]
    return colors


def instance_colors(num: int) -> List[RGB]:
    """``num`` well separated colours for instance-coloured masks (golden-ratio hue steps);
    instance ``i`` always gets the same colour."""
    out = []
    for i in range(num):
        h = (0.07 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out
