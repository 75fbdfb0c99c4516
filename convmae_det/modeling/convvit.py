"""The ConvViT encoder of ConvMAE: two convolutional stages and one transformer stage.

One implementation serves pretraining (masked convolution, visible-token stage 3), the
detection backbones (window / global attention, shared or decomposed relative positions) and the
segmentation backbone (global attention, per-block relative tables, layer scale). Parameter names
are the official ones (``patch_embed1.proj.weight``, ``blocks1.0.attn.weight``,
``blocks3.4.attn.qkv.weight``, ``pos_embed``, ...), so official checkpoints load without renaming.

Shapes (Base, input (B, 3, H, W), H and W multiples of 16):
    e1: (B, 256, H/4, W/4)   e2: (B, 384, H/8, W/8)   e3: (B, 768, H/16, W/16)
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from detectron2.modeling.backbone.utils import window_partition, window_unpartition
from timm.layers import DropPath, Mlp, trunc_normal_

from .position import (
    RelativePositionBias,
    decomposed_rel_pos_bias,
    get_2d_sincos_pos_embed,
    resize_pos_embed,
    table_rel_pos_bias,
)

__all__ = ["PatchEmbed", "ConvMlp", "ConvBlock", "Attention", "Block", "ConvViT", "REL_POS_KINDS"]

REL_POS_KINDS = ("none", "shared", "per_block", "decomposed")
MaskLike = Union[torch.Tensor, Sequence[torch.Tensor], None]


def _channels_last_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Conv(k = s = patch) -> LayerNorm over channels -> GELU. (B, Cin, H, W) -> (B, C, H/p, W/p)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(_channels_last_norm(self.norm, self.proj(x)))


class ConvMlp(nn.Module):
    """1x1 conv (C -> hidden), GELU, 1x1 conv (hidden -> C) on NCHW maps."""

    def __init__(self, *, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """Stage-1/2 block: ``x + conv2(dwconv5x5(mask * conv1(norm1(x))))`` then ``x + mlp(norm2(x))``.

    ``attn`` is the 5x5 depthwise convolution (official name). ``mask`` implements masked
    convolution for pretraining:

    * ``None``: plain block (all downstream uses);
    * a (B, 1, H, W) visible mask: the depthwise conv sees only visible positions (ConvMAE);
    * a sequence of K disjoint visible masks: the depthwise conv runs once per mask and each
      position keeps the result of its own mask (FastConvMAE complementary masks).
    """

    def __init__(
        self, *, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, norm_eps: float = 1e-5
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvMlp(dim=dim, hidden_dim=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: MaskLike = None) -> torch.Tensor:
        y = self.conv1(_channels_last_norm(self.norm1, x))
        if mask is None:
            y = self.attn(y)
        elif isinstance(mask, torch.Tensor):
            y = self.attn(mask * y)
        else:
            y = sum(m * self.attn(m * y) for m in mask)
        x = x + self.drop_path(self.conv2(y))
        return x + self.drop_path(self.mlp(_channels_last_norm(self.norm2, x)))


class Attention(nn.Module):
    """Multi-head self-attention with an optional relative-position term of its own.

    ``rel_pos``: "none" / "shared" (the bias comes from outside, see :class:`ConvViT`),
    "per_block" (a BEiT table ``relative_position_bias_table`` for ``rel_pos_hw``) or
    "decomposed" (``rel_pos_h``, ``rel_pos_w`` for ``rel_pos_hw``, ViTDet). All relative terms are
    additive masks, so ``fused=True`` runs ``F.scaled_dot_product_attention`` and ``fused=False``
    the explicit softmax(QK^T * scale + bias) V of the official code; both give the same numbers.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        rel_pos: str = "none",
        rel_pos_hw: Optional[Tuple[int, int]] = None,
        fused: bool = True,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = rel_pos
        self.rel_pos_hw = tuple(rel_pos_hw) if rel_pos_hw is not None else None
        self.fused = fused
        # recompute the (B, heads, N, N) part in backward (fast_paths act_checkpoint "attn")
        self.checkpoint_core = False
        if rel_pos == "per_block":
            num = (2 * rel_pos_hw[0] - 1) * (2 * rel_pos_hw[1] - 1)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num, num_heads))
        elif rel_pos == "decomposed":
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_hw[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_hw[1] - 1, head_dim))

    def forward(
        self,
        x: torch.Tensor,
        hw: Optional[Tuple[int, int]] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, N, C) tokens; when ``hw`` is given, N == h*w in row-major order.
            bias: additive attention bias broadcastable to (B, heads, N, N).
        Returns:
            (B, N, C).
        """
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        # recompute the core where it would keep (B, heads, N, N) tensors: the explicit path's
        # logits / probabilities, SDPA's own copy of per-block relative terms. Keeps q, k, v and
        # the shared bias; the same ops run again, so the numbers are the same
        own_terms = self.rel_pos in ("per_block", "decomposed")
        if (
            self.checkpoint_core
            and (own_terms or not self.fused)
            and self.training
            and torch.is_grad_enabled()
        ):
            out = activation_checkpoint.checkpoint(
                self.attend, q, k, v, hw, bias, use_reentrant=False
            )
        else:
            out = self.attend(q, k, v, hw, bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        hw: Optional[Tuple[int, int]] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The attention core: softmax(q k^T * scale + relative terms + bias) v.

        Args:
            q, k, v: (B, heads, N, head_dim); ``q`` unscaled.
            hw: token grid of N (needed by the per-block relative terms).
            bias: additive bias broadcastable to (B, heads, N, N).
        Returns:
            (B, heads, N, head_dim).
        """
        if self.rel_pos == "per_block":
            own = table_rel_pos_bias(self.relative_position_bias_table, self.rel_pos_hw, hw)
            bias = own.unsqueeze(0) if bias is None else bias + own
        elif self.rel_pos == "decomposed":
            own = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, hw)
            bias = own if bias is None else bias + own
        if bias is not None:
            bias = bias.to(q.dtype)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            # softmax in float32 for half precision, in the logits' own precision otherwise
            work = torch.promote_types(logits.dtype, torch.float32)
            out = logits.to(work).softmax(dim=-1).to(v.dtype) @ v
        return out


class Block(nn.Module):
    """Pre-norm transformer block of stage 3, global or windowed, with optional layer scale.

    Input and output are (B, H, W, C) grids, or (B, N, C) token sets for global attention without
    a spatial relative term (pretraining on visible tokens). Windowed blocks zero-pad the grid to
    a multiple of ``window_size`` like ViTDet.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        window_size: int = 0,
        rel_pos: str = "none",
        rel_pos_hw: Optional[Tuple[int, int]] = None,
        layer_scale_init: Optional[float] = None,
        fused_attn: bool = True,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim=dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            rel_pos=rel_pos,
            rel_pos_hw=(window_size, window_size) if window_size > 0 else rel_pos_hw,
            fused=fused_attn,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale_init * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _attend(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if x.dim() == 3:
            return self.attn(x, None, bias)
        b, h, w, c = x.shape
        if self.window_size > 0:
            windows, pad_hw = window_partition(x, self.window_size)
            ws = self.window_size
            out = self.attn(windows.reshape(-1, ws * ws, c), (ws, ws), bias)
            return window_unpartition(out.reshape(-1, ws, ws, c), ws, pad_hw, (h, w))
        return self.attn(x.reshape(b, h * w, c), (h, w), bias).reshape(b, h, w, c)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self._attend(self.norm1(x), bias)
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path(y)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path(y)


class ConvViT(nn.Module):
    """ConvViT encoder (ConvMAE). Base by default; every size-related number is an argument.

    Args:
        in_chans: input channels.
        patch_sizes: stride of each stage's patch embedding (cumulative 4, 8, 16).
        embed_dims, depths, mlp_ratios: per stage.
        num_heads: heads of the stage-3 attention.
        qkv_bias: bias in ``attn.qkv``.
        drop_path_rate: stochastic depth, linearly increasing over all blocks in order.
        conv_norm_eps, attn_norm_eps, patch_norm_eps: LayerNorm eps of the conv blocks, stage-3
            blocks and patch embeddings (the official variants differ, see SPEC).
        pos_embed_hw: grid of the stored ``pos_embed`` table, e.g. (14, 14) for a 224 pretraining.
        pos_embed_init: "sincos" (fixed, pretraining) or "trunc_normal".
        pos_embed_trainable: whether ``pos_embed`` is learned.
        window_size: window of the windowed stage-3 blocks (0: none).
        window_block_indexes: indexes in ``blocks3`` that use window attention.
        rel_pos: "none", "shared" (one BEiT table for all windowed blocks, ``windowed_rel_pos_bias``,
            and one for all global blocks, ``global_rel_pos_bias``), "per_block" (a BEiT table in
            each block) or "decomposed" (``rel_pos_h/w`` in each block).
        rel_pos_hw: grid the global relative tables are built for (default ``pos_embed_hw``).
        layer_scale_init: ``gamma_1/gamma_2`` init value, None for no layer scale.
        final_norm: add ``norm`` after stage 3 (pretraining / classification only).
        fused_attn: use ``F.scaled_dot_product_attention``.
        use_act_checkpoint: recompute stage-3 blocks in backward to save memory.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        patch_sizes: Sequence[int] = (4, 2, 2),
        embed_dims: Sequence[int] = (256, 384, 768),
        depths: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratios: Sequence[float] = (4.0, 4.0, 4.0),
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        conv_norm_eps: float = 1e-5,
        attn_norm_eps: float = 1e-6,
        patch_norm_eps: float = 1e-5,
        pos_embed_hw: Tuple[int, int] = (14, 14),
        pos_embed_init: str = "trunc_normal",
        pos_embed_trainable: bool = True,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (),
        rel_pos: str = "none",
        rel_pos_hw: Optional[Tuple[int, int]] = None,
        layer_scale_init: Optional[float] = None,
        final_norm: bool = False,
        fused_attn: bool = True,
        use_act_checkpoint: bool = False,
    ):
        super().__init__()
        if rel_pos not in REL_POS_KINDS:
            raise ValueError(f"rel_pos={rel_pos!r}; expected one of {REL_POS_KINDS}")
        if len(patch_sizes) != 3 or len(embed_dims) != 3 or len(depths) != 3:
            raise ValueError("patch_sizes, embed_dims and depths must each have 3 entries")
        bad = [i for i in window_block_indexes if not 0 <= i < depths[2]]
        if bad:
            raise ValueError(f"window_block_indexes {bad} outside blocks3 (depth {depths[2]})")
        if window_block_indexes and window_size <= 0:
            raise ValueError("window_block_indexes given but window_size is 0")
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = num_heads
        self.patch_stride = int(math.prod(patch_sizes))
        self.strides = tuple(int(math.prod(patch_sizes[: i + 1])) for i in range(3))
        self.pos_embed_hw = tuple(pos_embed_hw)
        self.rel_pos = rel_pos
        self.rel_pos_hw = tuple(rel_pos_hw) if rel_pos_hw is not None else self.pos_embed_hw
        self.window_size = window_size
        self.window_block_indexes = tuple(sorted(window_block_indexes))
        self.use_act_checkpoint = use_act_checkpoint

        chans = (in_chans,) + tuple(embed_dims)
        for i in range(3):
            embed = PatchEmbed(
                patch_size=patch_sizes[i],
                in_chans=chans[i],
                embed_dim=chans[i + 1],
                norm_eps=patch_norm_eps,
            )
            setattr(self, f"patch_embed{i + 1}", embed)
        self.patch_embed4 = nn.Linear(embed_dims[2], embed_dims[2])

        num_pos = self.pos_embed_hw[0] * self.pos_embed_hw[1]
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_pos, embed_dims[2]), requires_grad=pos_embed_trainable
        )

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks1 = nn.ModuleList(
            ConvBlock(
                dim=embed_dims[0], mlp_ratio=mlp_ratios[0], drop_path=dpr[i], norm_eps=conv_norm_eps
            )
            for i in range(depths[0])
        )
        self.blocks2 = nn.ModuleList(
            ConvBlock(
                dim=embed_dims[1],
                mlp_ratio=mlp_ratios[1],
                drop_path=dpr[depths[0] + i],
                norm_eps=conv_norm_eps,
            )
            for i in range(depths[1])
        )
        block_rel_pos = rel_pos if rel_pos in ("per_block", "decomposed") else "none"
        self.blocks3 = nn.ModuleList(
            Block(
                dim=embed_dims[2],
                num_heads=num_heads,
                mlp_ratio=mlp_ratios[2],
                qkv_bias=qkv_bias,
                drop_path=dpr[depths[0] + depths[1] + i],
                norm_eps=attn_norm_eps,
                window_size=window_size if i in self.window_block_indexes else 0,
                rel_pos=block_rel_pos,
                rel_pos_hw=self.rel_pos_hw,
                layer_scale_init=layer_scale_init,
                fused_attn=fused_attn,
            )
            for i in range(depths[2])
        )
        if rel_pos == "shared":
            self.global_rel_pos_bias = RelativePositionBias(
                table_hw=self.rel_pos_hw, num_heads=num_heads
            )
            if self.window_block_indexes:
                self.windowed_rel_pos_bias = RelativePositionBias(
                    table_hw=(window_size, window_size), num_heads=num_heads
                )
        self.norm = nn.LayerNorm(embed_dims[2], eps=attn_norm_eps) if final_norm else None

        self.apply(self._init_weights)
        if pos_embed_init == "sincos":
            self.pos_embed.data.copy_(get_2d_sincos_pos_embed(embed_dims[2], self.pos_embed_hw))
        elif pos_embed_init == "trunc_normal":
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            raise ValueError(
                f"pos_embed_init={pos_embed_init!r}; expected 'sincos' or 'trunc_normal'"
            )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def global_block_indexes(self) -> Tuple[int, ...]:
        return tuple(i for i in range(self.depths[2]) if i not in self.window_block_indexes)

    def set_fused_attn(self, fused: bool) -> None:
        """Switch every stage-3 block between the fused (SDPA) and the explicit attention path."""
        for blk in self.blocks3:
            blk.attn.fused = fused

    # ---------------------------------------------------------------- stage by stage
    def forward_conv_stages(
        self, x: torch.Tensor, masks: Optional[Tuple[MaskLike, MaskLike]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stages 1-2. (B, 3, H, W) -> e1 (B, C1, H/4, W/4), e2 (B, C2, H/8, W/8).

        ``masks``: optional (stage-1 mask, stage-2 mask) for masked convolution (see ConvBlock).
        """
        m1, m2 = masks if masks is not None else (None, None)
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x, m1)
        e1 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, m2)
        return e1, x

    def get_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        """(1, h*w, C) table for an ``hw`` token grid (bicubic resize of the stored table)."""
        return resize_pos_embed(self.pos_embed, self.pos_embed_hw, hw)

    def embed_stage3(self, e2: torch.Tensor) -> torch.Tensor:
        """e2 (B, C2, H/8, W/8) -> stage-3 input tokens (B, H/16, W/16, C3), position added."""
        x = self.patch_embed4(self.patch_embed3(e2).permute(0, 2, 3, 1))
        b, h, w, c = x.shape
        return x + self.get_pos_embed((h, w)).reshape(1, h, w, c)

    def stage3_attention_biases(
        self, x: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Additive attention biases shared by the stage-3 blocks, built once per forward.

        Args:
            x: the stage-3 input, a (B, h, w, C) grid or (B, N, C) tokens.
        Returns:
            (global_bias, window_bias): for the global blocks a tensor broadcastable to
            (B, heads, h*w, h*w), for the windowed blocks one broadcastable to
            (B * num_windows, heads, ws*ws, ws*ws); None where a block has no shared bias (per-block
            tables are added inside the blocks). Subclasses extend this (e.g. with a padding mask).
        """
        global_bias = window_bias = None
        if self.rel_pos == "shared":
            if x.dim() != 4:
                raise ValueError("shared relative positions need a (B, h, w, C) grid")
            global_bias = self.global_rel_pos_bias(tuple(x.shape[1:3])).unsqueeze(0)
            if self.window_block_indexes:
                ws = (self.window_size, self.window_size)
                window_bias = self.windowed_rel_pos_bias(ws).unsqueeze(0)
        return global_bias, window_bias

    def forward_stage3(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-3 blocks on a (B, h, w, C) grid, or on (B, N, C) tokens when no block needs the
        grid. The biases of :meth:`stage3_attention_biases` are built (and cast) once here."""
        global_bias, window_bias = self.stage3_attention_biases(x)
        # Cast once here rather than in every block (the blocks cast to q.dtype), and lay the
        # biases out row-major: a gathered table is a (heads, N, N) view with the heads innermost,
        # which CUDA's memory-efficient SDPA kernel would copy in every block and keep for backward
        # (1.5 GiB per 1024x1024 image for the four global blocks of the paper layout).
        autocast_on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast_on else None
        # (.contiguous(): ``.to(memory_format=contiguous_format)`` keeps this view as it is, since
        # the unsqueezed batch dim makes its strides read as neither layout; CPU SDPA copied it too)
        if global_bias is not None:
            global_bias = global_bias.to(dtype or global_bias.dtype).contiguous()
        if window_bias is not None:
            window_bias = window_bias.to(dtype or window_bias.dtype).contiguous()
        for i, blk in enumerate(self.blocks3):
            bias = window_bias if i in self.window_block_indexes else global_bias
            if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
                x = activation_checkpoint.checkpoint(blk, x, bias, use_reentrant=False)
            else:
                x = blk(x, bias)
        return x

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W), H and W multiples of 16 -> {"e1", "e2", "e3"} NCHW maps (strides 4/8/16)."""
        h, w = x.shape[-2:]
        if h % self.patch_stride or w % self.patch_stride:
            raise ValueError(
                f"ConvViT input {h}x{w} is not a multiple of {self.patch_stride}; pad it first "
                "(the detectron2 backbones do this through size_divisibility)"
            )
        e1, e2 = self.forward_conv_stages(x)
        e3 = self.forward_stage3(self.embed_stage3(e2))
        if self.norm is not None:
            e3 = self.norm(e3)
        return {"e1": e1, "e2": e2, "e3": e3.permute(0, 3, 1, 2)}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward_features(x)
