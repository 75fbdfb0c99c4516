"""Evaluation helpers: the COCO evaluation backend and the classification evaluator."""

from .classification import ClassificationEvaluator
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
    "ClassificationEvaluator",
    "cocoeval_backend",
    "detectron2_cocoeval",
    "evaluate_predictions_on_coco",
    "make_cocoeval",
    "use_fast_cocoeval",
]
