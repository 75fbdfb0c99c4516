"""The optimizer parameter groups of every shipped config, as the training paths build them.

:func:`summarize_config` builds a config's model (CPU, random init) and its optimizer the way
training does, and returns per group the hyper-parameters and the ordered parameter NAMES. The
pinned summaries (``tests/data/param_groups_pinned.json``) guard checkpoint resume: an optimizer
state only loads into the right parameters when every group keeps its members and their order.

Regenerate the fixture only when a change of the groups is intended (it breaks the resume of
existing checkpoints)::

    python tests/param_groups_pinning.py [CONFIG ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import convmae_det  # noqa: E402,F401  (applies compatibility fixes)

__all__ = ["FIXTURE", "TOY_CONFIGS", "BASE_CONFIGS", "SHIPPED_CONFIGS", "summarize_config"]

FIXTURE = os.path.join(ROOT, "tests", "data", "param_groups_pinned.json")

TOY_CONFIGS = [
    "configs/toy/mask_rcnn_convmae_vitdet_toy.py",
    "configs/toy/mask_rcnn_convvitdet_toy.py",
    "configs/ADE20K/upernet_convmae_toy.yaml",
    "configs/pretrain/convmae_toy.py",
    "configs/pretrain/fastconvmae_toy.py",
    "configs/pretrain/fastconvmae_mor_toy.py",
    "configs/toy/convvit_toy_finetune.py",
    "configs/toy/convvit_toy_linprobe.py",
]
BASE_CONFIGS = [
    "configs/COCO/mask_rcnn_convmae_vitdet_b_25ep.py",
    "configs/COCO/mask_rcnn_convvitdet_b_25ep.py",
    "configs/COCO/mask_rcnn_vitdet_mae_b_100ep.py",
    "configs/ADE20K/upernet_convmae_b_512_160k.yaml",
    "configs/pretrain/convmae_b_1600ep.py",
    "configs/pretrain/fastconvmae_b_50ep.py",
    "configs/pretrain/fastconvmae_b_mor_50ep.py",
    "configs/ImageNet/convvit_b_finetune_100ep.py",
    "configs/ImageNet/fastconvmae_b_finetune_100ep.py",
    "configs/ImageNet/convvit_b_linprobe_90ep.py",
]
SHIPPED_CONFIGS = TOY_CONFIGS + BASE_CONFIGS

# Group entries recorded besides the parameter names (those the optimizers of the recipes use).
_HYPER_KEYS = (
    "lr", "weight_decay", "lr_scale", "betas", "eps", "momentum", "nesterov", "always_adapt",
    "trust_coeff",
)  # fmt: skip


def _build(config: str):
    """(model, optimizer) of ``config`` (a path relative to the repository root)."""
    path = os.path.join(ROOT, config)
    if config.startswith("configs/ADE20K/"):
        from detectron2.modeling import build_model

        from convmae_det.engine.seg_solver import build_seg_optimizer
        from convmae_det.engine.seg_train_loop import get_seg_cfg

        cfg = get_seg_cfg(path, ["MODEL.DEVICE", "cpu"])
        model = build_model(cfg)
        return model, build_seg_optimizer(cfg, model)

    from detectron2.config import instantiate

    from convmae_det.config import load_lazy_config_safely

    cfg = load_lazy_config_safely(path)
    model = instantiate(cfg.model)
    if config.startswith("configs/pretrain/"):
        from convmae_det.engine import pretrain_loop

        opt = pretrain_loop._options(cfg.train)
        optimizer = torch.optim.AdamW(  # as PretrainRunner.__init__
            pretrain_loop.pretrain_param_groups(model, opt["weight_decay"]),
            lr=opt["blr"] * opt["batch_size"] / 256,
            betas=tuple(opt["betas"]),
        )
        return model, optimizer
    cfg.optimizer.params.model = model  # as convmae_det.engine.lazy.lazy_train
    return model, instantiate(cfg.optimizer)


def _summarize(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    names = {}
    for name, param in model.named_parameters():
        names.setdefault(param, name)
    groups: List[Dict[str, Any]] = []
    for group in optimizer.param_groups:
        entry = {k: group[k] for k in _HYPER_KEYS if k in group}
        if "betas" in entry:
            entry["betas"] = list(entry["betas"])
        entry["params"] = [names[p] for p in group["params"]]
        groups.append(entry)
    return {"optimizer": type(optimizer).__name__, "groups": groups}


def summarize_config(config: str) -> Dict[str, Any]:
    """``{"optimizer": class name, "groups": [{"lr": ..., "weight_decay": ..., ...,
    "params": [names in order]}, ...]}`` of the optimizer training builds for ``config``."""
    torch.manual_seed(0)
    model, optimizer = _build(config)
    return _summarize(model, optimizer)


def main(configs: List[str]) -> None:
    pinned: Dict[str, Any] = {}
    if os.path.isfile(FIXTURE):
        with open(FIXTURE) as f:
            pinned = json.load(f)
    for config in configs or SHIPPED_CONFIGS:
        tic = time.perf_counter()
        pinned[config] = summarize_config(config)
        n = sum(len(g["params"]) for g in pinned[config]["groups"])
        print(
            f"{config}: {len(pinned[config]['groups'])} groups, {n} parameters, "
            f"{time.perf_counter() - tic:.1f} s",
            flush=True,
        )
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:  # one line per config
        f.write("{\n")
        f.write(
            ",\n".join(
                f"{json.dumps(k)}: {json.dumps(pinned[k], separators=(',', ':'))}"
                for k in SHIPPED_CONFIGS
                if k in pinned
            )
        )
        f.write("\n}\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
