"""One run-settings object for every training job, read from either config kind in one place.

A detection run (LazyConfig ``train.*``) and a segmentation run (yacs ``SOLVER.*``, ``SEED``,
``MODEL.DEVICE``, ...) spell the same settings differently; :class:`RunSettings` holds them once,
so the trainer, its hooks and the messages read one object:

============================  ==================================  ===================================
setting                       LazyConfig                          yacs
============================  ==================================  ===================================
device (CPU fallback)         ``train.device``                    ``MODEL.DEVICE``
precision                     ``train.amp.{enabled,precision}``   ``SOLVER.AMP.{ENABLED,DTYPE}``
non-finite loss policy        ``train.nonfinite_loss``            ``SOLVER.NONFINITE_LOSS``,
                                                                  ``SOLVER.NONFINITE_MAX_SKIPS``
seed                          ``train.seed``                      ``SEED``
iterations                    ``train.max_iter``                  ``SOLVER.MAX_ITER``
checkpoints                   ``train.checkpointer``              ``SOLVER.CHECKPOINT_PERIOD``,
                                                                  ``SOLVER.CHECKPOINT_MAX_TO_KEEP``
evaluation / log periods      ``train.eval_period / log_period``  ``TEST.EVAL_PERIOD``,
                                                                  ``SOLVER.LOG_PERIOD``
output folder                 ``train.output_dir``                ``OUTPUT_DIR``
============================  ==================================  ===================================

Mixed precision is used on CUDA only: asked for on the CPU it is turned off with a warning naming
the key (:attr:`RunSettings.precision` is then None, i.e. fp32). Every precision spelling goes
through :func:`convmae_det.utils.precision.parse_precision`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch

from ..utils.precision import parse_precision, precision_name
from ..utils.seeding import derive_seed, resolve_run_seed

__all__ = ["DATA_SEED_DOMAIN", "RunSettings", "amp_precision", "data_seed", "resolve_device"]

DATA_SEED_DOMAIN = 0x5E65
"""Domain separator of :func:`data_seed`."""


def data_seed(run_seed: int) -> int:
    """The training loader's seed of a run whose config leaves it random: derived from the run
    seed, so a fixed run seed fixes the batches too (and a random one is drawn once)."""
    return derive_seed(int(run_seed), DATA_SEED_DOMAIN)


logger = logging.getLogger(__name__)


def resolve_device(device: str, *, key: str = "train.device") -> str:
    """``device`` if usable, else "cpu" (with a warning naming ``key``) when CUDA was asked for
    but is absent."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"{key}={device!r} but CUDA is not available: running on the CPU")
        return "cpu"
    return str(device)


def amp_precision(
    enabled: bool, name: str, *, device: str, enabled_key: str, precision_key: str
) -> Optional[torch.dtype]:
    """The autocast dtype of a run, or None for fp32.

    ``name`` is checked even when AMP is off (a typo is refused either way). On a device other
    than CUDA, AMP is turned off with a warning naming ``enabled_key``.
    """
    dtype = parse_precision(name, key=precision_key, allow_fp32=False)
    if not enabled:
        return None
    if not str(device).startswith("cuda"):
        logger.warning(
            f"{enabled_key}=True ignored: mixed precision is used on CUDA only (device={device})"
        )
        return None
    return dtype


@dataclass(frozen=True)
class RunSettings:
    """What a training run does besides its model, data, optimizer and schedule.

    Attributes:
        device: "cuda..." or "cpu" (after the CPU fallback).
        precision: autocast dtype (``torch.bfloat16`` / ``torch.float16``), None for fp32.
        nonfinite_loss: "stop" or "skip" (see :class:`convmae_det.engine.hooks.FiniteLossGuard`).
        nonfinite_max_skips: "skip" stops after this many skipped batches in all (None: no limit).
        seed: the run seed, resolved: a config's seed < 0 becomes a random one, drawn once and
            shared by the processes (build the settings on every process); it is kept in the
            checkpoint, and the training loader's seed derives from it (:func:`data_seed`).
        max_iter: iterations of the run.
        checkpointer: keyword arguments of detectron2's ``PeriodicCheckpointer``
            (``period``, ``max_to_keep``).
        eval_period: evaluate every N iterations and after the last one (0: only at the end).
        log_period: console / ``metrics.json`` / tensorboard period.
        output_dir: the run's folder.
        keys: the config key of each setting, for messages (``{"nonfinite_loss": ...}``).
        nonfinite_max_in_a_row: "skip" stops at this many non-finite losses in a row (None: no
            limit; pretraining's ``train.max_nonfinite``).
        nonfinite_advice: appended to the non-finite error message.
    """

    device: str
    precision: Optional[torch.dtype]
    nonfinite_loss: str
    nonfinite_max_skips: Optional[int]
    seed: int
    max_iter: int
    checkpointer: Dict[str, Any]
    eval_period: int
    log_period: int
    output_dir: str
    keys: Dict[str, str] = field(default_factory=dict)
    nonfinite_max_in_a_row: Optional[int] = None
    nonfinite_advice: str = ""

    @property
    def precision_name(self) -> str:
        """ "fp32", "bf16" or "fp16"."""
        return precision_name(self.precision)

    def key(self, name: str) -> str:
        """The config key of setting ``name``."""
        return self.keys.get(name, name)

    @classmethod
    def from_lazy(cls, train: Mapping[str, Any]) -> "RunSettings":
        """From a LazyConfig's ``train`` node (``configs/common/train.py``)."""
        device = resolve_device(train.get("device", "cuda"), key="train.device")
        amp = train.get("amp", {}) or {}
        return cls(
            device=device,
            precision=amp_precision(
                bool(amp.get("enabled", False)),
                str(amp.get("precision", "bf16")),
                device=device,
                enabled_key="train.amp.enabled",
                precision_key="train.amp.precision",
            ),
            nonfinite_loss=str(train.get("nonfinite_loss", "stop")),
            nonfinite_max_skips=int(train.get("nonfinite_max_skips", 10)),
            seed=resolve_run_seed(train.get("seed", -1)),
            max_iter=int(train.max_iter),
            checkpointer=dict(train.get("checkpointer", {}) or {}),
            eval_period=int(train.get("eval_period", 0)),
            log_period=int(train.get("log_period", 20)),
            output_dir=str(train.get("output_dir", "")),
            keys={
                "nonfinite_loss": "train.nonfinite_loss",
                "device": "train.device",
                "seed": "train.seed",
            },
        )

    @classmethod
    def from_pretrain(
        cls, train: Mapping[str, Any], *, device: str, max_iter: int, seed: int
    ) -> "RunSettings":
        """From pretraining's ``train`` options (``PRETRAIN_DEFAULTS``), on ``device`` (already
        chosen), for ``max_iter`` iterations (epochs x iterations per epoch), with the run
        ``seed`` the runner resolved (it seeds the data before the settings can be built; a
        resumed run takes the checkpoint's). The non-finite
        policy is the official loop's: skip, give up at ``max_nonfinite`` in a row. Checkpoints
        follow epochs (``checkpoint_period``) and ``checkpoint_period_iters``."""
        return cls(
            device=str(device),
            precision=amp_precision(
                bool(train["amp"]),
                str(train["amp_dtype"]),
                device=str(device),
                enabled_key="train.amp",
                precision_key="train.amp_dtype",
            ),
            nonfinite_loss="skip",
            nonfinite_max_skips=None,
            seed=int(seed),
            max_iter=int(max_iter),
            checkpointer={
                "period_epochs": int(train["checkpoint_period"]),
                "period_iters": train["checkpoint_period_iters"],
            },
            eval_period=0,
            log_period=int(train["log_period"]),
            output_dir=str(train["output_dir"]),
            keys={
                "nonfinite_loss": "train.max_nonfinite",
                "device": "train.device",
                "seed": "train.seed",
            },
            nonfinite_max_in_a_row=int(train["max_nonfinite"]),
            nonfinite_advice="or use train.amp_dtype='bfloat16'",
        )

    @classmethod
    def from_yacs(cls, cfg: Any) -> "RunSettings":
        """From a yacs segmentation config (``add_convmae_config``)."""
        s = cfg.SOLVER
        device = resolve_device(cfg.MODEL.DEVICE, key="MODEL.DEVICE")
        return cls(
            device=device,
            precision=amp_precision(
                bool(s.AMP.ENABLED),
                str(s.AMP.DTYPE),
                device=device,
                enabled_key="SOLVER.AMP.ENABLED",
                precision_key="SOLVER.AMP.DTYPE",
            ),
            nonfinite_loss=str(s.NONFINITE_LOSS),
            nonfinite_max_skips=int(s.NONFINITE_MAX_SKIPS),
            seed=resolve_run_seed(cfg.SEED),
            max_iter=int(s.MAX_ITER),
            checkpointer={
                "period": int(s.CHECKPOINT_PERIOD),
                "max_to_keep": int(s.CHECKPOINT_MAX_TO_KEEP) or None,
            },
            eval_period=int(cfg.TEST.EVAL_PERIOD),
            log_period=max(1, int(s.LOG_PERIOD)),
            output_dir=str(cfg.OUTPUT_DIR),
            keys={
                "nonfinite_loss": "SOLVER.NONFINITE_LOSS",
                "device": "MODEL.DEVICE",
                "seed": "SEED",
            },
        )
