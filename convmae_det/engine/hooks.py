"""Training safeguards and counters: the non-finite loss policy, the fp16 steps the gradient
scaler skipped, the training samples skipped as unreadable, and the lr as a recipe states it.

The non-finite loss policy (:class:`FiniteLossGuard`) is applied by
:class:`convmae_det.engine.trainer.ConvMAETrainer` to the loss terms averaged over all processes
(so every process takes the same decision), before backward, so that a NaN / Inf never reaches
the weights:

* ``mode="stop"``: raise :class:`NonFiniteLossError` (iteration, offending terms, all terms, the
  last good checkpoint). The periodic checkpointer saved nothing at that iteration, so
  ``--resume`` continues from the last good checkpoint.
* ``mode="skip"``: log a warning, count it (``nonfinite_skipped`` in the metrics) and drop that
  batch (no backward, no optimizer step, BatchNorm statistics restored). After ``max_skips``
  skipped batches the run stops as in "stop".
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Mapping, Optional

import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.events import _CURRENT_STORAGE_STACK, get_event_storage

__all__ = [
    "AMPOverflowCounter",
    "FiniteLossGuard",
    "LRScheduler",
    "NonFiniteLossError",
    "SkippedSamplesCounter",
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
    """The non-finite loss policy of every job (see the module docstring).

    ``check(loss_dict, iteration)`` returns False for finite terms, True when the batch is to be
    skipped ("skip" mode: logged, counted as ``nonfinite_skipped`` in the event storage when
    there is one), and raises :class:`NonFiniteLossError` otherwise. The caller drops the skipped
    batch's update.

    Args:
        mode: "stop" or "skip".
        max_skips: "skip" mode stops after this many skipped batches in all (None: no limit;
            detection and segmentation).
        max_consecutive: "skip" mode stops at this many non-finite losses in a row (None: no
            limit; pretraining, as the official loop).
        last_checkpoint: returns the path of the last saved checkpoint (for the message).
        config_key: the config key of ``mode``, named in messages.
        advice: what else to try, appended to the message (e.g. a bf16 setting).
    Attributes:
        skipped: batches skipped so far; consecutive: non-finite losses in a row (both belong in
            a resume point where the run keeps them).
    """

    def __init__(
        self,
        *,
        mode: str = "stop",
        max_skips: Optional[int] = 10,
        max_consecutive: Optional[int] = None,
        last_checkpoint: Optional[Callable[[], str]] = None,
        config_key: str = "train.nonfinite_loss",
        advice: str = "",
    ):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"{config_key}={mode!r}; expected one of {NONFINITE_MODES}")
        self.mode, self.config_key, self.advice = mode, config_key, advice
        self.max_skips = None if max_skips is None else int(max_skips)
        self.max_consecutive = None if max_consecutive is None else int(max_consecutive)
        self.last_checkpoint = last_checkpoint
        self.skipped = 0
        self.consecutive = 0

    def _may_skip(self) -> bool:
        if self.mode != "skip":
            return False
        if self.max_skips is not None and self.skipped >= self.max_skips:
            return False
        return self.max_consecutive is None or self.consecutive < self.max_consecutive

    def check(self, loss_dict: Mapping[str, object], iteration: int) -> bool:
        bad = nonfinite_terms(loss_dict)
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        every = ", ".join(f"{k}={_value(v):.4g}" for k, v in loss_dict.items())
        if self._may_skip():
            self.skipped += 1
            limit = f"/{self.max_skips}" if self.max_skips is not None else ""
            logger.warning(
                f"Non-finite loss at iteration {iteration} ({terms}); batch skipped "
                f"({self.skipped}{limit}"
                + (f", {self.consecutive} in a row" if self.consecutive > 1 else "")
                + "), weights unchanged"
            )
            if _CURRENT_STORAGE_STACK:  # loops without detectron2's event storage count alone
                get_event_storage().put_scalar("nonfinite_skipped", self.skipped)
            return True
        ckpt = self.last_checkpoint() if self.last_checkpoint is not None else ""
        where = f"last good checkpoint: {ckpt}" if ckpt else "no checkpoint saved yet"
        what = f"Non-finite loss at iteration {iteration}"
        if self.mode == "skip" and self.max_skips is not None and self.skipped >= self.max_skips:
            what += f" after {self.skipped} skipped batches (the limit)"
        elif self.mode == "skip":
            what = (
                f"{self.consecutive} consecutive non-finite losses, the last at iteration "
                f"{iteration}"
            )
        todo = (
            f"Resume with --resume, lower the learning rate, or set {self.config_key}=skip to "
            "skip such batches"
            if self.mode == "stop"
            else "Resume with --resume or lower the learning rate"
        )
        raise NonFiniteLossError(
            f"{what}: {terms} (all terms: {every}). The weights were not updated with it; "
            f"{where}. {todo}" + (f"; {self.advice}" if self.advice else "") + "."
        )


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


class SkippedSamplesCounter(HookBase):
    """Log ``skipped_samples``: the training samples a loader with ``skip_bad_samples`` replaced
    because they could not be read (see :class:`convmae_det.data.ResumableTrainLoader`). Silent
    for loaders that do not skip."""

    def __init__(self, data_loader: object):
        self._loader = data_loader

    def after_step(self) -> None:
        if getattr(self._loader, "skip_bad_samples", False):
            count = int(getattr(self._loader, "num_skipped", 0))
            self.trainer.storage.put_scalar("skipped_samples", count, smoothing_hint=False)


class LRScheduler(hooks.LRScheduler):
    """detectron2's ``LRScheduler`` hook, logging the recipe's lr: a group with an ``lr_scale``
    (layer-wise decay) is logged as ``lr / lr_scale``, i.e. the base lr of the schedule; groups
    without one as detectron2 logs them. Same class name, so its checkpoint state (kept under the
    hook's class name) is interchangeable with detectron2's hook."""

    def after_step(self) -> None:
        group = self._optimizer.param_groups[self._best_param_group_id]
        lr = group["lr"] / group.get("lr_scale", 1.0)
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self.scheduler.step()
