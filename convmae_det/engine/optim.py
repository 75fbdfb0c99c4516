"""Optimizer parameter groups of the detection recipes (LazyConfig ``optimizer.params``).

ViTDet / detectron2 style: no weight decay on the parameters of normalisation layers (every kind,
detectron2's own ``LayerNorm`` included, which upstream misses) nor on the position / relative
position / layer-scale tables of :data:`convmae_det.solver.NO_WEIGHT_DECAY_NAMES`; biases ARE
decayed; optional layer-wise lr factors. Built by :func:`convmae_det.solver.build_param_groups`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn

from ..solver import NO_WEIGHT_DECAY_NAMES, NORM_MODULE_TYPES, build_param_groups

__all__ = ["NORM_MODULE_TYPES", "get_param_groups"]


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
            ``pos_embed``), replacing the default table (no weight decay on
            :data:`~convmae_det.solver.NO_WEIGHT_DECAY_NAMES`). Pass ``{}`` for none.
    Returns:
        merged groups ``[{"params": [...], "lr": ..., "weight_decay": ...}, ...]``.
    """
    return build_param_groups(
        model,
        base_lr=base_lr,
        weight_decay=weight_decay,
        no_decay_rule="none" if weight_decay_norm is None else "norm",
        exempt_weight_decay=0.0 if weight_decay_norm is None else weight_decay_norm,
        no_decay_names=NO_WEIGHT_DECAY_NAMES if overrides is None else (),
        lr_factor_func=lr_factor_func,
        overrides=overrides,
    )
