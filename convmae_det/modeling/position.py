"""Absolute and relative position encodings shared by every ConvViT variant.

* absolute: 2-D sin-cos tables (pretraining) and bicubic resizing of learned tables to any grid;
* relative, BEiT style: a ``((2h-1)*(2w-1), heads)`` table indexed by the 2-D offset between two
  tokens, usable on any grid (cropped when the grid is smaller than the table, resized when larger);
* relative, decomposed (MViTv2 / ViTDet): per-axis tables ``rel_pos_h/w`` turned into an additive
  attention bias from the queries.

Every function returns an *additive attention bias* so that the same attention kernel (explicit
softmax or ``F.scaled_dot_product_attention``) serves all variants.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from detectron2.modeling.backbone.utils import get_rel_pos

# resizing is shared with the checkpoint loader, which sits below the model code
from ..utils.table_resize import infer_grid, resize_pos_embed, resize_rel_pos_table

__all__ = [
    "get_2d_sincos_pos_embed",
    "resize_pos_embed",
    "infer_grid",
    "relative_position_index",
    "resize_rel_pos_table",
    "RelativePositionBias",
    "table_rel_pos_bias",
    "decomposed_rel_pos_bias",
]


def get_2d_sincos_pos_embed(
    dim: int, grid_hw: Tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed 2-D sin-cos table, MAE convention (first half encodes x, second half y).

    Computed in float64 and rounded once to ``dtype`` (float32 by default, as the official code).

    Returns:
        (1, h*w, dim) tensor of ``dtype``, row-major over the (h, w) grid.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got dim={dim}")
    h, w = grid_hw
    gy, gx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )

    def _one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([_one_axis(gx), _one_axis(gy)], axis=1)
    return torch.from_numpy(table).to(dtype).unsqueeze(0)


def relative_position_index(
    hw: Tuple[int, int], table_hw: Optional[Tuple[int, int]] = None, device=None
) -> torch.Tensor:
    """(N, N) index into a BEiT table built for ``table_hw`` of the offsets of an ``hw`` grid.

    The table stores offsets (dy, dx) in [-(th-1), th-1] x [-(tw-1), tw-1] row-major; for a grid no
    larger than the table this selects exactly the offsets that occur.
    """
    h, w = hw
    th, tw = table_hw if table_hw is not None else hw
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (th - 1)
    dx = xs[:, None] - xs[None, :] + (tw - 1)
    return dy * (2 * tw - 1) + dx


def table_rel_pos_bias(
    table: torch.Tensor, table_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Additive bias (heads, N, N) from a BEiT table for tokens on an ``hw`` grid.

    Grids up to the table's size index the table directly (so results at the table's own size
    are exactly the official ones); larger grids use a bicubically resized table.
    """
    if hw[0] > table_hw[0] or hw[1] > table_hw[1]:
        table = resize_rel_pos_table(table, table_hw, hw)
        table_hw = hw
    index = relative_position_index(hw, table_hw, device=table.device)
    n = hw[0] * hw[1]
    # gather from the (heads, entries) table: the (heads, N, N) bias comes out row-major, which
    # the SDPA kernels take without a copy (a (N, N, heads) gather permuted would need one)
    return table.t().contiguous().index_select(1, index.reshape(-1)).reshape(-1, n, n)


class RelativePositionBias(nn.Module):
    """A BEiT-style relative-position table that several attention blocks share.

    The parameter is named ``relative_position_bias_table`` (official key name), zero-initialised,
    shaped ((2h-1)*(2w-1), num_heads) for the ``table_hw`` grid it was built for.
    """

    def __init__(self, *, table_hw: Tuple[int, int], num_heads: int):
        super().__init__()
        self.table_hw = tuple(table_hw)
        self.num_heads = num_heads
        num = (2 * self.table_hw[0] - 1) * (2 * self.table_hw[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num, num_heads))

    def forward(self, hw: Tuple[int, int]) -> torch.Tensor:
        """Returns the (num_heads, h*w, h*w) bias for an ``hw`` grid."""
        return table_rel_pos_bias(self.relative_position_bias_table, self.table_hw, hw)

    def extra_repr(self) -> str:
        return f"table_hw={self.table_hw}, num_heads={self.num_heads}"


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: Tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative-position bias of MViTv2 / ViTDet as an additive attention mask.

    Args:
        q: (B, heads, h*w, head_dim) *unscaled* queries.
        rel_pos_h, rel_pos_w: (2*size-1, head_dim) tables; interpolated (linearly, as detectron2
            does) when ``hw`` differs from the size they were built for.
    Returns:
        (B, heads, h*w, h*w) bias equal to what ``add_decomposed_rel_pos`` adds to the logits.
    """
    h, w = hw
    b, heads, n, dim = q.shape
    rh = get_rel_pos(h, h, rel_pos_h)  # (h, h, dim)
    rw = get_rel_pos(w, w, rel_pos_w)  # (w, w, dim)
    r_q = q.reshape(b, heads, h, w, dim)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh.to(q.dtype))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw.to(q.dtype))
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (b, heads, h, w, h, w)
    return bias.reshape(b, heads, n, n)
