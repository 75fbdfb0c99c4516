"""Optimizer parameter groups: the one builder (:func:`build_param_groups`), the no-decay tables
and the layer-wise lr decay of ConvViT / ViT backbones."""

from .lr_decay import get_convvit_lr_decay_rate
from .param_groups import (
    NO_DECAY_RULES,
    NO_WEIGHT_DECAY_NAMES,
    NO_WEIGHT_DECAY_OVERRIDES,
    NORM_MODULE_TYPES,
    build_param_groups,
    is_no_weight_decay,
)

__all__ = [
    "NO_DECAY_RULES",
    "NO_WEIGHT_DECAY_NAMES",
    "NO_WEIGHT_DECAY_OVERRIDES",
    "NORM_MODULE_TYPES",
    "build_param_groups",
    "get_convvit_lr_decay_rate",
    "is_no_weight_decay",
]
