"""Optimizer parameter groups for detectors and segmenters with ConvViT / ViT backbones.

Like detectron2's ``get_default_optimizer_params`` (layer-wise lr factors, per-name overrides),
but every normalisation layer counts as a norm, including detectron2's own ``LayerNorm`` (used by
``norm="LN"`` in SimpleFeaturePyramid and the ViTDet heads), which upstream misses, and the
position / relative-position tables of :data:`convmae_det.solver.NO_WEIGHT_DECAY_OVERRIDES` get no
weight decay by default.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from detectron2.solver.build import reduce_param_groups

from ..solver import NO_WEIGHT_DECAY_OVERRIDES

__all__ = ["NORM_MODULE_TYPES", "get_param_groups"]

NORM_MODULE_TYPES = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm*, SyncBatchNorm, NaiveSyncBatchNorm
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    D2LayerNorm,
)


def get_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = 0.0,
    lr_factor_func: Optional[Callable[[str], float]] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
) -> List[Dict[str, Any]]:
    """Parameter groups for ``torch.optim`` with layer-wise lr and no-decay rules.

    Args:
        model: the model (frozen parameters are skipped, shared ones counted once).
        base_lr, weight_decay: defaults of every group.
        weight_decay_norm: weight decay of parameters of normalisation layers (None: no change).
        lr_factor_func: maps a full parameter name (``backbone.bottom_up.blocks3.4.attn.qkv.weight``)
            to an lr multiplier, e.g. ``partial(get_convvit_lr_decay_rate, lr_decay_rate=0.8)``.
        overrides: hyper-parameters by the parameter's own name (last name component, e.g.
            ``pos_embed``); default :data:`NO_WEIGHT_DECAY_OVERRIDES`. Pass ``{}`` for none.
    Returns:
        merged groups ``[{"params": [...], "lr": ..., "weight_decay": ...}, ...]``.
    """
    overrides = NO_WEIGHT_DECAY_OVERRIDES if overrides is None else overrides
    groups: List[Dict[str, Any]] = []
    seen: set = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            hyper = {"lr": base_lr, "weight_decay": weight_decay}
            if weight_decay_norm is not None and isinstance(module, NORM_MODULE_TYPES):
                hyper["weight_decay"] = weight_decay_norm
            if lr_factor_func is not None:
                full = f"{module_name}.{param_name}" if module_name else param_name
                hyper["lr"] = base_lr * lr_factor_func(full)
            hyper.update(copy.copy(dict(overrides.get(param_name, {}))))
            groups.append({"params": [param], **hyper})
    if not groups:
        raise ValueError("get_param_groups: the model has no trainable parameters")
    return reduce_param_groups(groups)
