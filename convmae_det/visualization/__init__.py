"""Pictures of results: fixed palettes, instance / semantic overlays, a predictor for LazyConfig
and yacs configs, pretraining reconstruction grids, training curves and the demo's picture set."""

from .overlay import blend_masks, draw_instances, draw_legend, draw_semantic
from .palette import class_colors, instance_colors
from .predictor import Predictor

__all__ = [
    "Predictor",
    "blend_masks",
    "draw_instances",
    "draw_semantic",
    "draw_legend",
    "class_colors",
    "instance_colors",
    "write_demo_pictures",
]


def write_demo_pictures(demo_dir: str, **kwargs):
    """See :func:`convmae_det.visualization.demo_pictures.write_demo_pictures`."""
    from .demo_pictures import write_demo_pictures as _write

    return _write(demo_dir, **kwargs)
