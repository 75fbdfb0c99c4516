"""Training-loop safeguards: a non-finite loss check that names the iteration and the loss terms,
and a counter of the fp16 steps the gradient scaler skipped.

detectron2's ``SimpleTrainer`` writes the metrics (``_write_metrics``) after ``backward`` and
before ``optimizer.step``; :func:`install_finite_loss_check` checks the loss terms there (averaged
over all processes, so every process takes the same decision), so that a NaN / Inf never reaches
the weights:

* ``mode="stop"``: raise :class:`NonFiniteLossError` (iteration, offending terms, all terms, the
  last good checkpoint). The periodic checkpointer saved nothing at that iteration, so
  ``--resume`` continues from the last good checkpoint.
* ``mode="skip"``: log a warning, count it (``nonfinite_skipped`` in the metrics) and drop the
  gradients of that batch (no parameter changes; with an fp16 scaler, the scaler skips the
  step). After ``max_skips`` skipped batches the run stops as in "stop".

The decision itself is :class:`FiniteLossGuard`, which loops without a ``SimpleTrainer`` (the
segmentation loop) call directly.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Mapping, Optional

import torch
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = [
    "AMPOverflowCounter",
    "FiniteLossGuard",
    "NonFiniteLossError",
    "install_finite_loss_check",
    "mean_over_processes",
    "scaler_step",
    "nonfinite_terms",
]

logger = logging.getLogger(__name__)

NONFINITE_MODES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the iteration and the loss terms."""


def _value(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def nonfinite_terms(loss_dict: Mapping[str, object]) -> Dict[str, float]:
    """The loss terms of ``loss_dict`` that are NaN or infinite, with their values."""
    values = {k: _value(v) for k, v in loss_dict.items()}
    return {k: v for k, v in values.items() if not math.isfinite(v)}


def mean_over_processes(loss_dict: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Loss terms averaged over all processes, on every process. A NaN / Inf on any process is
    seen by all of them, so all take the same decision (with DDP the gradients are all-reduced:
    one bad process poisons every replica, and a process that stopped alone would hang the
    others)."""
    names = sorted(loss_dict)
    values = torch.stack([torch.as_tensor(loss_dict[k]).detach().float() for k in names])
    world = comm.get_world_size()
    if world > 1:
        torch.distributed.all_reduce(values)
        values = values / world
    return dict(zip(names, values.tolist()))


class FiniteLossGuard:
    """The non-finite loss decision for any training loop (see the module docstring).

    ``check(loss_dict, iteration)`` returns False for finite terms, True when the batch is to be
    skipped ("skip" mode: logged, counted as ``nonfinite_skipped`` in the event storage), and
    raises :class:`NonFiniteLossError` otherwise. The caller drops the skipped batch's update.

    Args:
        mode: "stop" or "skip".
        max_skips: "skip" mode stops after this many skipped batches.
        last_checkpoint: returns the path of the last saved checkpoint (for the message).
        config_key: the config key of ``mode``, named in messages.
    """

    def __init__(
        self,
        *,
        mode: str = "stop",
        max_skips: int = 10,
        last_checkpoint: Optional[Callable[[], str]] = None,
        config_key: str = "train.nonfinite_loss",
    ):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"{config_key}={mode!r}; expected one of {NONFINITE_MODES}")
        self.mode, self.max_skips, self.config_key = mode, int(max_skips), config_key
        self.last_checkpoint = last_checkpoint
        self.skipped = 0

    def check(self, loss_dict: Mapping[str, object], iteration: int) -> bool:
        bad = nonfinite_terms(loss_dict)
        if not bad:
            return False
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        every = ", ".join(f"{k}={_value(v):.4g}" for k, v in loss_dict.items())
        if self.mode == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            logger.warning(
                f"Non-finite loss at iteration {iteration} ({terms}); batch skipped "
                f"({self.skipped}/{self.max_skips}), weights unchanged"
            )
            get_event_storage().put_scalar("nonfinite_skipped", self.skipped)
            return True
        ckpt = self.last_checkpoint() if self.last_checkpoint is not None else ""
        where = f"last good checkpoint: {ckpt}" if ckpt else "no checkpoint saved yet"
        raise NonFiniteLossError(
            f"Non-finite loss at iteration {iteration}: {terms} (all terms: {every}). "
            f"The weights were not updated with it; {where}. Resume with --resume, lower "
            f"the learning rate, or set {self.config_key}=skip to skip such batches."
        )


def install_finite_loss_check(
    trainer: SimpleTrainer,
    *,
    mode: str = "stop",
    max_skips: int = 10,
    last_checkpoint: Optional[Callable[[], str]] = None,
) -> None:
    """Check every iteration's loss terms before the optimizer step (see the module docstring).

    Args:
        trainer: a detectron2 ``SimpleTrainer`` (or subclass, e.g. the AMP trainers).
        mode: "stop" or "skip".
        max_skips: "skip" mode stops after this many skipped batches.
        last_checkpoint: returns the path of the last saved checkpoint (for the message).
    """
    guard = FiniteLossGuard(mode=mode, max_skips=max_skips, last_checkpoint=last_checkpoint)
    write_metrics = trainer._write_metrics  # bound method of the trainer's class

    def checked_write_metrics(loss_dict, data_time, prefix="", iter=None):
        if guard.check(mean_over_processes(loss_dict), trainer.iter if iter is None else iter):
            scaler = getattr(trainer, "grad_scaler", None)
            if scaler is None or not scaler.is_enabled():
                trainer.optimizer.zero_grad(set_to_none=True)
            return None
        return write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)

    trainer._write_metrics = checked_write_metrics


def scaler_step(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)`` + ``scaler.update()``. Returns True when the fp16 scaler skipped
    the step because of inf / NaN gradients (it then lowers its scale), for the loops that count
    overflow steps (``amp_overflow_steps``)."""
    before = float(scaler.get_scale()) if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return before is not None and float(scaler.get_scale()) < before


class AMPOverflowCounter(HookBase):
    """Count the iterations whose fp16 step the gradient scaler skipped (inf/NaN gradients, the
    scale is then lowered) and log the total as ``amp_overflow_steps``."""

    def __init__(self):
        self.overflows = 0
        self._scale: Optional[float] = None

    def _scaler(self):
        scaler = getattr(self.trainer, "grad_scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def before_step(self) -> None:
        scaler = self._scaler()
        self._scale = float(scaler.get_scale()) if scaler is not None else None

    def after_step(self) -> None:
        scaler = self._scaler()
        if scaler is None or self._scale is None:
            return
        if float(scaler.get_scale()) < self._scale:
            self.overflows += 1
            logger.info(f"fp16 overflow at iteration {self.trainer.iter}: step skipped by scaler")
        self.trainer.storage.put_scalar("amp_overflow_steps", self.overflows)

    def state_dict(self) -> dict:
        return {"overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.overflows = int(state.get("overflows", 0))
