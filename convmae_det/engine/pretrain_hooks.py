"""The hooks that make the one trainer a pretraining run (ConvMAE / FastConvMAE / MoR).

A pretraining run is :class:`~convmae_det.engine.trainer.ConvMAETrainer` (one iteration = one
micro-batch, ``accumulation`` of them per optimizer step, ``loss_key="loss"``) with detectron2's
``IterationTimer`` and ``PeriodicWriter`` and these hooks:

* :class:`EpochCosineLR`: the official per-iteration schedule, linear warm-up then half-cycle
  cosine over fractional epochs, set once per optimizer step;
* :class:`EMAUpdate`: the EMA targets of MoR after every optimizer step;
* :class:`PretrainCheckpointer`: the official-layout checkpoints (every ``checkpoint_period``
  epochs and the last one, resume points every ``checkpoint_period_iters`` iterations) and the
  wall-time budget (saves, then stops the run with :class:`TimeBudgetReached`).

Iteration ``g`` of the run is iteration ``g % iters`` of epoch ``g // iters``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["EMAUpdate", "EpochCosineLR", "PretrainCheckpointer", "TimeBudgetReached", "lr_at"]

logger = logging.getLogger(__name__)


class TimeBudgetReached(Exception):
    """Raised by :class:`PretrainCheckpointer` after saving, when ``max_minutes`` is spent."""


def lr_at(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at fractional ``epoch``: linear warm-up from 0, then half-cycle cosine."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EpochCosineLR(HookBase):
    """Set every group's lr to :func:`lr_at` ``(epoch + i / iters)`` before the first micro-batch
    of each optimizer step; log ``lr`` and the fractional ``epoch`` done."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        iters_per_epoch: int,
        accumulation: int,
        lr: float,
        min_lr: float,
        warmup_epochs: float,
        epochs: int,
    ):
        self._optimizer = optimizer
        self._iters, self._accum = int(iters_per_epoch), int(accumulation)
        self._schedule = dict(lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs)

    def before_step(self) -> None:
        if self.trainer.iter % self._accum:
            return
        epoch, i = divmod(self.trainer.iter, self._iters)
        lr = lr_at(epoch + i / self._iters, **self._schedule)
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def after_step(self) -> None:
        storage = self.trainer.storage
        storage.put_scalar("lr", self._optimizer.param_groups[0]["lr"], smoothing_hint=False)
        storage.put_scalar("epoch", (self.trainer.iter + 1) / self._iters, smoothing_hint=False)


class EMAUpdate(HookBase):
    """Call the model's ``update_ema(progress)`` (MoR targets) after every optimizer step, with
    ``progress`` = iterations done / iterations of the whole run."""

    def __init__(self, update_ema: Optional[Callable[[float], None]], total_iters: int):
        self._update = update_ema
        self._total = int(total_iters)

    def after_step(self) -> None:
        if self._update is not None and self.trainer.optimizer_stepped:
            self._update((self.trainer.iter + 1) / self._total)


class PretrainCheckpointer(HookBase):
    """After each optimizer step (a consistent state: no gradient accumulated), save what is
    due through ``save(epoch, epoch_iter)`` (``epoch_iter`` None: the epoch is complete):

    * the end of every ``checkpoint_period``-th epoch and of the last one: ``checkpoint-EEEE``;
    * every ``period_iters`` iterations inside an epoch: a resume point ``-iterIIIIII``;
    * once the wall-time ``deadline`` (``time.monotonic()``) passed on any process: the current
      position, then :class:`TimeBudgetReached` ends the run.
    """

    def __init__(
        self,
        save: Callable[[int, Optional[int]], str],
        *,
        iters_per_epoch: int,
        accumulation: int,
        epochs: int,
        checkpoint_period: int,
        period_iters: Optional[int],
        deadline: Optional[float],
    ):
        self._save = save
        self._iters, self._accum, self._epochs = int(iters_per_epoch), int(accumulation), epochs
        self._period = int(checkpoint_period)
        self._period_iters = None if period_iters is None else int(period_iters)
        self._deadline = deadline
        self.last_checkpoint: Optional[str] = None

    def _out_of_time(self) -> bool:
        if self._deadline is None:
            return False
        flag = torch.tensor(float(time.monotonic() > self._deadline))
        if comm.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag)  # any process out of time stops all of them
        return bool(flag.item() > 0)

    def after_step(self) -> None:
        it = self.trainer.iter
        if (it + 1) % self._accum:
            return
        epoch, done = it // self._iters, it % self._iters + 1
        stop = self._out_of_time()
        if done == self._iters and (
            (epoch + 1) % self._period == 0 or epoch + 1 == self._epochs or stop
        ):
            self.last_checkpoint = self._save(epoch, None)
        elif stop or (
            self._period_iters is not None
            and (epoch * self._iters + done) % self._period_iters == 0
        ):
            self.last_checkpoint = self._save(epoch, done)
        if stop:
            raise TimeBudgetReached(f"time budget reached in epoch {epoch}")
