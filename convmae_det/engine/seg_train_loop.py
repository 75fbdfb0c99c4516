"""The plain training / evaluation loop behind ``tools/plain_train_net.py`` (segmentation).

In the spirit of detectron2's ``tools/plain_train_net.py``, with what our recipe needs kept here in
the library: yacs setup with ``add_convmae_config`` and checked overrides (CPU fallback when CUDA
is absent), our optimizer and poly schedule, :class:`ConvMAECheckpointer` for ``MODEL.WEIGHTS``
and resume, AMP on CUDA, DDP (NCCL or CPU gloo through ``launch``), periodic checkpoints and
evaluation, metrics printed with an ETA and written to ``metrics.json`` and tensorboard.

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
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import create_ddp_model, default_writers
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset, print_csv_format
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils.events import EventStorage

from ..checkpoint import ConvMAECheckpointer
from ..config import add_convmae_config, merge_config_file_safely
from ..data.resumable_loader import ResumableTrainLoader
from ..data.sem_seg_mapper import SemSegDatasetMapper, check_num_classes
from .hooks import FiniteLossGuard, mean_over_processes, scaler_step
from .reproducibility import IterationSeeder, derive_seed, resolve_run_seed
from .resume import drop_metrics_after, remove_leftover_temp_files, resume_newest
from .seg_solver import build_seg_lr_scheduler, build_seg_optimizer
from .yacs_overrides import merge_checked_overrides

__all__ = [
    "get_seg_cfg",
    "build_seg_train_loader",
    "check_seg_batch_norm",
    "do_seg_test",
    "do_seg_train",
    "AMP_DTYPES",
]

logger = logging.getLogger("convmae_det")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_DATA_SEED = 0x5E65  # domain separator: the loader's seed is derived from the run seed


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


def _norm_statistics(model: nn.Module) -> List[torch.Tensor]:
    """The running statistics of the BatchNorm layers (what a forward pass changes)."""
    return [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for b in m.buffers(recurse=False)
    ]


def _load_or_resume(checkpointer: ConvMAECheckpointer, weights: str, resume: bool) -> int:
    """Load ``weights`` or, with ``resume``, the newest readable checkpoint with everything
    needed to continue; returns the first iteration to run. The main process first removes the
    ``.tmp-*`` files of killed saves and, on a resume, the ``metrics.json`` rows logged after the
    checkpoint (call before the writers open it)."""
    if comm.is_main_process():
        remove_leftover_temp_files(checkpointer.save_dir)
    state = resume_newest(checkpointer) if resume else None
    if state is None:
        checkpointer.resume_or_load(weights, resume=False)
    start = 0 if state is None else state.get("iteration", -1) + 1
    if resume and comm.is_main_process():
        drop_metrics_after(os.path.join(checkpointer.save_dir, "metrics.json"), start - 1)
    return start


def do_seg_train(cfg: CfgNode, model: nn.Module, *, resume: bool = False) -> nn.Module:
    """Train ``model`` (not yet wrapped in DDP) for ``cfg.SOLVER.MAX_ITER`` iterations.

    Loads ``MODEL.WEIGHTS`` (any supported format) or, with ``resume``, the newest complete
    checkpoint in ``OUTPUT_DIR`` with its optimizer, scheduler, scaler, seeds and iteration (see
    the module docstring). Evaluates every ``TEST.EVAL_PERIOD`` iterations and writes metrics
    every ``SOLVER.LOG_PERIOD``. Returns the (possibly DDP-wrapped) model.
    """
    for name in cfg.DATASETS.TRAIN:
        check_num_classes(name, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    check_seg_batch_norm(cfg, comm.get_world_size())
    model.train()
    device = next(model.parameters()).device
    optimizer = build_seg_optimizer(cfg, model)
    scheduler = build_seg_lr_scheduler(cfg, optimizer)
    amp, amp_dtype, scaler = _amp_settings(cfg, device)
    seeder = IterationSeeder(resolve_run_seed(cfg.SEED))
    loader = build_seg_train_loader(cfg, seed=derive_seed(seeder.seed, _DATA_SEED))
    extra = {"scaler": scaler} if scaler.is_enabled() else {}
    checkpointer = ConvMAECheckpointer(
        model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler, seeder=seeder,
        data_loader=loader, **extra,
    )  # fmt: skip
    guard = FiniteLossGuard(
        mode=cfg.SOLVER.NONFINITE_LOSS,
        max_skips=cfg.SOLVER.NONFINITE_MAX_SKIPS,
        last_checkpoint=lambda: checkpointer.get_checkpoint_file() or "",
        config_key="SOLVER.NONFINITE_LOSS",
    )
    start_iter = _load_or_resume(checkpointer, cfg.MODEL.WEIGHTS, resume)
    max_iter = cfg.SOLVER.MAX_ITER
    periodic = None
    if comm.is_main_process():
        periodic = PeriodicCheckpointer(
            checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=max_iter,
            max_to_keep=cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP or None,
        )  # fmt: skip
    writers = default_writers(cfg.OUTPUT_DIR, max_iter) if comm.is_main_process() else []
    norm_stats = _norm_statistics(model) if guard.mode == "skip" else []
    model = create_ddp_model(model, broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]

    loader.set_start_iter(start_iter)
    log_period = max(1, cfg.SOLVER.LOG_PERIOD)
    logger.info(
        f"Starting training from iteration {start_iter} to {max_iter} (run seed {seeder.seed}, "
        f"data seed {loader.seed})"
    )
    overflows = 0  # fp16 steps the scaler skipped (inf / NaN gradients)
    with EventStorage(start_iter) as storage:
        data_iter = iter(loader)
        for iteration in range(start_iter, max_iter):
            storage.iter = iteration
            seeder.seed_iteration(iteration)
            t0 = time.perf_counter()
            data = next(data_iter)
            data_time = time.perf_counter() - t0

            saved_stats = [b.clone() for b in norm_stats]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                try:
                    loss_dict = model(data)
                except ValueError as exc:
                    if _ONE_VALUE not in str(exc):
                        raise
                    world = comm.get_world_size()
                    raise ValueError(
                        f"a BatchNorm got 1 value per channel in training: "
                        f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} over {world} "
                        f"process(es) gives {cfg.SOLVER.IMS_PER_BATCH // world} image(s) per "
                        "process; use at least 2 per process, or GN for the norm keys "
                        "(MODEL.SEM_SEG_HEAD.NORM, MODEL.AUX_HEAD.NORM, MODEL.CONVVIT.E4_NORM) "
                        f"(PyTorch: {exc})"
                    ) from exc
            losses = sum(loss_dict.values())
            reduced = mean_over_processes(loss_dict)
            if guard.check(reduced, iteration):  # raises in "stop" mode
                for buffer, saved in zip(norm_stats, saved_stats):
                    buffer.copy_(saved)
            else:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses).backward()
                if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
                    scaler.unscale_(optimizer)
                    _clip_gradients(cfg, params)
                if scaler_step(scaler, optimizer):
                    overflows += 1
                    logger.info(f"fp16 overflow at iteration {iteration}: step skipped by scaler")
                if scaler.is_enabled():
                    storage.put_scalar("amp_overflow_steps", overflows, smoothing_hint=False)
                if comm.is_main_process():
                    storage.put_scalars(total_loss=sum(reduced.values()), **reduced)

            if comm.is_main_process():
                storage.put_scalars(time=time.perf_counter() - t0, data_time=data_time)
                if loader.skip_bad_samples:
                    storage.put_scalar("skipped_samples", loader.num_skipped, smoothing_hint=False)
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
            if periodic is not None:
                periodic.step(iteration)
    for writer in writers:
        writer.close()
    return model
