"""The pretraining loop (ConvMAE / FastConvMAE / MoR): epochs over an image folder, AdamW with a
per-iteration warm-up + half-cycle cosine schedule, AMP with a non-finite-loss guard, DDP,
gradient accumulation, EMA-target updates, official-format checkpoints, exact resume (also
inside an epoch: the batch, augmentation and masks of iteration ``g`` depend only on the seeds
and ``g``), images/s + ETA.

Entry point: :func:`run_pretraining` with a config holding ``model`` (a module, or a LazyCall /
dict that :func:`detectron2.config.instantiate` builds) and ``train`` (keys of
:data:`PRETRAIN_DEFAULTS`). Distributed runs: start it from detectron2's ``launch`` or torchrun
(see ``tools/pretrain.py``); this module only reads the process group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from detectron2.utils import comm

from ..solver import build_param_groups
from .hooks import FiniteLossGuard, scaler_step
from .pretrain_checkpoint import checkpoint_name, find_last_checkpoint, load_pretrain_checkpoint
from .pretrain_checkpoint import plain_args, prune_iteration_checkpoints, restore_pretraining
from .pretrain_checkpoint import save_pretrain_checkpoint
from .pretrain_data import ImageFiles, build_pretrain_loader, build_pretrain_transform
from .pretrain_data import iters_per_epoch, resolve_data_path
from .reproducibility import derive_seed, resolve_run_seed, seed_everything
from .resume import decide_on_main_process, drop_metrics_after, remove_leftover_temp_files
from .settings import amp_precision, resolve_device

__all__ = [
    "PRETRAIN_DEFAULTS",
    "pretrain_param_groups",
    "lr_at",
    "PretrainRunner",
    "run_pretraining",
]

logger = logging.getLogger(__name__)

PRETRAIN_DEFAULTS: Dict[str, Any] = dict(
    output_dir="output/pretrain",  # checkpoints, log.txt, metrics.jsonl
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


def lr_at(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at fractional ``epoch``: linear warm-up from 0, then half-cycle cosine."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


class _Meter:
    """Window averages of the logged scalars plus the throughput / ETA bookkeeping."""

    def __init__(self, total_iters: int, images_per_iter: int):
        self.total_iters = total_iters
        self.images_per_iter = images_per_iter
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.done = 0
        self.tic = time.perf_counter()
        self.iter_time = None

    def add(self, values: Dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.done += 1

    def flush(self) -> Dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.tic, 1e-9)
        self.iter_time = elapsed / max(self.count, 1)
        stats = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        stats["img_per_s"] = self.count * self.images_per_iter / elapsed
        stats["eta_s"] = self.iter_time * max(self.total_iters - self.done, 0)
        self.sums, self.count, self.tic = {}, 0, now
        return stats


def _build(cfg: Mapping[str, Any]) -> nn.Module:
    model = cfg["model"]
    if isinstance(model, nn.Module):
        return model
    from detectron2.config import instantiate

    return instantiate(model)


class PretrainRunner:
    """Holds the model, data, optimizer and scaler of one pretraining run; :meth:`run` trains.

    Steps of one iteration: the batch of global iteration ``g`` (a function of the data seed and
    ``g``), every generator reseeded from ``(seed, rank, g)`` (random masks, drop-path), lr from
    the schedule (once per optimizer step), forward under autocast, one all-reduce of the loss
    values (the mean across processes, for the log and the non-finite guard) and of the
    time-budget flag, backward (skipped on every process when any loss is non-finite),
    optimizer + scaler step every ``accum_iter`` iterations, EMA update, and a checkpoint when
    one is due (only after an optimizer step, so no accumulated gradient is lost).

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
        amp_dtype = amp_precision(
            bool(opt["amp"]),
            opt["amp_dtype"],
            device=self.device.type,
            enabled_key="train.amp",
            precision_key="train.amp_dtype",
        )
        self.use_amp = amp_dtype is not None
        self.amp_dtype = amp_dtype or torch.bfloat16  # autocast's argument (unused when off)
        fp16 = amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.amp_overflows = 0  # fp16 steps the scaler skipped (inf / NaN gradients)

        # skip a non-finite step, give up at max_nonfinite in a row (as the official loop)
        self.guard = FiniteLossGuard(
            mode="skip",
            max_skips=None,
            max_consecutive=int(opt["max_nonfinite"]),
            last_checkpoint=lambda: getattr(self, "last_checkpoint", None) or "",
            config_key="train.max_nonfinite",
            advice="or use train.amp_dtype='bfloat16'",
        )
        self.start_epoch, self.start_iter, self.resumed_from = 0, 0, None
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
        ``metrics.jsonl`` rows logged after the checkpoint (the resumed run logs them again)."""
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
            self.loader.load_state_dict(state["loader"])
            self.guard.consecutive = int(state.get("nonfinite", 0))
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
        """Main process: drop the ``metrics.jsonl`` rows past ``step`` iterations done."""
        if self.rank == 0:
            drop_metrics_after(os.path.join(self.out_dir, "metrics.jsonl"), step, key="step")

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

    # ------------------------------------------------------------------ one iteration
    def _set_lr(self, epoch_float: float) -> None:
        lr = lr_at(
            epoch_float,
            lr=self.lr,
            min_lr=self.opt["min_lr"],
            warmup_epochs=self.opt["warmup_epochs"],
            epochs=self.epochs,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _reduce(self, out: Dict[str, torch.Tensor]) -> Tuple[Dict[str, float], bool]:
        """Process-mean of every ``loss*`` output, and whether any process ran out of time."""
        names = sorted(k for k in out if k.startswith("loss"))
        wants_stop = self.deadline is not None and time.monotonic() > self.deadline
        values = [out[k].detach().float().reshape(()) for k in names]
        values = torch.stack(values + [torch.tensor(float(wants_stop), device=self.device)])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        values = values.tolist()
        return dict(zip(names, values[:-1])), values[-1] > 0

    def _optimizer_step(self, progress: float) -> None:
        if self.opt["clip_grad"] is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.opt["clip_grad"])
        if scaler_step(self.scaler, self.optimizer):
            self.amp_overflows += 1
            logger.info("fp16 overflow: step skipped by the scaler (%d so far)", self.amp_overflows)
        self.optimizer.zero_grad(set_to_none=True)
        update_ema = getattr(self.model, "update_ema", None)
        if update_ema is not None:
            update_ema(progress)

    def train_epoch(
        self, epoch: int, meter: "_Meter", batches: Iterator[torch.Tensor], first: int = 0
    ) -> bool:
        """Iterations ``first, ..., iters - 1`` of ``epoch``, reading ``batches`` (positioned at
        global iteration ``epoch * iters + first``). Writes the checkpoints that fall due.
        Returns True when the time budget stopped it early."""
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
        stop = False
        for i in range(first, self.iters):
            imgs = next(batches)
            seed_everything(derive_seed(self.seed, self.rank, epoch * self.iters + i))
            if i % self.accum == 0:
                self._set_lr(epoch + i / self.iters)
            step_now = (i + 1) % self.accum == 0
            no_sync = self.world > 1 and not step_now
            with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    out = self.ddp(imgs.to(self.device, non_blocking=True))
                stats, out_of_time = self._reduce(out)
                stop = stop or out_of_time
                # the one non-finite policy: skip, or raise at max_nonfinite in a row
                finite = not self.guard.check(stats, epoch * self.iters + i)
                if finite:
                    self.scaler.scale(out["loss"] / self.accum).backward()
                else:
                    self.optimizer.zero_grad(set_to_none=True)
            if step_now and finite:
                self._optimizer_step((epoch * self.iters + i + 1) / (self.epochs * self.iters))
            if finite:
                meter.add(dict(stats, lr=self.optimizer.param_groups[0]["lr"]))
                if (i + 1) % self.opt["log_period"] == 0 or i + 1 == self.iters or stop:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    s = meter.flush()
                    if self.rank == 0:
                        _log(s, epoch, self.epochs, i + 1, self.iters, metrics_path, self.device)
            if step_now:  # a consistent state: no gradient accumulated
                self._checkpoint_if_due(epoch, i + 1, stop)
                if stop:
                    break
        return stop

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_if_due(self, epoch: int, done: int, stop: bool) -> None:
        """After ``done`` iterations of ``epoch``: the epoch checkpoint every
        ``checkpoint_period`` epochs and at the last one (or at a budget stop on the epoch's
        end), else a resume point every ``checkpoint_period_iters`` iterations and at a budget
        stop."""
        end = done == self.iters
        if end and (
            (epoch + 1) % int(self.opt["checkpoint_period"]) == 0
            or epoch + 1 == self.epochs
            or stop
        ):
            self.last_checkpoint = self.save(epoch)
        elif stop or (
            self.period_iters is not None
            and (epoch * self.iters + done) % int(self.period_iters) == 0
        ):
            self.last_checkpoint = self.save(epoch, done)

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
                nonfinite=self.guard.consecutive,
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
        start = self.start_epoch * self.iters + self.start_iter
        meter = _Meter(self.epochs * self.iters - start, self.per_device * self.world)
        self.last_checkpoint = self.resumed_from
        self.loader.set_start_iter(start)
        batches = iter(self.loader)
        try:
            for epoch in range(self.start_epoch, self.epochs):
                first = self.start_iter if epoch == self.start_epoch else 0
                if self.train_epoch(epoch, meter, batches, first):
                    logger.info(
                        "Time budget of %s min reached in epoch %d", opt["max_minutes"], epoch
                    )
                    break
        finally:
            batches.close()  # stops the loader's worker processes
        return self.last_checkpoint


def run_pretraining(cfg: Mapping[str, Any]) -> Optional[str]:
    """Train as configured (see :data:`PRETRAIN_DEFAULTS` for ``cfg["train"]``); returns the
    path of the last checkpoint written (or resumed from), on every process.

    With ``max_minutes`` the run stops once the budget is spent (after the current optimizer
    step) and saves where it is, so ``resume`` continues from that iteration.
    """
    return PretrainRunner(cfg).run()


def _log(s: Dict[str, float], epoch: int, epochs: int, it: int, iters: int, path: str, device):
    losses = "  ".join(f"{k}: {v:.4f}" for k, v in s.items() if k.startswith("loss"))
    mem = ""
    if device.type == "cuda":
        mem = f"  max_mem: {torch.cuda.max_memory_allocated(device) / 2**20:.0f}M"
    logger.info(
        "epoch: %d/%d  iter: %d/%d  %s  lr: %.3e  img/s: %.1f  eta: %s%s",
        epoch,
        epochs,
        it,
        iters,
        losses,
        s["lr"],
        s["img_per_s"],
        str(timedelta(seconds=int(s["eta_s"]))),
        mem,
    )
    with open(path, "a") as f:
        f.write(json.dumps(dict(s, epoch=epoch, iter=it, step=epoch * iters + it)) + "\n")
