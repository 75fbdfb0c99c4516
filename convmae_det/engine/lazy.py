"""Training and evaluation of a LazyConfig model: the body of ``tools/lazyconfig_train_net.py``.

The config follows detectron2's ``configs/common/train.py`` (see ``configs/common/train.py`` here
for every key): ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier`` and ``train`` (``output_dir``, ``init_checkpoint``, ``max_iter``,
``amp.{enabled,precision}``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``,
``device``, ``seed``, ``init_strict``).

What we add to detectron2's script: checkpoints are read by our loader (any supported format,
with a logged report), CUDA-less runs fall back to the CPU (DDP on gloo), AMP takes bf16 or fp16,
datasets are checked before anything is built, and the final metrics are returned.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch.nn as nn
from detectron2.config import instantiate
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig

from ..checkpoint import ConvMAECheckpointer
from .config import check_datasets, dataset_names_in_config
from .reproducibility import derive_seed, enable_determinism, seed_everything
from .settings import RunSettings, data_seed, resolve_device
from .trainer import count_parameters
from .training import load_weights, run_training

__all__ = [
    "build_checkpointer",
    "datasets_to_check",
    "load_weights",
    "lazy_test",
    "lazy_train",
    "lazy_eval_only",
]

logger = logging.getLogger("detectron2")
_MODEL_INIT_DOMAIN = 0x1417  # domain separator of the seed of the initial weights


def datasets_to_check(cfg: DictConfig, *, eval_only: bool = False) -> List[tuple]:
    """The ``(dataset name, config key)`` pairs a run reads: every ``names=`` under
    ``cfg.dataloader`` for training (which also evaluates), only those under ``dataloader.test``
    with ``eval_only`` (an evaluation never reads the training set, so a missing one must not
    stop it)."""
    names = dataset_names_in_config(cfg)
    if eval_only:
        names = [(name, key) for name, key in names if key.startswith("dataloader.test")]
    return names


def build_checkpointer(model: nn.Module, save_dir: str = "", **kwargs) -> ConvMAECheckpointer:
    """Our checkpointer: reads every supported format, logs a report, saves atomically."""
    return ConvMAECheckpointer(model, save_dir, **kwargs)


def lazy_test(cfg: DictConfig, model: nn.Module) -> Dict[str, Any]:
    """Run ``cfg.dataloader.evaluator`` over ``cfg.dataloader.test``; {} without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    loader = instantiate(cfg.dataloader.test)  # first: toy datasets are generated on load
    results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _device(cfg: DictConfig) -> str:
    device = resolve_device(cfg.train.get("device", "cuda"), key="train.device")
    cfg.train.device = device
    return device


def lazy_eval_only(cfg: DictConfig, *, strict: Optional[bool] = None) -> Dict[str, Any]:
    """Build the model, load ``train.init_checkpoint`` and evaluate it (only the test datasets
    are checked: the training set need not exist)."""
    check_datasets(datasets_to_check(cfg, eval_only=True))
    device = _device(cfg)
    model = instantiate(cfg.model).to(device)
    model = create_ddp_model(model)
    strict = cfg.train.get("init_strict", False) if strict is None else strict
    load_weights(build_checkpointer(model), cfg.train.init_checkpoint, strict=strict)
    return lazy_test(cfg, model)


def lazy_train(
    cfg: DictConfig,
    *,
    resume: bool = False,
    strict: Optional[bool] = None,
    timings: Optional[Dict[str, float]] = None,
) -> Dict[str, Any]:
    """Train ``cfg`` from ``train.init_checkpoint`` (or resume from ``train.output_dir``) with
    :func:`convmae_det.engine.training.run_training`.

    Periodic checkpoints (``train.checkpointer``), evaluation every ``train.eval_period`` and at
    the end, ``metrics.json`` / tensorboard / console (with ETA) every ``train.log_period``.
    Returns the results of the last evaluation ({} when none ran). ``timings``, if given, receives
    ``train_seconds`` (the training loop without evaluation) and ``eval_seconds``.
    """
    check_datasets(dataset_names_in_config(cfg))
    settings = RunSettings.from_lazy(cfg.train)  # the run seed resolved
    cfg.train.device = settings.device
    # one run seed: a training loader left random (seed < 0) takes its seed from it, so
    # train.seed >= 0 fixes the batches as well as the per-iteration seeds
    loader_cfg = cfg.dataloader.train
    if "seed" in loader_cfg and (loader_cfg.seed is None or int(loader_cfg.seed) < 0):
        loader_cfg.seed = data_seed(settings.seed)
    # and the weights the checkpoint does not give (new heads): the same in every run and process
    seed_everything(derive_seed(settings.seed, _MODEL_INIT_DOMAIN))
    enable_determinism(bool(cfg.train.get("deterministic", False)))
    model = instantiate(cfg.model).to(settings.device)
    logger.info(
        f"Model: {type(model).__name__}, {count_parameters(model) / 1e6:.2f} M parameters "
        f"({count_parameters(model, trainable_only=True) / 1e6:.2f} M trainable)"
    )
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    return run_training(
        model,
        train_loader,
        optimizer,
        instantiate(cfg.lr_multiplier),
        settings,
        evaluate=lambda: lazy_test(cfg, model),
        weights=cfg.train.init_checkpoint,
        resume=resume,
        strict=cfg.train.get("init_strict", False) if strict is None else strict,
        timings=timings,
    )
