"""Evaluation helpers: the COCO evaluation backend."""

from .coco_backend import (
    COCOEVAL_BACKENDS,
    cocoeval_backend,
    detectron2_cocoeval,
    evaluate_predictions_on_coco,
    make_cocoeval,
    use_fast_cocoeval,
)

__all__ = [
    "COCOEVAL_BACKENDS",
    "cocoeval_backend",
    "detectron2_cocoeval",
    "evaluate_predictions_on_coco",
    "make_cocoeval",
    "use_fast_cocoeval",
]
