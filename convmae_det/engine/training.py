"""The one training run: trainer, hooks, checkpointer, resume and writers, for every job.

A job (detection from a LazyConfig, segmentation from yacs) builds its model, training loader,
optimizer, lr schedule and evaluation function, reads its :class:`RunSettings`, and calls
:func:`run_training`, which

1. builds the :class:`~convmae_det.engine.trainer.ConvMAETrainer` (precision, non-finite policy)
   and a :class:`~convmae_det.checkpoint.ConvMAECheckpointer` holding the trainer (iteration,
   optimizer, hooks' states, scaler) and the loader's state;
2. registers detectron2's hooks with ours, in this order: :class:`IterationSeeder` (exact
   resume), :class:`AMPOverflowCounter`, :class:`SkippedSamplesCounter`, ``IterationTimer``,
   :class:`LRScheduler`, ``PeriodicCheckpointer`` (main process), ``EvalHook``, and last
   ``PeriodicWriter`` (console with ETA, ``metrics.json``, tensorboard; main process);
3. resumes from the newest readable checkpoint of the output folder (``resume``; files of the
   older segmentation trainer are upgraded, see :func:`upgrade_training_state`) or loads the
   initial weights, removes leftovers of killed saves and the ``metrics.json`` rows logged after
   the resumed iteration;
4. trains to ``settings.max_iter`` and returns the last evaluation's results.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
from detectron2.engine import default_writers, hooks
from detectron2.utils import comm

from ..checkpoint import ConvMAECheckpointer
from .hooks import AMPOverflowCounter, LRScheduler, SkippedSamplesCounter
from .reproducibility import IterationSeeder
from .resume import drop_metrics_after, remove_leftover_temp_files, resume_newest
from .settings import RunSettings
from .trainer import GradClip, build_trainer

__all__ = [
    "load_weights",
    "run_training",
    "standard_hooks",
    "upgrade_training_state",
    "writer_hook",
]

logger = logging.getLogger(__name__)

# what the segmentation loop of earlier versions saved at the top level of a checkpoint
_LEGACY_HOOK_STATES = {"scheduler": "LRScheduler", "seeder": "IterationSeeder"}


def upgrade_training_state(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """Rewrite a resume point of the earlier hand-written segmentation loop (top-level
    ``optimizer``, ``scheduler``, ``seeder``, ``scaler``, ``iteration``) into the trainer layout
    (``trainer``: ``iteration``, ``optimizer``, ``hooks`` {``LRScheduler``, ``IterationSeeder``},
    ``grad_scaler``). Any other file is returned unchanged."""
    if "trainer" in checkpoint or "optimizer" not in checkpoint or "iteration" not in checkpoint:
        return checkpoint
    checkpoint = dict(checkpoint)
    state: Dict[str, Any] = {
        "iteration": checkpoint["iteration"],
        "optimizer": checkpoint.pop("optimizer"),
    }
    hook_states = {
        hook: checkpoint.pop(key) for key, hook in _LEGACY_HOOK_STATES.items() if key in checkpoint
    }
    if hook_states:
        state["hooks"] = hook_states
    if "scaler" in checkpoint:
        state["grad_scaler"] = checkpoint.pop("scaler")
    checkpoint["trainer"] = state
    logger.info("Resume point of the earlier segmentation loop: upgraded to the trainer layout")
    return checkpoint


def standard_hooks(seed: int, data_loader: Iterable) -> list:
    """The hooks every job starts with: :class:`IterationSeeder` (reseeds every generator from
    ``(seed, rank, iteration)`` and positions a resumable loader), :class:`AMPOverflowCounter`,
    :class:`SkippedSamplesCounter` and detectron2's ``IterationTimer``."""
    return [
        IterationSeeder(seed, data_loader),
        AMPOverflowCounter(),
        SkippedSamplesCounter(data_loader),
        hooks.IterationTimer(),
    ]


def writer_hook(settings: RunSettings) -> hooks.PeriodicWriter:
    """detectron2's writers (console with ETA, ``metrics.json``, tensorboard) every
    ``settings.log_period`` iterations; register it last, on the main process."""
    writers = default_writers(settings.output_dir, settings.max_iter)
    return hooks.PeriodicWriter(writers, period=settings.log_period)


def load_weights(checkpointer: ConvMAECheckpointer, path: str, *, strict: bool = False) -> None:
    """Load ``path`` into the checkpointer's model (no-op when empty). The loader logs its
    report; with ``strict`` anything unexplained (missing, unexpected, mismatched) raises
    :class:`convmae_det.checkpoint.CheckpointError`."""
    if not path:
        logger.info("No init checkpoint: training from scratch")
        return
    previous, checkpointer.strict = checkpointer.strict, strict
    try:
        checkpointer.load(path)
    finally:
        checkpointer.strict = previous


def _resumed_final_checkpoint(checkpointer) -> bool:
    """Whether the checkpoint a resume loaded is ``model_final.pth``, the one written only by
    a completed last iteration."""
    try:
        return os.path.basename(checkpointer.get_checkpoint_file()) == "model_final.pth"
    except (OSError, AttributeError):
        return False


def run_training(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    settings: RunSettings,
    *,
    evaluate: Callable[[], Dict[str, Any]],
    weights: str = "",
    resume: bool = False,
    strict: bool = False,
    grad_clip: Optional[GradClip] = None,
    timings: Optional[Dict[str, float]] = None,
) -> Dict[str, Any]:
    """Train ``model`` (already on its device and wrapped for DDP) as described in the module
    docstring.

    Args:
        lr_scheduler: an fvcore ``ParamScheduler`` (multiplier, LazyConfig ``lr_multiplier``) or
            a built ``torch.optim.lr_scheduler`` (e.g. ``LRMultiplier``).
        evaluate: runs the evaluation, returns its results (called every
            ``settings.eval_period`` iterations and after the last one).
        weights: initial weights (any format the checkpointer reads; "" for none), loaded when
            there is nothing to resume from.
        strict: refuse initial weights that do not match the model completely.
        timings: if given, receives ``train_seconds`` (without evaluation) and ``eval_seconds``.
    Returns:
        the results of the last evaluation ({} when none ran).
    """
    timings = {} if timings is None else timings
    timings.update(train_seconds=0.0, eval_seconds=0.0)
    checkpointer: Optional[ConvMAECheckpointer] = None
    trainer = build_trainer(
        model,
        data_loader,
        optimizer,
        settings,
        last_checkpoint=lambda: (checkpointer.get_checkpoint_file() or "") if checkpointer else "",
        grad_clip=grad_clip,
    )
    loader_state = {"data_loader": data_loader} if hasattr(data_loader, "state_dict") else {}
    checkpointer = ConvMAECheckpointer(
        model, settings.output_dir, trainer=trainer, upgrade=upgrade_training_state, **loader_state
    )
    last_results: Dict[str, Any] = {}

    def run_evaluation() -> Dict[str, Any]:
        start = time.perf_counter()
        last_results.clear()
        last_results.update(evaluate())
        timings["eval_seconds"] += time.perf_counter() - start
        return dict(last_results)

    main = comm.is_main_process()
    trainer.register_hooks(
        standard_hooks(settings.seed, data_loader)
        + [
            LRScheduler(scheduler=lr_scheduler),
            hooks.PeriodicCheckpointer(checkpointer, **settings.checkpointer) if main else None,
            hooks.EvalHook(settings.eval_period, run_evaluation),
        ]
    )
    if main:  # saves killed mid-way left these
        remove_leftover_temp_files(settings.output_dir)
    if resume and resume_newest(checkpointer) is not None:
        start_iter = trainer.iter + 1  # the checkpoint holds the last finished iteration
    else:
        load_weights(checkpointer, weights, strict=strict)
        start_iter = 0
    if main:
        if resume:  # rows logged after the checkpoint: the resumed run logs them again
            # except the final evaluation of a completed run (logged at its max_iter, which is
            # start_iter when extending it from model_final): nothing logs that row again
            last = start_iter - 1
            if start_iter and _resumed_final_checkpoint(checkpointer):
                last = start_iter
            drop_metrics_after(os.path.join(settings.output_dir, "metrics.json"), last)
        # the writers (last hook) open metrics.json for appending: only once it was cut
        trainer.register_hooks([writer_hook(settings)])
    if start_iter >= settings.max_iter:
        logger.info(f"Nothing to train: start_iter={start_iter} >= max_iter={settings.max_iter}")
        return run_evaluation()
    logger.info(
        f"Training iterations {start_iter}..{settings.max_iter - 1} on {settings.device} in "
        f"{settings.precision_name}"
    )
    start = time.perf_counter()
    trainer.train(start_iter, settings.max_iter)
    timings["train_seconds"] = time.perf_counter() - start - timings["eval_seconds"]
    return dict(last_results)
