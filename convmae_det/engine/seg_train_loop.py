"""Segmentation training and evaluation behind ``tools/plain_train_net.py`` (yacs configs).

The job builds what is its own (yacs setup with ``add_convmae_config`` and checked overrides, the
UperNet model, the layer-decay AdamW and poly schedule, the ADE20K-style loader, the mIoU
evaluation) and trains on the one trainer of every job
(:func:`convmae_det.engine.training.run_training`: AMP on CUDA, DDP over NCCL or CPU gloo,
detectron2's hooks for periodic checkpoints and evaluation, metrics printed with an ETA and
written to ``metrics.json`` and tensorboard).

Reliability, as in the detection trainer (``docs/RELIABILITY.md``):

* exact resume: iteration ``i`` reseeds every generator from ``(SEED, rank, i)``
  (:class:`IterationSeeder`), and the training loader reads batch ``i`` as a function of
  ``(SEED, i)`` only (:class:`ResumableTrainLoader`). Both seeds, the optimizer, the scheduler,
  the scaler and the iteration are in every checkpoint (``SEED < 0``: a random seed, kept there
  too), and ``--resume`` continues from the newest complete checkpoint (``resume_newest``),
  so a killed and resumed run ends with the weights of the uninterrupted one;
* ``SOLVER.CHECKPOINT_MAX_TO_KEEP`` keeps the newest N periodic checkpoints;
* a NaN / Inf loss term stops the run before the optimizer step (:class:`NonFiniteLossError`
  naming the iteration, the terms and the last good checkpoint) or, with
  ``SOLVER.NONFINITE_LOSS skip``, drops that batch's update (weights, optimizer and BatchNorm
  statistics unchanged), logged and counted as ``nonfinite_skipped``; all processes decide alike;
* ``DATALOADER.SKIP_BAD_SAMPLES``: an unreadable image or label is logged, counted
  (``skipped_samples``) and replaced reproducibly instead of ending the run with the file named.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import detectron2.utils.comm as comm
import torch
import torch.nn as nn
from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import create_ddp_model
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset, print_csv_format

from ..config import add_convmae_config, merge_config_file_safely
from ..data.resumable_loader import ResumableTrainLoader
from ..data.sem_seg_mapper import SemSegDatasetMapper, check_num_classes
from .seg_solver import build_seg_lr_scheduler, build_seg_optimizer
from .settings import RunSettings, data_seed, resolve_device
from .training import run_training
from .yacs_overrides import merge_checked_overrides

__all__ = [
    "get_seg_cfg",
    "build_seg_train_loader",
    "check_seg_batch_norm",
    "do_seg_test",
    "do_seg_train",
]

logger = logging.getLogger("convmae_det")


def get_seg_cfg(config_file: str = "", opts: Optional[List[str]] = None) -> CfgNode:
    """detectron2 defaults + ``add_convmae_config`` + ``config_file`` + ``opts`` (not frozen).

    ``opts`` are checked first (:func:`merge_checked_overrides`: an unknown key or a value of the
    wrong type raises ``ConfigOverrideError`` naming it). ``MODEL.DEVICE`` falls back to "cpu"
    when it asks for CUDA on a machine without it.
    """
    cfg = get_cfg()
    add_convmae_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        merge_config_file_safely(cfg, config_file)  # never runs code from the YAML
    if opts:
        merge_checked_overrides(cfg, opts)
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE, key="MODEL.DEVICE")
    return cfg


def do_seg_test(cfg: CfgNode, model: nn.Module) -> "OrderedDict[str, Dict]":
    """Evaluate on every ``cfg.DATASETS.TEST`` with ``SemSegEvaluator`` (mIoU, fwIoU, mACC, pACC).

    Returns ``{dataset: {"sem_seg": {...}}}`` on the main process (empty dicts elsewhere).
    """
    results: "OrderedDict[str, Dict]" = OrderedDict()
    for name in cfg.DATASETS.TEST:
        check_num_classes(name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        loader = build_detection_test_loader(cfg, name, mapper=SemSegDatasetMapper(cfg, False))
        out_dir = os.path.join(cfg.OUTPUT_DIR, "inference", name)
        evaluator = SemSegEvaluator(name, distributed=True, output_dir=out_dir)
        res = inference_on_dataset(model, loader, evaluator)
        results[name] = res or {}
        if comm.is_main_process():
            logger.info(f"Evaluation results for {name} in csv format:")
            print_csv_format(res)
    return results


def build_seg_train_loader(cfg: CfgNode, *, seed: Optional[int] = None) -> ResumableTrainLoader:
    """The training loader of ``cfg.DATASETS.TRAIN``: per-process batches of
    ``SOLVER.IMS_PER_BATCH / world size`` mapped dicts (:class:`SemSegDatasetMapper`), batch ``i``
    a function of ``(seed, i)`` only (``seed`` < 0 or None: random, shared by all processes),
    ``DATALOADER.NUM_WORKERS`` loader processes, ``DATALOADER.SKIP_BAD_SAMPLES``."""
    dataset = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), filter_empty=False)
    return ResumableTrainLoader(
        dataset,
        mapper=SemSegDatasetMapper(cfg, True),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,
        skip_bad_samples=cfg.DATALOADER.SKIP_BAD_SAMPLES,
    )


_BATCH_NORMS = ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")
_SYNC_BATCH_NORMS = _BATCH_NORMS[1:]  # statistics over all processes
_ONE_VALUE = "Expected more than 1 value per channel when training"


def _one_image_advice(cfg: CfgNode, world_size: int) -> str:
    """What to change when a BatchNorm sees one value per channel (one image per process)."""
    head = cfg.MODEL.SEM_SEG_HEAD
    fixes = [f"SOLVER.IMS_PER_BATCH >= {2 * world_size} ({2} images per process)"]
    if head.NORM in _SYNC_BATCH_NORMS and world_size == 1:
        fixes.append(f"{head.NORM} over 2 or more processes (--num-gpus)")
    fixes.append("MODEL.SEM_SEG_HEAD.NORM GN")
    processes = f"{world_size} process" + ("es" if world_size != 1 else "")
    return (
        f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} over {processes} puts 1 image per "
        f"process through the BatchNorm (MODEL.SEM_SEG_HEAD.NORM={head.NORM}) after the 1x1 "
        f"pyramid pooling (MODEL.SEM_SEG_HEAD.POOL_SCALES={list(head.POOL_SCALES)}), which "
        f"needs more than 1 value per channel in training: use {' or '.join(fixes)}"
    )


def check_seg_batch_norm(cfg: CfgNode, world_size: int) -> None:
    """Refuse (``ValueError`` naming the keys) a training run whose UperNet pyramid pooling would
    meet PyTorch's "Expected more than 1 value per channel when training": a 1x1 pooling scale,
    a BatchNorm head (``BN``; a synchronised one only in a single process) and
    ``SOLVER.IMS_PER_BATCH / world_size == 1``."""
    head = cfg.MODEL.SEM_SEG_HEAD
    if head.NAME != "UperNetHead" or 1 not in list(head.POOL_SCALES):
        return
    if not isinstance(head.NORM, str) or head.NORM not in _BATCH_NORMS:
        return
    if head.NORM in _SYNC_BATCH_NORMS and world_size > 1:
        return
    if cfg.SOLVER.IMS_PER_BATCH // max(world_size, 1) == 1:
        raise ValueError(_one_image_advice(cfg, world_size))


def _grad_clip(cfg: CfgNode):
    """``SOLVER.CLIP_GRADIENTS`` as a function of the parameters (None when disabled)."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    if clip.CLIP_TYPE == "value":
        return functools.partial(torch.nn.utils.clip_grad_value_, clip_value=clip.CLIP_VALUE)
    return functools.partial(
        torch.nn.utils.clip_grad_norm_, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE
    )


def _evaluation(cfg: CfgNode, model: nn.Module, results: "OrderedDict[str, Dict]"):
    """The evaluation of the training run: :func:`do_seg_test` (its results kept in
    ``results``), named for the event storage "sem_seg/mIoU" for one test set,
    "<dataset>/sem_seg/mIoU" for several."""

    def evaluate() -> Dict:
        results.clear()
        results.update(do_seg_test(cfg, model))
        if comm.is_main_process() and len(results) == 1:
            return next(iter(results.values()))
        return dict(results)

    return evaluate


def do_seg_train(
    cfg: CfgNode,
    model: nn.Module,
    *,
    resume: bool = False,
    timings: Optional[Dict[str, float]] = None,
) -> "OrderedDict[str, Dict]":
    """Train ``model`` (not yet wrapped in DDP) for ``cfg.SOLVER.MAX_ITER`` iterations on the
    one trainer (:func:`convmae_det.engine.training.run_training`).

    Loads ``MODEL.WEIGHTS`` (any supported format) or, with ``resume``, the newest complete
    checkpoint in ``OUTPUT_DIR`` with its optimizer, scheduler, scaler, seeds and iteration (see
    the module docstring). Evaluates every ``TEST.EVAL_PERIOD`` iterations and after the last
    one, writes metrics every ``SOLVER.LOG_PERIOD``. Returns the last evaluation's results, as
    :func:`do_seg_test` gives them (``{dataset: {"sem_seg": {...}}}`` on the main process).
    ``model`` itself is trained (in place). ``timings``, if given, receives ``train_seconds``
    and ``eval_seconds``.
    """
    for name in cfg.DATASETS.TRAIN:
        check_num_classes(name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    world = comm.get_world_size()
    check_seg_batch_norm(cfg, world)
    settings = RunSettings.from_yacs(cfg)
    model.train()
    optimizer = build_seg_optimizer(cfg, model)
    scheduler = build_seg_lr_scheduler(cfg, optimizer)
    loader = build_seg_train_loader(cfg, seed=data_seed(settings.seed))  # run seed resolved
    model = create_ddp_model(model, broadcast_buffers=False)
    logger.info(f"Training data seed {loader.seed} (run seed {settings.seed})")
    results: "OrderedDict[str, Dict]" = OrderedDict()
    try:
        run_training(
            model,
            loader,
            optimizer,
            scheduler,
            settings,
            evaluate=_evaluation(cfg, model, results),
            weights=cfg.MODEL.WEIGHTS,
            resume=resume,
            grad_clip=_grad_clip(cfg),
            timings=timings,
        )
    except ValueError as exc:
        if _ONE_VALUE not in str(exc):
            raise
        raise ValueError(
            f"a BatchNorm got 1 value per channel in training: "
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} over {world} "
            f"process(es) gives {cfg.SOLVER.IMS_PER_BATCH // world} image(s) per "
            "process; use at least 2 per process, or GN for the norm keys "
            "(MODEL.SEM_SEG_HEAD.NORM, MODEL.AUX_HEAD.NORM, MODEL.CONVVIT.E4_NORM) "
            f"(PyTorch: {exc})"
        ) from exc
    return results
