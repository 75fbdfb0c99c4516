"""A short FastConvMAE pretraining on toy images, for the end-to-end demo (``make demo``).

The checkpoint it returns is an official-format pretraining file whose encoder is
:data:`convmae_det.modeling.pretrain.TOY_ENCODER_KWARGS`; a toy detector or segmenter built with
the same encoder arguments loads it with no missing encoder keys.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from detectron2.config import LazyCall as L

from ..modeling.pretrain import build_pretrain_model
from .pretrain_loop import PRETRAIN_DEFAULTS, run_pretraining

__all__ = [
    "DEMO_PRETRAIN_EPOCHS",
    "TOY_PRETRAIN_SETTINGS",
    "run_pretrain_demo",
    "toy_pretrain_config",
]

# The toy schedule (configs/pretrain/*_toy.py and the demo): 64x64 crops, batch 16,
# lr = blr * 16 / 256 = 1e-3, 30 epochs with 2 of warm-up, fp32, data loaded in the main process.
TOY_PRETRAIN_SETTINGS = dict(
    img_size=64,
    batch_size=16,
    blr=1.6e-2,
    epochs=30,
    warmup_epochs=2,
    amp=False,
    num_workers=0,
    log_period=4,
    checkpoint_period=10,
)

# ``make demo`` pretrains for a fixed number of epochs, never for a wall-clock budget, so every run
# on every machine trains the same steps: 20 epochs x (800 toy images / 16) = 1000 iterations,
# about 2 minutes on 2 CPU cores.
DEMO_PRETRAIN_EPOCHS = 20


def toy_pretrain_config(
    image_dir: Optional[str],
    output_dir: str,
    *,
    model_name: str = "fastconvmae_toy",
    img_size: int = 64,
    **train_overrides: Any,
) -> dict:
    """The config of ``configs/pretrain/fastconvmae_toy.py`` as a plain dict (no file needed)."""
    train = dict(PRETRAIN_DEFAULTS)
    train.update(TOY_PRETRAIN_SETTINGS, output_dir=output_dir, data_path=image_dir)
    train["img_size"] = img_size
    train.update(train_overrides)
    return {"model": L(build_pretrain_model)(name=model_name, img_size=img_size), "train": train}


def run_pretrain_demo(
    image_dir: Optional[str],
    output_dir: str,
    *,
    epochs: int = DEMO_PRETRAIN_EPOCHS,
    model_name: str = "fastconvmae_toy",
    img_size: int = 64,
    **train_overrides: Any,
) -> str:
    """Pretrain ``model_name`` on the images under ``image_dir`` (generated toy images when
    None) in this process for ``epochs`` epochs (the cosine schedule spans them), with the fixed
    seed of the toy config: the same steps, and so the same checkpoint up to floating-point
    noise, on every machine.

    Returns:
        path of the last checkpoint (``output_dir/checkpoint-XXXX.pth``).
    """
    from detectron2.utils.logger import setup_logger

    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, name="convmae_det")
    setup_logger(output_dir, name="detectron2")  # the trainer's progress lines
    cfg = toy_pretrain_config(
        image_dir,
        output_dir,
        model_name=model_name,
        img_size=img_size,
        epochs=epochs,
        **train_overrides,
    )
    path = run_pretraining(cfg)
    logging.getLogger(__name__).info("Toy pretraining checkpoint: %s", path)
    return path
