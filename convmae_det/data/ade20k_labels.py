"""ADE20K's label convention, shared by the dataset registration
(:mod:`convmae_det.data.datasets.ade20k`, which re-exports it), the toy dataset generator
(:mod:`convmae_det.data.toy_ade20k`) and ``datasets/prepare_ade20k_sem_seg.py``."""

from __future__ import annotations

import numpy as np

__all__ = ["convert_ade20k_label"]


def convert_ade20k_label(raw: np.ndarray) -> np.ndarray:
    """ADE20K release labels -> training labels: 0 ("other") -> 255 (ignore), k -> k - 1.

    Args:
        raw: (H, W) integer array with values in [0, 150].
    Returns:
        (H, W) uint8 array with values in [0, 149] and 255.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {raw.shape}")
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise ValueError(f"label values must lie in [0, 255], found [{raw.min()}, {raw.max()}]")
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    return out.astype(np.uint8)
