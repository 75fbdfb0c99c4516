"""The pretraining loop (ConvMAE / FastConvMAE / MoR): epochs over an image folder, AdamW with a
per-iteration warm-up + half-cycle cosine schedule, AMP with a non-finite-loss guard, DDP,
gradient accumulation, EMA-target updates, official-format checkpoints, resume, images/s + ETA.

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
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from detectron2.utils import comm

from .pretrain_checkpoint import find_last_checkpoint, load_pretrain_checkpoint
from .pretrain_checkpoint import plain_args, resume_pretraining, save_pretrain_checkpoint
from .pretrain_data import ImageFiles, build_pretrain_loader, build_pretrain_transform
from .pretrain_data import resolve_data_path

__all__ = [
    "PRETRAIN_DEFAULTS",
    "pretrain_param_groups",
    "lr_at",
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
    seed=0,
    device="auto",  # "auto" (cuda if available), "cpu", "cuda"
    log_period=20,  # iterations between log lines
    checkpoint_period=20,  # epochs between checkpoints (the last epoch is always saved)
    max_minutes=None,  # stop (and save) once this much wall time has passed
    init_checkpoint=None,  # weights to start from (non-strict), e.g. an official release
    resume=False,  # continue from output_dir/last_checkpoint if present
    resume_from=None,  # or from this checkpoint file
)


def pretrain_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: trainable parameters with ``ndim <= 1`` (norms, biases) get no weight decay
    (as ``timm.optim_factory.add_weight_decay`` in the official code); frozen ones are left out."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


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
    if name == "cuda":
        return torch.device("cuda", comm.get_local_rank() if dist.is_initialized() else 0)
    return torch.device(name)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _Meter:
    """Window averages of the logged scalars plus the throughput / ETA bookkeeping."""

    def __init__(self, total_iters: int, images_per_iter: int):
        self.total_iters = total_iters
        self.images_per_iter = images_per_iter
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.tic = time.perf_counter()
        self.iter_time = None

    def add(self, values: Dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self, done_iters: int) -> Dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.tic, 1e-9)
        self.iter_time = elapsed / max(self.count, 1)
        stats = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        stats["img_per_s"] = self.count * self.images_per_iter / elapsed
        stats["eta_s"] = self.iter_time * max(self.total_iters - done_iters, 0)
        self.sums, self.count, self.tic = {}, 0, now
        return stats


def _build(cfg: Mapping[str, Any]) -> nn.Module:
    model = cfg["model"]
    if isinstance(model, nn.Module):
        return model
    from detectron2.config import instantiate

    return instantiate(model)


def run_pretraining(cfg: Mapping[str, Any]) -> str:
    """Train as configured; returns the path of the last checkpoint written (on every rank)."""
    opt = _options(cfg.get("train", {}))
    rank, world = comm.get_rank(), comm.get_world_size()
    device = _device(opt["device"])
    torch.manual_seed(opt["seed"] + rank)
    out_dir = opt["output_dir"]
    os.makedirs(out_dir, exist_ok=True)

    accum = int(opt["accum_iter"])
    per_device, rest = divmod(int(opt["batch_size"]), world * accum)
    if rest or per_device < 1:
        raise ValueError(
            f"train.batch_size={opt['batch_size']} is not divisible into {world} processes x "
            f"{accum} accumulation steps"
        )
    lr = opt["blr"] * opt["batch_size"] / 256

    model = _build(cfg).to(device)
    if opt["init_checkpoint"]:
        state = load_pretrain_checkpoint(opt["init_checkpoint"])["model"]
        result = model.load_state_dict(state, strict=False)
        logger.info(
            "Initialised from %s: missing %s, unexpected %s",
            opt["init_checkpoint"],
            result.missing_keys,
            result.unexpected_keys,
        )

    if rank == 0:
        data_path = resolve_data_path(opt["data_path"], out_dir)
    comm.synchronize()
    data_path = resolve_data_path(opt["data_path"], out_dir) if rank else data_path
    dataset = ImageFiles(data_path, build_pretrain_transform(opt["img_size"], opt["crop_scale"]))
    loader = build_pretrain_loader(
        dataset,
        batch_size=per_device,
        num_workers=opt["num_workers"],
        world_size=world,
        rank=rank,
        seed=opt["seed"],
        pin_memory=device.type == "cuda",
    )

    optimizer = torch.optim.AdamW(
        pretrain_param_groups(model, opt["weight_decay"]), lr=lr, betas=tuple(opt["betas"])
    )
    use_amp = bool(opt["amp"]) and device.type == "cuda"
    amp_dtype = getattr(torch, opt["amp_dtype"])
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_epoch = 0
    resume_path = opt["resume_from"] or (find_last_checkpoint(out_dir) if opt["resume"] else None)
    if resume_path:
        start_epoch = resume_pretraining(
            resume_path, model=model, optimizer=optimizer, scaler=scaler
        )

    ddp = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    iters = len(loader) // accum * accum
    if iters == 0:
        raise ValueError(f"{len(dataset)} images give no full step of {per_device} x {accum}")
    epochs = int(opt["epochs"])
    logger.info(
        "Pretraining %s: %d images from %s, %d epochs x %d iterations, %d images/step "
        "(%d/process x %d processes x %d accumulation), lr %.3g, amp %s, start epoch %d",
        type(model).__name__,
        len(dataset),
        data_path,
        epochs,
        iters // accum,
        opt["batch_size"],
        per_device,
        world,
        accum,
        lr,
        use_amp and opt["amp_dtype"],
        start_epoch,
    )
    meter = _Meter((epochs - start_epoch) * iters, per_device * world)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    deadline = None
    if opt["max_minutes"] is not None:
        deadline = time.monotonic() + 60.0 * float(opt["max_minutes"])
    last_path = find_last_checkpoint(out_dir) if start_epoch > 0 else None
    nonfinite = 0
    done = 0

    for epoch in range(start_epoch, epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        ddp.train()
        optimizer.zero_grad(set_to_none=True)
        stop = False
        for i, (imgs, _) in enumerate(loader):
            if i >= iters:
                break
            if i % accum == 0:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(
                        epoch + i / iters,
                        lr=lr,
                        min_lr=opt["min_lr"],
                        warmup_epochs=opt["warmup_epochs"],
                        epochs=epochs,
                    )
            imgs = imgs.to(device, non_blocking=True)
            step_now = (i + 1) % accum == 0
            sync = contextlib.nullcontext()
            if world > 1 and not step_now:
                sync = ddp.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    out = ddp(imgs)
                names = sorted(k for k in out if k.startswith("loss"))
                wants_stop = deadline is not None and time.monotonic() > deadline
                values = torch.stack(
                    [out[k].detach().float() for k in names]
                    + [torch.tensor(float(wants_stop), device=device)]
                )
                if world > 1:
                    dist.all_reduce(values)
                    values /= world
                values = values.tolist()
                stop = values[-1] > 0
                stats = dict(zip(names, values[:-1]))
                if not all(math.isfinite(v) for v in stats.values()):
                    nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                    logger.warning(
                        "Non-finite loss %s at epoch %d iter %d: step skipped (%d in a row)",
                        stats,
                        epoch,
                        i,
                        nonfinite,
                    )
                    if nonfinite >= opt["max_nonfinite"]:
                        raise FloatingPointError(
                            f"{nonfinite} consecutive non-finite losses (last {stats}); "
                            "lower the lr or use amp_dtype='bfloat16'"
                        )
                    continue
                nonfinite = 0
                scaler.scale(out["loss"] / accum).backward()
            if step_now:
                if opt["clip_grad"] is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), opt["clip_grad"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                progress = (epoch * iters + i + 1) / (epochs * iters)
                _unwrap(ddp).update_ema(progress)
            done += 1
            meter.add(dict(stats, lr=optimizer.param_groups[0]["lr"]))
            if (i + 1) % opt["log_period"] == 0 or i + 1 == iters or stop:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                s = meter.flush(done)
                if rank == 0:
                    _log(s, epoch, epochs, i + 1, iters, metrics_path, device)
            if stop:
                break

        is_last = epoch + 1 == epochs or stop
        if (epoch + 1) % int(opt["checkpoint_period"]) == 0 or is_last:
            path = os.path.join(out_dir, f"checkpoint-{epoch:04d}.pth")
            if rank == 0:
                args = {
                    "train": opt,
                    "model": (
                        cfg["model"]
                        if not isinstance(cfg["model"], nn.Module)
                        else type(cfg["model"]).__name__
                    ),
                }
                save_pretrain_checkpoint(
                    path, model=model, optimizer=optimizer, epoch=epoch, scaler=scaler, args=args
                )
                logger.info("Saved %s", path)
            comm.synchronize()
            last_path = path
        if stop:
            logger.info("Time budget of %s min reached after epoch %d", opt["max_minutes"], epoch)
            break
    return last_path


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
