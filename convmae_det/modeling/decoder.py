"""Pieces of the MAE-style reconstruction decoder shared by ConvMAE, FastConvMAE and MoR.

* token bookkeeping: gather the visible tokens of a grid, and put decoded visible tokens back on
  the full grid with a mask token everywhere else;
* pixel targets: ``patchify`` / ``unpatchify`` (the MAE patch layout, so official ``decoder_pred``
  weights keep their meaning) and the per-patch normalised target (``norm_pix_loss``);
* the masked loss: mean over the masked patches of the per-patch mean squared error.

The decoder modules themselves (``decoder_embed``, ``decoder_blocks``, ...) are attributes of the
pretraining model so that their parameter names are the official top-level ones.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from .convvit import Block

__all__ = [
    "build_decoder_blocks",
    "gather_tokens",
    "place_visible_tokens",
    "patchify",
    "unpatchify",
    "pixel_target",
    "masked_mse",
]


def build_decoder_blocks(
    *, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6
) -> nn.ModuleList:
    """``depth`` pre-norm transformer blocks (timm layout: norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2; qkv bias) operating on (B, N, dim) token sets."""
    return nn.ModuleList(
        Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_eps=norm_eps)
        for _ in range(depth)
    )


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens per sample. x: (B, L, C), ids: (B, n) -> (B, n, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def place_visible_tokens(
    visible: torch.Tensor, ids_keep: torch.Tensor, mask_token: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Full decoder sequence: visible tokens at their grid positions, ``mask_token`` elsewhere.

    Equivalent to the official "append mask tokens, then unshuffle with ids_restore" (and to
    FastConvMAE's roll-then-unshuffle for subsets 2-4), written as one scatter.

    Args:
        visible: (B, n, C) decoded visible tokens.
        ids_keep: (B, n) their positions on the grid.
        mask_token: (1, 1, C).
        num_tokens: L, the grid size.
    Returns:
        (B, L, C) in row-major grid order.
    """
    b, _, c = visible.shape
    full = mask_token.to(visible.dtype).expand(b, num_tokens, c)
    return full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, c), visible)


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), MAE layout (row, column, channel within a patch)."""
    b, c, h, w = imgs.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = imgs.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, grid: Tuple[int, int], chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`. (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    b = x.shape[0]
    h, w = grid
    x = x.reshape(b, h, w, patch, patch, chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, chans, h * patch, w * patch)


def pixel_target(imgs: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """Reconstruction target (B, L, p*p*C) in float32 (float64 for float64 images); with
    ``norm_pix`` every patch is normalised by its own mean and unbiased variance:
    (x - mean) / sqrt(var + 1e-6)."""
    target = patchify(imgs.to(torch.promote_types(imgs.dtype, torch.float32)), patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    Args:
        pred, target: (B, L, D) (computed in float32, or float64 if either is float64).
        mask: (B, L), 1 where the patch was masked (a loss position), 0 where visible.
    Returns:
        scalar ``sum(mask * mean_d (pred - target)^2) / sum(mask)``.
    """
    work = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    per_patch = (pred.to(work) - target.to(work)).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)
