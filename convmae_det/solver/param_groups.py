"""The one builder of optimizer parameter groups, and the no-decay tables it reads.

Every recipe of the project calls :func:`build_param_groups` and states its rules there, as
keyword arguments:

* detection, ViTDet / detectron2 style (:func:`convmae_det.engine.optim.get_param_groups`):
  ``no_decay_rule="norm"`` (parameters of normalisation layers get no weight decay, biases of
  linear and conv layers do), the named tables, layer-wise lr through ``lr_factor_func`` (e.g.
  :func:`~convmae_det.solver.get_convvit_lr_decay_rate`, the analogue of ViTDet's
  ``get_vit_lr_decay_rate``).
* segmentation, mmseg's layer-decay constructor
  (:func:`convmae_det.engine.seg_solver.get_layer_decay_param_groups`): ``no_decay_rule="ndim"``
  (no decay on 1-D parameters: norms, biases, layer scale), the named tables, layer decay, groups
  carrying ``lr_scale`` and ``names``.
* pretraining, MAE's ``param_groups_weight_decay``
  (:func:`convmae_det.engine.pretrain_loop.pretrain_param_groups`): ``no_decay_rule="ndim"``, no
  named tables, groups ``[no_decay, decay]``.

Groups are merged as detectron2's ``reduce_param_groups`` merges them: parameters with equal
hyper-parameters share a group, groups come in the order of their first parameter and parameters
in the order of ``model.named_parameters()``. That order is what an optimizer checkpoint is
matched against on resume, so it must not change (``tests/test_param_groups.py`` pins it for
every shipped config).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Tuple

import torch.nn as nn
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm

__all__ = [
    "NO_WEIGHT_DECAY_NAMES",
    "NO_WEIGHT_DECAY_OVERRIDES",
    "NORM_MODULE_TYPES",
    "NO_DECAY_RULES",
    "is_no_weight_decay",
    "build_param_groups",
]

# Parameters that never get weight decay, by their own name (the last component of the full name):
# absolute / relative position tables, class token, layer scale. The one list of the project.
NO_WEIGHT_DECAY_NAMES: Tuple[str, ...] = (
    "pos_embed",
    "relative_position_bias_table",
    "rel_pos_h",
    "rel_pos_w",
    "gamma_1",
    "gamma_2",
    "cls_token",
)

# The same table as detectron2-style per-name hyper-parameter overrides.
NO_WEIGHT_DECAY_OVERRIDES: Dict[str, Dict[str, float]] = {
    name: {"weight_decay": 0.0} for name in NO_WEIGHT_DECAY_NAMES
}

# Modules whose parameters the "norm" rule exempts: every normalisation layer, detectron2's own
# LayerNorm (``norm="LN"`` in SimpleFeaturePyramid and the ViTDet heads) included.
NORM_MODULE_TYPES = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm*, SyncBatchNorm, NaiveSyncBatchNorm
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    D2LayerNorm,
)

# "norm": parameters of NORM_MODULE_TYPES modules (detectron2 / ViTDet; biases are decayed).
# "ndim": parameters with ndim <= 1 (norms, biases, layer scale; mmseg, MAE, timm).
# "none": no rule (only the named tables and the overrides).
NO_DECAY_RULES = ("norm", "ndim", "none")


def is_no_weight_decay(name: str, ndim: int) -> bool:
    """True where the "ndim" rule with the named tables gives no weight decay: 1-D parameters
    (norms, biases) and the tables of :data:`NO_WEIGHT_DECAY_NAMES`."""
    return ndim <= 1 or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY_NAMES


def _exempt_by_rule(rule: str, module: nn.Module, param: nn.Parameter) -> bool:
    if rule == "norm":
        return isinstance(module, NORM_MODULE_TYPES)
    if rule == "ndim":
        return param.ndim <= 1
    return False


def build_param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    no_decay_rule: str,
    base_lr: Optional[float] = None,
    exempt_weight_decay: float = 0.0,
    no_decay_names: Collection[str] = NO_WEIGHT_DECAY_NAMES,
    lr_factor_func: Optional[Callable[[str], float]] = None,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    with_lr_scale: bool = False,
    with_names: bool = False,
    no_decay_first: bool = False,
) -> List[Dict[str, Any]]:
    """Parameter groups for ``torch.optim`` (see the module doc for the recipes).

    Each trainable parameter (frozen ones are skipped, shared ones counted once) gets, in order:
    ``lr = base_lr`` (no ``lr`` entry when ``base_lr`` is None: the optimizer's default applies)
    and ``weight_decay``; ``exempt_weight_decay`` where ``no_decay_rule`` exempts it; 0.0 where
    its own name is in ``no_decay_names``; ``lr = base_lr * lr_factor_func(full_name)``;
    ``overrides[own_name]``. Parameters with equal hyper-parameters share a group.

    Args:
        model: the model (not wrapped in DDP: names are those of ``model.named_parameters()``).
        weight_decay: weight decay of every parameter no rule exempts.
        no_decay_rule: one of :data:`NO_DECAY_RULES`: "norm" (parameters of normalisation layers),
            "ndim" (parameters with ``ndim <= 1``) or "none".
        base_lr: lr of every group before ``lr_factor_func``.
        exempt_weight_decay: weight decay of the parameters ``no_decay_rule`` exempts
            (detectron2's ``weight_decay_norm``).
        no_decay_names: own parameter names (last name component) never decayed, whatever the
            rule; default :data:`NO_WEIGHT_DECAY_NAMES`, ``()`` for none.
        lr_factor_func: maps a full parameter name (``backbone.net.blocks3.4.attn.qkv.weight``)
            to an lr multiplier, e.g. ``partial(get_convvit_lr_decay_rate, lr_decay_rate=0.8)``.
        overrides: hyper-parameters by own parameter name, applied last.
        with_lr_scale: groups carry ``lr_scale`` (the lr multiplier, 1.0 without
            ``lr_factor_func``), e.g. for logging or schedulers that rescale it.
        with_names: groups carry ``names``, the full parameter names in the order of ``params``
            (for logging and tests; drop them before building the optimizer).
        no_decay_first: the parameters exempted by the rule or the named tables never share a
            group with the others (even with ``weight_decay=0``), and their groups come first
            (MAE's ``[no_decay, decay]``).
    Returns:
        ``[{"lr": ..., "weight_decay": ..., "params": [...]}, ...]``.
    """
    if no_decay_rule not in NO_DECAY_RULES:
        raise ValueError(f"no_decay_rule={no_decay_rule!r}; expected one of {NO_DECAY_RULES}")
    if base_lr is None and (lr_factor_func is not None or with_lr_scale):
        raise ValueError("build_param_groups: lr_factor_func and with_lr_scale need base_lr")
    no_decay_names = frozenset(no_decay_names)
    overrides = {} if overrides is None else overrides
    groups: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    seen: set = set()
    for module_name, module in model.named_modules():
        for own_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            name = f"{module_name}.{own_name}" if module_name else own_name
            hyper: Dict[str, Any] = {} if base_lr is None else {"lr": base_lr}
            hyper["weight_decay"] = weight_decay
            exempt = _exempt_by_rule(no_decay_rule, module, param)
            if exempt:
                hyper["weight_decay"] = exempt_weight_decay
            if own_name in no_decay_names:
                hyper["weight_decay"] = 0.0
                exempt = True
            scale = 1.0
            if lr_factor_func is not None:
                scale = lr_factor_func(name)
                hyper["lr"] = base_lr * scale
            if with_lr_scale:
                hyper["lr_scale"] = scale
            hyper.update(overrides.get(own_name, {}))
            key = (exempt if no_decay_first else None,) + tuple(hyper.items())
            group = groups.get(key)
            if group is None:
                group = groups[key] = {**hyper, "params": []}
                if with_names:
                    group["names"] = []
            group["params"].append(param)
            if with_names:
                group["names"].append(name)
    if not groups:
        total = sum(1 for _ in model.parameters())
        raise ValueError(
            f"build_param_groups: {type(model).__name__} has no trainable parameters "
            f"({total} parameters, all frozen)"
            if total
            else f"build_param_groups: {type(model).__name__} has no parameters"
        )
    if no_decay_first:
        return [g for k, g in groups.items() if k[0]] + [g for k, g in groups.items() if not k[0]]
    return list(groups.values())
