"""Optimizer parameter groups for ConvViT backbones: layer-wise lr decay and no-decay rules."""

from __future__ import annotations

import re
from typing import Dict

__all__ = ["get_convvit_lr_decay_rate", "NO_WEIGHT_DECAY_OVERRIDES", "is_no_weight_decay"]

# Parameters that never get weight decay (besides every norm layer, which detectron2's
# get_default_optimizer_params handles through weight_decay_norm=0.0).
NO_WEIGHT_DECAY_OVERRIDES: Dict[str, Dict[str, float]] = {
    "pos_embed": {"weight_decay": 0.0},
    "relative_position_bias_table": {"weight_decay": 0.0},
    "rel_pos_h": {"weight_decay": 0.0},
    "rel_pos_w": {"weight_decay": 0.0},
    "gamma_1": {"weight_decay": 0.0},
    "gamma_2": {"weight_decay": 0.0},
    "cls_token": {"weight_decay": 0.0},
}

_NO_DECAY = re.compile(
    r"(^|\.)(pos_embed|cls_token|relative_position_bias_table|rel_pos_h|rel_pos_w|gamma_1|gamma_2)$"
)


def is_no_weight_decay(name: str, ndim: int) -> bool:
    """True for 1-D parameters (norms, biases) and position / relative / layer-scale tables."""
    return ndim <= 1 or bool(_NO_DECAY.search(name))


def get_convvit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 11) -> float:
    """Layer-wise lr scale of a parameter of a model with a ConvViT backbone.

    Layer ids: patch embeddings, ``pos_embed``, ``blocks1``, ``blocks2`` -> 0; ``blocks3.i`` -> i + 1;
    everything else (shared relative tables, E4 adaptor, necks and heads) -> num_layers + 1.
    Returns ``lr_decay_rate ** (num_layers + 1 - layer_id)``.

    Works for plain ViT names too (``blocks.i`` -> i + 1, ``patch_embed`` -> 0), so the MAE ViTDet
    baseline uses the same function with ``num_layers=12``.
    """
    layer_id = num_layers + 1
    if name.startswith("backbone") or name.startswith("encoder") or "." not in name:
        if re.search(r"\.?(patch_embed\d?|pos_embed|cls_token|blocks1|blocks2)(\.|$)", name):
            layer_id = 0
        else:
            m = re.search(r"(?:^|\.)blocks3?\.(\d+)\.", name)
            if m:
                layer_id = int(m.group(1)) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)
