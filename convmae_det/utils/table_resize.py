"""Bicubic resizing of learned position tables to another token grid: absolute ``(1, h*w, C)``
tables and BEiT relative ``((2h-1)*(2w-1), heads)`` tables.

Plain tensor functions, shared by the encoders (:mod:`convmae_det.modeling.position`, which
re-exports them) and the checkpoint loader (:mod:`convmae_det.checkpoint.convert`), which adapts a
file's tables to the target model without importing model code.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["infer_grid", "resize_pos_embed", "resize_rel_pos_table"]


def infer_grid(num_tokens: int, hint: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """The (h, w) grid of a flattened table: ``hint`` if it fits, else the square one."""
    if hint is not None and hint[0] * hint[1] == num_tokens:
        return tuple(hint)
    side = int(round(math.sqrt(num_tokens)))
    if side * side != num_tokens:
        raise ValueError(
            f"cannot infer the grid of a position table with {num_tokens} tokens: it is not "
            f"square and no matching (h, w) was given (hint={hint})"
        )
    return side, side


def resize_pos_embed(
    pos_embed: torch.Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize (align_corners=False) of a (1, h*w, C) table to (1, H*W, C).

    This is the official downstream behaviour: the pretrained 14x14 table is interpolated, never
    recomputed as sin-cos. Returns the input unchanged when the grids are equal.
    """
    if tuple(src_hw) == tuple(dst_hw):
        return pos_embed
    c = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, src_hw[0], src_hw[1], c).permute(0, 3, 1, 2)
    # half precision is resized in float32; float32 and float64 in their own precision
    work = torch.promote_types(pos_embed.dtype, torch.float32)
    grid = F.interpolate(grid.to(work), size=tuple(dst_hw), mode="bicubic", align_corners=False)
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, dst_hw[0] * dst_hw[1], c)


def resize_rel_pos_table(
    table: torch.Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of a BEiT table ((2h-1)*(2w-1), heads) to the table of another grid."""
    if tuple(src_hw) == tuple(dst_hw):
        return table
    heads = table.shape[-1]
    src = table.reshape(2 * src_hw[0] - 1, 2 * src_hw[1] - 1, heads).permute(2, 0, 1)[None]
    dst = F.interpolate(
        src.to(torch.promote_types(table.dtype, torch.float32)),  # upcast half precision only
        size=(2 * dst_hw[0] - 1, 2 * dst_hw[1] - 1),
        mode="bicubic",
        align_corners=False,
    )
    return dst[0].permute(1, 2, 0).reshape(-1, heads).to(table.dtype)
