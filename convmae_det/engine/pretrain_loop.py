"""Pretraining runs (ConvMAE / FastConvMAE / MoR) on the one trainer: epochs over an image
folder, AdamW with a per-iteration warm-up + half-cycle cosine schedule, AMP with the non-finite
loss policy, DDP, gradient accumulation, EMA-target updates, official-format checkpoints, exact
resume (also inside an epoch: the batch, augmentation and masks of iteration ``g`` depend only on
the seeds and ``g``), console with ETA, ``metrics.json`` and tensorboard like every other job.

:class:`PretrainRunner` builds what is pretraining's own (model, image data, MAE parameter groups,
the official checkpoint layout and its resume) and trains with
:class:`~convmae_det.engine.trainer.ConvMAETrainer` and the hooks of
:mod:`~convmae_det.engine.pretrain_hooks`.

Entry point: :func:`run_pretraining` with a config holding ``model`` (a module, or a LazyCall /
dict that :func:`detectron2.config.instantiate` builds) and ``train`` (keys of
:data:`PRETRAIN_DEFAULTS`). Distributed runs: start it from detectron2's ``launch`` or torchrun
(see ``tools/pretrain.py``); this module only reads the process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from functools import partial
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from detectron2.utils import comm

from ..solver import build_param_groups
from .pretrain_hooks import EMAUpdate, EpochCosineLR, PretrainCheckpointer, TimeBudgetReached, lr_at
from .pretrain_checkpoint import checkpoint_name, find_last_checkpoint, load_pretrain_checkpoint
from .pretrain_checkpoint import plain_args, prune_iteration_checkpoints, restore_pretraining
from .pretrain_checkpoint import save_pretrain_checkpoint
from .pretrain_data import ImageFiles, build_pretrain_loader, build_pretrain_transform
from .pretrain_data import iters_per_epoch, resolve_data_path
from .reproducibility import resolve_run_seed
from .resume import decide_on_main_process, drop_metrics_after, remove_leftover_temp_files
from .settings import RunSettings, resolve_device
from .trainer import ConvMAETrainer, build_trainer
from .training import standard_hooks, writer_hook

__all__ = [
    "PRETRAIN_DEFAULTS",
    "pretrain_param_groups",
    "lr_at",
    "PretrainRunner",
    "run_pretraining",
]

logger = logging.getLogger(__name__)

PRETRAIN_DEFAULTS: Dict[str, Any] = dict(
    output_dir="output/pretrain",  # checkpoints, log.txt, metrics.json, tensorboard events
    data_path=None,  # ImageFolder root or flat image folder; None: generated toy images
    img_size=224,  # RandomResizedCrop output size (any multiple of 16)
    crop_scale=(0.2, 1.0),  # RandomResizedCrop area range
    batch_size=512,  # images per optimizer step over all processes and accumulation steps
    accum_iter=1,  # gradient accumulation steps per optimizer step
    blr=1.5e-4,  # base lr; lr = blr * batch_size / 256
    min_lr=0.0,  # end of the cosine
    weight_decay=0.05,  # none on 1-D parameters (norms, biases)
    betas=(0.9, 0.95),  # AdamW
    epochs=1600,
    warmup_epochs=40,  # linear warm-up from 0, per iteration
    clip_grad=None,  # max grad norm, None: no clipping (official)
    amp=True,  # autocast on CUDA (ignored on CPU)
    amp_dtype="float16",  # "float16" (with GradScaler, official) or "bfloat16"
    max_nonfinite=10,  # consecutive non-finite losses (skipped steps) before giving up
    num_workers=8,  # data loader workers per process
    skip_bad_samples=False,  # True: log, count and replace unreadable images instead of stopping
    seed=0,  # data order, augmentation and masks (per iteration); < 0: random (kept on resume)
    device="auto",  # "auto" (cuda if available), "cpu", "cuda"
    log_period=20,  # iterations between log lines
    checkpoint_period=20,  # epochs between checkpoints (the last epoch is always saved)
    checkpoint_period_iters=None,  # also a resume point every N iterations (inside epochs)
    keep_iter_checkpoints=2,  # newest resume points kept (None: all); epoch files always kept
    max_minutes=None,  # stop (and save) once this much wall time has passed
    init_checkpoint=None,  # weights to start from (non-strict), e.g. an official release
    resume=False,  # continue from the newest checkpoint in output_dir (exactly) if present
    resume_from=None,  # or from this checkpoint file
)


def pretrain_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups ``[no_decay, decay]`` of MAE's ``param_groups_weight_decay`` (the official
    code's ``timm.optim_factory.add_weight_decay``): trainable parameters with ``ndim <= 1`` (norms,
    biases) get no weight decay, every other one does (no named tables); frozen ones are left
    out. No ``lr`` entry: the optimizer's default, set per step by the schedule."""
    return build_param_groups(
        model,
        weight_decay=weight_decay,
        no_decay_rule="ndim",
        no_decay_names=(),
        no_decay_first=True,
    )


def _options(train: Mapping[str, Any]) -> Dict[str, Any]:
    opts = dict(PRETRAIN_DEFAULTS)
    given = plain_args(train)
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise KeyError(f"unknown train options {unknown}; expected keys of PRETRAIN_DEFAULTS")
    opts.update(given)
    return opts


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    name = resolve_device(name, key="train.device")
    if name == "cuda":
        return torch.device("cuda", comm.get_local_rank() if dist.is_initialized() else 0)
    return torch.device(name)


def _build(cfg: Mapping[str, Any]) -> nn.Module:
    model = cfg["model"]
    if isinstance(model, nn.Module):
        return model
    from detectron2.config import instantiate

    return instantiate(model)


class PretrainRunner:
    """Holds the model, data, optimizer and scaler of one pretraining run; :meth:`run` trains.

    Steps of one iteration (one micro-batch): every generator reseeded from ``(seed, rank, g)``
    (random masks, drop-path; ``IterationSeeder``), lr from the schedule (once per optimizer
    step; ``EpochCosineLR``), the batch of global iteration ``g`` (a function of the data seed
    and ``g``), forward under autocast, one all-reduce of the loss terms (the mean across
    processes, for the log and the non-finite policy), backward (skipped on every process when
    the loss is non-finite), optimizer + scaler step every ``accum_iter`` iterations (the
    trainer), EMA update (``EMAUpdate``), and a checkpoint when one is due, or when the time
    budget is spent (``PretrainCheckpointer``, after an optimizer step only, so no accumulated
    gradient is lost).

    Resuming therefore repeats the uninterrupted run exactly, also from inside an epoch.
    """

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        self.opt = opt = _options(cfg.get("train", {}))
        self.rank, self.world = comm.get_rank(), comm.get_world_size()
        self.device = _device(opt["device"])
        self.seed = resolve_run_seed(opt["seed"])
        torch.manual_seed(self.seed + self.rank)
        self.out_dir = opt["output_dir"]
        os.makedirs(self.out_dir, exist_ok=True)

        self.accum = int(opt["accum_iter"])
        self.per_device, rest = divmod(int(opt["batch_size"]), self.world * self.accum)
        if rest or self.per_device < 1:
            raise ValueError(
                f"train.batch_size={opt['batch_size']} is not divisible into {self.world} "
                f"processes x {self.accum} accumulation steps"
            )
        self.period_iters = opt["checkpoint_period_iters"]
        if self.period_iters is not None and (
            int(self.period_iters) < 1 or int(self.period_iters) % self.accum
        ):
            raise ValueError(
                f"train.checkpoint_period_iters={self.period_iters}: expected None or a positive "
                f"multiple of train.accum_iter={self.accum} (checkpoints follow optimizer steps)"
            )
        self.lr = opt["blr"] * opt["batch_size"] / 256
        self.model = _build(cfg).to(self.device)
        if opt["init_checkpoint"]:
            self._init_from(opt["init_checkpoint"])
        self._build_data()
        self.epochs = int(opt["epochs"])
        self.iters = iters_per_epoch(len(self.dataset), self.per_device * self.world)
        self.iters = self.iters // self.accum * self.accum
        if self.iters == 0:
            raise ValueError(
                f"{len(self.dataset)} images give no full step of {self.per_device} x {self.accum}"
            )
        self.optimizer = torch.optim.AdamW(
            pretrain_param_groups(self.model, opt["weight_decay"]),
            lr=self.lr,
            betas=tuple(opt["betas"]),
        )
        # device, precision, the official non-finite rule (skip, give up at max_nonfinite in a
        # row), seed, periods: the run settings every job has
        self.settings = RunSettings.from_pretrain(
            opt, device=str(self.device), max_iter=self.epochs * self.iters, seed=self.seed
        )
        self.use_amp = self.settings.precision is not None
        fp16 = self.settings.precision == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.nonfinite_in_a_row = 0  # restored by a resume
        self.trainer: Optional[ConvMAETrainer] = None  # built by run()
        self.start_epoch, self.start_iter, self.resumed_from = 0, 0, None
        self.checkpointer: Optional[PretrainCheckpointer] = None  # built by run()
        self._resume()
        self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.deadline = None
        if opt["max_minutes"] is not None:
            self.deadline = time.monotonic() + 60.0 * float(opt["max_minutes"])

    def _init_from(self, path: str) -> None:
        result = self.model.load_state_dict(load_pretrain_checkpoint(path)["model"], strict=False)
        logger.info(
            "Initialised from %s: missing %s, unexpected %s",
            path,
            result.missing_keys,
            result.unexpected_keys,
        )

    def _resume(self) -> None:
        """Restore from ``resume_from`` or the newest readable checkpoint of ``output_dir``
        (chosen on the main process: a stale or unreadable ``last_checkpoint`` is repaired).
        Also removes the ``.tmp-*`` files of killed saves, and on a resume the
        ``metrics.json`` rows logged after the checkpoint (the resumed run logs them again)."""
        if self.rank == 0:
            remove_leftover_temp_files(self.out_dir)
        path = self.opt["resume_from"]
        if not path and self.opt["resume"]:
            path = decide_on_main_process(lambda: find_last_checkpoint(self.out_dir, repair=True))
        if not path:
            if self.opt["resume"]:
                self._drop_metrics_after(0)
            return
        point = restore_pretraining(
            path, model=self.model, optimizer=self.optimizer, scaler=self.scaler
        )
        state = point.train_state
        if state:
            if int(state["seed"]) != self.seed:
                logger.info("Run seed %d from %s (config: %d)", state["seed"], path, self.seed)
            self.seed = int(state["seed"])
            self.settings = dataclasses.replace(self.settings, seed=self.seed)
            self.loader.load_state_dict(state["loader"])
            self.nonfinite_in_a_row = int(state.get("nonfinite", 0))
            if int(state["iters_per_epoch"]) != self.iters:
                logger.warning(
                    "%s was written with %d iterations per epoch, this run has %d (other batch "
                    "size, processes or data?): the resumed run will not repeat the original",
                    path,
                    state["iters_per_epoch"],
                    self.iters,
                )
        self.start_epoch, self.start_iter = point.epoch, point.epoch_iter
        if self.start_iter >= self.iters:
            self.start_epoch, self.start_iter = self.start_epoch + 1, 0
        self.resumed_from = path
        self._drop_metrics_after(self.start_epoch * self.iters + self.start_iter)

    def _drop_metrics_after(self, step: int) -> None:
        """Main process: drop the ``metrics.json`` rows past ``step`` iterations done."""
        if self.rank == 0:
            drop_metrics_after(os.path.join(self.out_dir, "metrics.json"), step - 1)

    def _build_data(self) -> None:
        opt = self.opt
        if self.rank == 0:  # the others wait while rank 0 writes toy images if needed
            resolve_data_path(opt["data_path"], self.out_dir)
        comm.synchronize()
        self.data_path = resolve_data_path(opt["data_path"], self.out_dir)
        transform = build_pretrain_transform(opt["img_size"], opt["crop_scale"])
        self.dataset = ImageFiles(self.data_path, transform)
        self.loader = build_pretrain_loader(
            self.dataset,
            batch_size=self.per_device,
            num_workers=opt["num_workers"],
            seed=self.seed,
            pin_memory=self.device.type == "cuda",
            skip_bad_samples=bool(opt["skip_bad_samples"]),
        )

    def save(self, epoch: int, epoch_iter: Optional[int] = None) -> str:
        """Write ``checkpoint-EEEE.pth`` (``epoch`` done) or, with ``epoch_iter``,
        ``checkpoint-EEEE-iterIIIIII.pth`` (that many iterations of ``epoch`` done)."""
        path = os.path.join(self.out_dir, checkpoint_name(epoch, epoch_iter))
        if self.rank == 0:
            model_cfg = self.cfg["model"]
            if isinstance(model_cfg, nn.Module):
                model_cfg = type(model_cfg).__name__
            state = dict(
                epoch_iter=self.iters if epoch_iter is None else int(epoch_iter),
                iters_per_epoch=self.iters,
                seed=self.seed,
                loader=self.loader.state_dict(),
                nonfinite=(
                    self.trainer.guard.consecutive if self.trainer else self.nonfinite_in_a_row
                ),
            )
            save_pretrain_checkpoint(
                path,
                model=self.model,
                optimizer=self.optimizer,
                epoch=epoch,
                scaler=self.scaler,
                args={"train": self.opt, "model": model_cfg},
                extra={"train_state": state},
            )
            logger.info("Saved %s", path)
            for old in prune_iteration_checkpoints(self.out_dir, self.opt["keep_iter_checkpoints"]):
                logger.info("Removed %s", old)
        comm.synchronize()
        return path

    def _hooks(self, total: int) -> list:
        opt = self.opt
        # seeding (also positions the loader on resume), AMP overflows, skipped samples, timer
        hooks = standard_hooks(self.settings.seed, self.loader) + [
            EpochCosineLR(
                self.optimizer,
                iters_per_epoch=self.iters,
                accumulation=self.accum,
                lr=self.lr,
                min_lr=opt["min_lr"],
                warmup_epochs=opt["warmup_epochs"],
                epochs=self.epochs,
            ),
            EMAUpdate(getattr(self.model, "update_ema", None), total),
            self.checkpointer,
        ]
        if self.rank == 0:
            hooks.append(writer_hook(self.settings))
        return hooks

    def run(self) -> Optional[str]:
        opt = self.opt
        logger.info(
            "Pretraining %s: %d images from %s, epoch %d iteration %d to epoch %d, %d steps per "
            "epoch of %d images (%d/process x %d processes x %d accumulation), lr %.3g, amp %s, "
            "seed %d",
            type(self.model).__name__,
            len(self.dataset),
            self.data_path,
            self.start_epoch,
            self.start_iter,
            self.epochs - 1,
            self.iters // self.accum,
            opt["batch_size"],
            self.per_device,
            self.world,
            self.accum,
            self.lr,
            self.use_amp and opt["amp_dtype"],
            self.seed,
        )
        start, total = self.start_epoch * self.iters + self.start_iter, self.epochs * self.iters
        clip = opt["clip_grad"]
        batches = _OnDevice(self.loader, self.device)
        trainer = build_trainer(
            self.ddp,
            batches,
            self.optimizer,
            self.settings,
            last_checkpoint=lambda: (
                self.checkpointer.last_checkpoint if self.checkpointer else self.resumed_from
            )
            or "",
            grad_clip=None if clip is None else partial(nn.utils.clip_grad_norm_, max_norm=clip),
            accumulation=self.accum,
            loss_key="loss",
            grad_scaler=self.scaler,
        )
        trainer.guard.consecutive = self.nonfinite_in_a_row
        self.trainer = trainer
        self.checkpointer = PretrainCheckpointer(
            self.save,
            iters_per_epoch=self.iters,
            accumulation=self.accum,
            epochs=self.epochs,
            checkpoint_period=self.settings.checkpointer["period_epochs"],
            period_iters=self.settings.checkpointer["period_iters"],
            deadline=self.deadline,
        )
        self.checkpointer.last_checkpoint = self.resumed_from
        trainer.register_hooks(self._hooks(total))
        if start >= total:
            logger.info("Nothing to train: iteration %d of %d", start, total)
            return self.resumed_from
        try:
            with _quiet_budget_stop():
                trainer.train(start, total)
        except TimeBudgetReached:
            logger.info(
                "Time budget of %s min reached in epoch %d",
                opt["max_minutes"],
                trainer.iter // self.iters,
            )
        finally:
            batches.close()  # stops the loader's worker processes
        return self.checkpointer.last_checkpoint


class _OnDevice:
    """The pretraining loader's batches moved to ``device`` (the trainer feeds the model as it
    comes); ``close()`` stops the loader's iterator and its worker processes."""

    def __init__(self, loader, device: torch.device):
        self._loader, self._device, self._iter = loader, device, None

    def __iter__(self):
        self._iter = iter(self._loader)
        for imgs in self._iter:
            yield imgs.to(self._device, non_blocking=True)

    def close(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()


class _DropBudgetStop(logging.Filter):
    """detectron2's trainer logs every exception that ends ``train()`` with its traceback; the
    time budget is a planned stop, logged by the runner in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, TimeBudgetReached)


@contextlib.contextmanager
def _quiet_budget_stop():
    train_logger = logging.getLogger("detectron2.engine.train_loop")
    flt = _DropBudgetStop()
    train_logger.addFilter(flt)
    try:
        yield
    finally:
        train_logger.removeFilter(flt)


def run_pretraining(cfg: Mapping[str, Any]) -> Optional[str]:
    """Train as configured (see :data:`PRETRAIN_DEFAULTS` for ``cfg["train"]``); returns the
    path of the last checkpoint written (or resumed from), on every process.

    With ``max_minutes`` the run stops once the budget is spent (after the current optimizer
    step) and saves where it is, so ``resume`` continues from that iteration.
    """
    return PretrainRunner(cfg).run()
