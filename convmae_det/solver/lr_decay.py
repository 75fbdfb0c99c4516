"""Layer-wise learning-rate decay of models with a ConvViT (or plain ViT) backbone."""

from __future__ import annotations

import re

__all__ = ["get_convvit_lr_decay_rate"]


def get_convvit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 11) -> float:
    """Layer-wise lr scale of a parameter of a model with a ConvViT backbone.

    Layer ids: patch embeddings, ``pos_embed``, ``blocks1``, ``blocks2`` -> 0; ``blocks3.i`` -> i + 1;
    everything else (shared relative tables, E4 adaptor, necks and heads) -> num_layers + 1.
    Returns ``lr_decay_rate ** (num_layers + 1 - layer_id)``.

    Names are those of a detector / segmenter (``backbone.*``), an encoder (``encoder.*``) or a
    classifier (``net.*``: ``fc_norm`` and ``head`` take the last id, as the official
    ``param_groups_lrd`` of ConvMAE fine-tuning). Works for plain ViT names too (``blocks.i`` -> i + 1, ``patch_embed`` -> 0), so the MAE ViTDet
    baseline uses the same function with ``num_layers=12``.
    """
    layer_id = num_layers + 1
    if name.startswith(("backbone", "encoder", "net.")) or "." not in name:
        if re.search(r"\.?(patch_embed\d?|pos_embed|cls_token|blocks1|blocks2)(\.|$)", name):
            layer_id = 0
        else:
            m = re.search(r"(?:^|\.)blocks3?\.(\d+)\.", name)
            if m:
                layer_id = int(m.group(1)) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)
