"""Block-wise random masking on the stage-3 token grid (ConvMAE) and complementary masks
(FastConvMAE).

Conventions (the official ones): a per-sample permutation ``ids_shuffle = argsort(noise)`` of the
L = h*w stage-3 tokens; ``mask`` is 1 for a masked (removed) token and 0 for a visible one. A
masking with K subsets holds K visible-id tensors and K masks; ConvMAE uses K = 1 (the first
``num_keep`` shuffled tokens are visible), FastConvMAE splits the permutation into K equal chunks,
so the K visible sets are disjoint and tile the grid.

The stage-1 and stage-2 masks are exact nearest-neighbour upsamplings of the stage-3 mask (x4 and
x2 for the Base strides), so every stage sees the same visible image regions.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch

__all__ = [
    "Masking",
    "num_kept_tokens",
    "random_masking",
    "complementary_masking",
    "upsample_visible",
]


class Masking(NamedTuple):
    """One masking of a batch on an L-token grid, with K visible subsets.

    ids_keep: K tensors (B, n_k), the visible token ids of each subset (in shuffled order).
    masks: K tensors (B, L), 1 = masked, 0 = visible in that subset.
    ids_restore: (B, L), inverse of the per-sample permutation.
    """

    ids_keep: Tuple[torch.Tensor, ...]
    masks: Tuple[torch.Tensor, ...]
    ids_restore: torch.Tensor

    @property
    def num_subsets(self) -> int:
        return len(self.ids_keep)

    def subset(self, k: int) -> "Masking":
        """The masking made of subset ``k`` alone (a plain ConvMAE masking)."""
        return Masking((self.ids_keep[k],), (self.masks[k],), self.ids_restore)


def num_kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Visible tokens for ``mask_ratio`` of ``num_tokens``; the count must be a positive integer."""
    keep = num_tokens * (1.0 - mask_ratio)
    rounded = int(round(keep))
    if abs(keep - rounded) > 1e-6 or not 0 < rounded <= num_tokens:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps {keep:g} of {num_tokens} tokens; expected a ratio "
            f"whose kept count is an integer between 1 and {num_tokens} (e.g. "
            f"{1 - max(1, round(keep)) / num_tokens:g})"
        )
    return rounded


def _split_masking(noise: torch.Tensor, bounds: Sequence[Tuple[int, int]]) -> Masking:
    b, num = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep, masks = [], []
    for start, end in bounds:
        ids_keep.append(ids_shuffle[:, start:end])
        shuffled = torch.ones(b, num, device=noise.device)
        shuffled[:, start:end] = 0
        masks.append(torch.gather(shuffled, 1, ids_restore))
    return Masking(tuple(ids_keep), tuple(masks), ids_restore)


def random_masking(noise: torch.Tensor, num_keep: int) -> Masking:
    """ConvMAE masking: the ``num_keep`` tokens with the smallest noise are visible.

    Args:
        noise: (B, L) per-sample scores, e.g. ``torch.rand``.
    """
    return _split_masking(noise, [(0, num_keep)])


def complementary_masking(noise: torch.Tensor, num_masks: int) -> Masking:
    """FastConvMAE masking: the sorted permutation split into ``num_masks`` equal visible sets.

    Args:
        noise: (B, L) per-sample scores; L must be divisible by ``num_masks``.
    """
    num = noise.shape[1]
    if num_masks < 1 or num % num_masks:
        raise ValueError(
            f"{num} tokens cannot be split into {num_masks} complementary visible sets of equal "
            "size; choose an input size whose stage-3 grid has a multiple of num_masks tokens"
        )
    size = num // num_masks
    return _split_masking(noise, [(k * size, (k + 1) * size) for k in range(num_masks)])


def upsample_visible(
    mask: torch.Tensor, grid: Tuple[int, int], factor: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Visible map of a finer stage: (B, L) mask (1 = masked) on an ``grid`` token grid ->
    (B, 1, h*factor, w*factor) with 1 at visible positions (nearest-neighbour upsampling)."""
    h, w = grid
    visible = (1 - mask).reshape(-1, 1, h, w).to(dtype)
    if factor > 1:
        visible = visible.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return visible
