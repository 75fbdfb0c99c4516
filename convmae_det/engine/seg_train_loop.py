"""The plain training / evaluation loop behind ``tools/plain_train_net.py`` (segmentation).

In the spirit of detectron2's ``tools/plain_train_net.py``, with what our recipe needs kept here in
the library: yacs setup with ``add_convmae_config`` (CPU fallback when CUDA is absent), our
optimizer and poly schedule, :class:`ConvMAECheckpointer` for ``MODEL.WEIGHTS`` and resume,
AMP on CUDA, DDP (NCCL or CPU gloo through ``launch``), periodic checkpoints and evaluation,
metrics printed with an ETA and written to ``metrics.json`` and tensorboard.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Dict, List, Optional

import detectron2.utils.comm as comm
import torch
import torch.nn as nn
from detectron2.checkpoint import PeriodicCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import create_ddp_model, default_writers
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset, print_csv_format
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils.events import EventStorage

from ..checkpoint import ConvMAECheckpointer
from ..config import add_convmae_config
from ..data.sem_seg_mapper import SemSegDatasetMapper, check_num_classes
from .seg_solver import build_seg_lr_scheduler, build_seg_optimizer

__all__ = ["get_seg_cfg", "do_seg_test", "do_seg_train", "AMP_DTYPES"]

logger = logging.getLogger("convmae_det")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def get_seg_cfg(config_file: str = "", opts: Optional[List[str]] = None) -> CfgNode:
    """detectron2 defaults + ``add_convmae_config`` + ``config_file`` + ``opts`` (not frozen).

    ``MODEL.DEVICE`` falls back to "cpu" when it asks for CUDA on a machine without it.
    """
    cfg = get_cfg()
    add_convmae_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
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


def _amp_settings(cfg: CfgNode, device: torch.device):
    enabled = bool(cfg.SOLVER.AMP.ENABLED)
    if enabled and device.type != "cuda":
        logger.warning("SOLVER.AMP.ENABLED ignored: mixed precision is used on CUDA only")
        enabled = False
    if cfg.SOLVER.AMP.DTYPE not in AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE={cfg.SOLVER.AMP.DTYPE!r}; expected {list(AMP_DTYPES)}")
    dtype = AMP_DTYPES[cfg.SOLVER.AMP.DTYPE]
    scaler = torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16)
    return enabled, dtype, scaler


def _clip_gradients(cfg: CfgNode, params: List[torch.Tensor]) -> None:
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return
    if clip.CLIP_TYPE == "value":
        torch.nn.utils.clip_grad_value_(params, clip.CLIP_VALUE)
    else:
        torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE, clip.NORM_TYPE)


def do_seg_train(cfg: CfgNode, model: nn.Module, *, resume: bool = False) -> nn.Module:
    """Train ``model`` (not yet wrapped in DDP) for ``cfg.SOLVER.MAX_ITER`` iterations.

    Loads ``MODEL.WEIGHTS`` (any supported format) or, with ``resume``, the last checkpoint in
    ``OUTPUT_DIR`` with its optimizer, scheduler and iteration. Evaluates every
    ``TEST.EVAL_PERIOD`` iterations and writes metrics every ``SOLVER.LOG_PERIOD``.
    Returns the (possibly DDP-wrapped) model.
    """
    for name in cfg.DATASETS.TRAIN:
        check_num_classes(name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    model.train()
    device = next(model.parameters()).device
    optimizer = build_seg_optimizer(cfg, model)
    scheduler = build_seg_lr_scheduler(cfg, optimizer)
    amp, amp_dtype, scaler = _amp_settings(cfg, device)
    extra = {"scaler": scaler} if scaler.is_enabled() else {}
    checkpointer = ConvMAECheckpointer(
        model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler, **extra
    )
    state = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    start_iter = state.get("iteration", -1) + 1
    max_iter = cfg.SOLVER.MAX_ITER
    periodic = PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=max_iter)
    writers = default_writers(cfg.OUTPUT_DIR, max_iter) if comm.is_main_process() else []
    model = create_ddp_model(model, broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]

    loader = build_detection_train_loader(cfg, mapper=SemSegDatasetMapper(cfg, True))
    log_period = max(1, cfg.SOLVER.LOG_PERIOD)
    logger.info(f"Starting training from iteration {start_iter} to {max_iter}")
    with EventStorage(start_iter) as storage:
        data_iter = iter(loader)
        for iteration in range(start_iter, max_iter):
            storage.iter = iteration
            t0 = time.perf_counter()
            data = next(data_iter)
            data_time = time.perf_counter() - t0

            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                loss_dict = model(data)
            losses = sum(loss_dict.values())
            if not torch.isfinite(losses).all():
                raise FloatingPointError(
                    f"loss became non-finite at iteration {iteration}: "
                    f"{ {k: float(v) for k, v in loss_dict.items()} }"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses).backward()
            if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
                scaler.unscale_(optimizer)
                _clip_gradients(cfg, params)
            scaler.step(optimizer)
            scaler.update()

            reduced = {k: v.item() for k, v in comm.reduce_dict(loss_dict).items()}
            if comm.is_main_process():
                storage.put_scalars(total_loss=sum(reduced.values()), **reduced)
                storage.put_scalars(time=time.perf_counter() - t0, data_time=data_time)
            group = optimizer.param_groups[0]
            storage.put_scalar("lr", group["lr"] / group.get("lr_scale", 1.0), smoothing_hint=False)
            scheduler.step()

            last = iteration == max_iter - 1
            if (
                cfg.TEST.EVAL_PERIOD > 0
                and (iteration + 1) % cfg.TEST.EVAL_PERIOD == 0
                and not last
            ):
                res = do_seg_test(cfg, model)
                if comm.is_main_process():
                    # "sem_seg/mIoU" for one test set, "<dataset>/sem_seg/mIoU" for several
                    res = next(iter(res.values())) if len(res) == 1 else dict(res)
                    storage.put_scalars(**flatten_results_dict(res), smoothing_hint=False)
                model.train()
                comm.synchronize()
            if (iteration + 1) % log_period == 0 or last:
                for writer in writers:
                    writer.write()
            periodic.step(iteration)
    for writer in writers:
        writer.close()
    return model
