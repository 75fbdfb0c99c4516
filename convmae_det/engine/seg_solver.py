"""Optimizer and lr schedule of the segmentation recipe (yacs ``cfg.SOLVER``).

AdamW with layer-wise lr decay over the ConvViT backbone (``get_convvit_lr_decay_rate``: patch
embeddings / pos_embed / conv stages -> layer 0, ``blocks3.i`` -> i + 1, E4 adaptor and heads ->
the top) and no weight decay on 1-D parameters (norms, biases, layer scale) nor on position and
relative-position tables. Schedule "WarmupPolyLR": linear warm-up from ``WARMUP_FACTOR`` then
``(1 - it / max_iter) ** POLY_LR_POWER`` (mmseg ``poly`` with ``min_lr`` 0).

A warm-up longer than half the run (``SOLVER.WARMUP_ITERS > SOLVER.MAX_ITER // 2``, e.g. a short
test run of a recipe with 1500 warm-up iterations) is shortened to ``MAX_ITER // 2`` with a
warning: the warm-up ramps towards the decayed value at its end, so one covering the whole run
would keep the lr at about ``BASE_LR * WARMUP_FACTOR`` (1e-10 for the ADE20K recipe). With half
the run the peak is ``0.5 ** POLY_LR_POWER`` of ``BASE_LR``.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Dict, List

import torch
import torch.nn as nn
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver import build_optimizer as d2_build_optimizer
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from ..solver import build_param_groups, get_convvit_lr_decay_rate

__all__ = [
    "get_layer_decay_param_groups",
    "build_seg_optimizer",
    "build_seg_lr_scheduler",
    "effective_warmup_iters",
]

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def get_layer_decay_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
) -> List[Dict]:
    """Parameter groups of mmseg's layer-decay constructor: ``lr = base_lr * scale`` with the
    layer-wise scale of :func:`~convmae_det.solver.get_convvit_lr_decay_rate`, no weight decay on
    1-D parameters nor on the tables of :data:`~convmae_det.solver.NO_WEIGHT_DECAY_NAMES`.

    Each group carries ``lr_scale`` and ``names`` (for logging and tests). Parameters with the
    same (scale, decay) share a group.
    """
    return build_param_groups(
        _unwrap(model),
        base_lr=base_lr,
        weight_decay=weight_decay,
        no_decay_rule="ndim",
        lr_factor_func=partial(
            get_convvit_lr_decay_rate, lr_decay_rate=layer_decay, num_layers=num_layers
        ),
        with_lr_scale=True,
        with_names=True,
    )


def _num_backbone_layers(model: nn.Module) -> int:
    backbone = getattr(_unwrap(model), "backbone", None)
    depths = getattr(backbone, "depths", None)
    return int(depths[2]) if depths is not None else 11


def build_seg_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` "AdamW" (layer decay, see module doc) or "SGD" (detectron2's)."""
    s = cfg.SOLVER
    name = s.OPTIMIZER.lower()
    if name == "sgd":
        return d2_build_optimizer(cfg, _unwrap(model))
    if name != "adamw":
        raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r}; expected 'AdamW' or 'SGD'")
    groups = get_layer_decay_param_groups(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        layer_decay=s.LAYER_DECAY,
        num_layers=_num_backbone_layers(model),
    )
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=s.BASE_LR, betas=tuple(s.BETAS))


def effective_warmup_iters(warmup_iters: int, max_iter: int) -> int:
    """The warm-up length used for a run of ``max_iter`` iterations: ``warmup_iters``, at most
    ``max_iter // 2`` (see the module doc)."""
    return max(0, min(int(warmup_iters), int(max_iter) // 2))


def build_seg_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """ "WarmupPolyLR" (see module doc) or any detectron2 scheduler name; a warm-up longer than
    half of ``SOLVER.MAX_ITER`` is shortened to it, with a warning naming both keys."""
    s = cfg.SOLVER
    warmup_iters = effective_warmup_iters(s.WARMUP_ITERS, s.MAX_ITER)
    if warmup_iters < s.WARMUP_ITERS:
        logger.warning(
            f"SOLVER.WARMUP_ITERS={s.WARMUP_ITERS} is more than half of SOLVER.MAX_ITER="
            f"{s.MAX_ITER}: the warm-up is shortened to {warmup_iters} iterations (a warm-up over "
            "the whole run would keep the lr near BASE_LR * WARMUP_FACTOR)"
        )
    if s.LR_SCHEDULER_NAME != "WarmupPolyLR":
        if warmup_iters < s.WARMUP_ITERS:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.WARMUP_ITERS = warmup_iters
        return d2_build_lr_scheduler(cfg, optimizer)
    sched = PolynomialDecayParamScheduler(1.0, s.POLY_LR_POWER)
    warmup = warmup_iters / max(s.MAX_ITER, 1)
    if warmup > 0:
        sched = WarmupParamScheduler(sched, s.WARMUP_FACTOR, warmup, s.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)
