"""A deterministic toy scene-parsing dataset in the ADEChallengeData2016 layout.

Scenes of sky over grass or road, with balls, boxes and tents in front, on images of varying
size (not multiples of 32). Labels follow ADE20K exactly: ``annotations/`` holds the raw labels
(0 = "other", 1..6 = classes, as in the ADE20K release), ``annotations_detectron2/`` the prepared
ones (0 -> 255 ignore, k -> k-1), written by the same conversion as
``datasets/prepare_ade20k_sem_seg.py``. The raw label 0 marks a thin outline around every object
and occasional unlabelled blobs, so the prepared maps contain ignore pixels.

Everything is drawn from ``numpy.random.default_rng(seed + index)``: the same seed gives the
same files on every machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Tuple

import cv2
import numpy as np
from PIL import Image

from .ade20k_labels import convert_ade20k_label

__all__ = [
    "TOY_ADE20K_CLASSES",
    "TOY_ADE20K_VERSION",
    "generate_toy_ade20k",
    "ensure_toy_ade20k",
    "draw_toy_scene",
]

logger = logging.getLogger(__name__)

TOY_ADE20K_CLASSES = ["sky", "grass", "road", "ball", "box", "tent"]
TOY_ADE20K_VERSION = 2
_SPLITS = {"training": ("train", 64), "validation": ("val", 16)}
_SKY, _GRASS, _ROAD, _BALL, _BOX, _TENT = range(1, 7)  # raw ids (0 = other)


def _noise(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    return rng.normal(0.0, amp, size=(h, w, 1)).astype(np.float32)


def draw_toy_scene(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB image and (H, W) uint8 raw label (0 = other, 1..6)."""
    img = np.zeros((h, w, 3), np.float32)
    raw = np.zeros((h, w), np.uint8)
    yy = np.arange(h, dtype=np.float32)[:, None, None]
    horizon = int(h * rng.uniform(0.3, 0.6))
    # sky: vertical blue gradient
    sky = np.array([70, 130, 230], np.float32) + (yy / h) * np.array([60, 60, 20], np.float32)
    img[:horizon] = np.broadcast_to(sky[:horizon], (horizon, w, 3))
    raw[:horizon] = _SKY
    # ground: noisy grass or grey road with lane stripes
    ground = h - horizon
    if rng.random() < 0.5:
        img[horizon:] = np.array([60, 150, 50], np.float32) + _noise(rng, ground, w, 18.0)
        raw[horizon:] = _GRASS
    else:
        img[horizon:] = np.array([120, 120, 125], np.float32) + _noise(rng, ground, w, 6.0)
        stripe = horizon + ground // 2
        img[stripe : stripe + max(2, h // 40), ::1] = (235, 235, 235)
        raw[horizon:] = _ROAD
    img += _noise(rng, h, w, 4.0)

    outline = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        kind = int(rng.choice([_BALL, _BOX, _TENT]))
        size = int(min(h, w) * rng.uniform(0.2, 0.4))
        cy = int(rng.uniform(horizon - size * 0.5, h - size * 0.3))
        cx = int(rng.uniform(0, w))
        mask = np.zeros((h, w), np.uint8)
        if kind == _BALL:
            cv2.circle(mask, (cx, cy), size // 2, 1, -1)
            shade = np.clip(1.2 - np.abs(yy[..., 0] - cy) / max(size, 1), 0.6, 1.2)
            colour = np.array([220, 50, 40], np.float32)[None, None] * shade[..., None]
        elif kind == _BOX:
            cv2.rectangle(
                mask, (cx - size // 2, cy - size // 3), (cx + size // 2, cy + size // 3), 1, -1
            )
            stripes = ((np.arange(w)[None, :] // 4) % 2).astype(np.float32)
            colour = np.array([200, 170, 40], np.float32)[None, None] * (
                0.8 + 0.2 * stripes[..., None]
            )
        else:
            pts = np.array(
                [
                    [cx, cy - size // 2],
                    [cx - size // 2, cy + size // 2],
                    [cx + size // 2, cy + size // 2],
                ]
            )
            cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
            colour = np.broadcast_to(np.array([150, 60, 180], np.float32), (h, w, 3))
        sel = mask.astype(bool)
        img[sel] = np.broadcast_to(colour, (h, w, 3))[sel]
        raw[sel] = kind
        outline[sel] = 0
        outline |= cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    raw[outline.astype(bool)] = 0
    if rng.random() < 0.3:  # an unlabelled patch
        cv2.circle(
            raw, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(min(h, w) * 0.06), 0, -1
        )
    img = np.clip(img + _noise(rng, h, w, 3.0), 0, 255).astype(np.uint8)
    return img, raw


def generate_toy_ade20k(dest: str, *, seed: int = 0) -> Dict[str, int]:
    """Write the toy dataset under ``dest`` (an ``ADEChallengeData2016`` folder).

    Returns the number of images per split. Existing files are overwritten.
    """
    counts = {}
    for split_dir, (short, n) in _SPLITS.items():
        for sub in ("images", "annotations", "annotations_detectron2"):
            os.makedirs(os.path.join(dest, sub, split_dir), exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, 1 if short == "train" else 2, i])
            h = int(rng.integers(112, 177))
            w = int(rng.integers(128, 209))
            img, raw = draw_toy_scene(rng, h, w)
            stem = f"ADE_toy_{short}_{i:08d}"
            Image.fromarray(img).save(
                os.path.join(dest, "images", split_dir, stem + ".jpg"), quality=95
            )
            Image.fromarray(raw).save(os.path.join(dest, "annotations", split_dir, stem + ".png"))
            Image.fromarray(convert_ade20k_label(raw)).save(
                os.path.join(dest, "annotations_detectron2", split_dir, stem + ".png")
            )
        counts[short] = n
    with open(os.path.join(dest, "toy_info.json"), "w") as f:
        json.dump({"version": TOY_ADE20K_VERSION, "seed": seed, "classes": TOY_ADE20K_CLASSES}, f)
    return counts


def _is_current(dest: str, seed: int) -> bool:
    try:
        with open(os.path.join(dest, "toy_info.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return info.get("version") == TOY_ADE20K_VERSION and info.get("seed") == seed


def ensure_toy_ade20k(dest: str, *, seed: int = 0) -> str:
    """Generate the toy dataset at ``dest`` unless a current copy is there; returns ``dest``.

    Generation goes to a temporary folder that is renamed into place, so concurrent callers (the
    processes of a distributed run) never see a half-written dataset.
    """
    if _is_current(dest, seed):
        return dest
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy_ade20k_", dir=parent)
    try:
        generate_toy_ade20k(tmp, seed=seed)
        if os.path.exists(dest) and not _is_current(dest, seed):
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
            logger.info(f"Generated the toy ADE20K dataset in {dest}")
        except OSError:
            if not _is_current(dest, seed):  # someone else won the race with an old copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
