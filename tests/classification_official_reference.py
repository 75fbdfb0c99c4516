"""A plain-PyTorch ConvMAE ImageNet classifier, written from the official architecture of
``models_convvit.convvit_base_patch16(global_pool=True)``, to check ``ConvViTClassifierNet``.

It shares no code with ``convmae_det``: every layer is spelled out here, the attention is the
explicit ``softmax(q k^T * head_dim**-0.5) v``, and the parameter names are the official ones
(``patch_embed1.proj.weight``, ``blocks1.0.attn.weight``, ``blocks3.0.attn.qkv.weight``,
``pos_embed``, ``fc_norm.weight``, ``head.weight``, ...). Widths, depths, heads, image size and
class count are arguments (Base by default) so that tests can run a narrow copy.

Layout (Base, 224): conv 4x4/4 + LN + GELU -> 2 conv blocks (256) -> conv 2x2/2 + LN + GELU ->
2 conv blocks (384) -> conv 2x2/2 + LN + GELU -> tokens (B, 196, 768) -> Linear -> + pos_embed ->
11 transformer blocks -> mean over tokens -> fc_norm -> head.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OfficialConvViTClassifier", "randomize_", "resize_pos_embed_like_official"]


class PatchEmbed(nn.Module):
    """``proj`` (conv, kernel = stride = patch) -> LayerNorm over channels -> GELU."""

    def __init__(self, patch: int, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(cout, eps=1e-5)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(x)


class CMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """``x + conv2(attn(conv1(norm1(x))))`` then ``x + mlp(norm2(x))``; NCHW; norms over
    channels (eps 1e-5); ``attn`` is the 5x5 depthwise convolution."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = CMlp(dim, int(dim * mlp_ratio))

    @staticmethod
    def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv2(self.attn(self.conv1(self._norm(self.norm1, x))))
        return x + self.mlp(self._norm(self.norm2, x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OfficialConvViTClassifier(nn.Module):
    """The official ConvMAE fine-tuning classifier (global pool), Base by default.

    ``img_size`` fixes the ``pos_embed`` grid ((img_size / 16)^2 positions), as officially.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        embed_dims: Sequence[int] = (256, 384, 768),
        depths: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        num_classes: int = 1000,
    ):
        super().__init__()
        c1, c2, c3 = embed_dims
        self.patch_embed1 = PatchEmbed(4, 3, c1)
        self.patch_embed2 = PatchEmbed(2, c1, c2)
        self.patch_embed3 = PatchEmbed(2, c2, c3)
        self.patch_embed4 = nn.Linear(c3, c3)
        self.grid = img_size // 16
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, c3))
        self.blocks1 = nn.ModuleList(CBlock(c1) for _ in range(depths[0]))
        self.blocks2 = nn.ModuleList(CBlock(c2) for _ in range(depths[1]))
        self.blocks3 = nn.ModuleList(Block(c3, num_heads) for _ in range(depths[2]))
        self.fc_norm = nn.LayerNorm(c3, eps=1e-6)
        self.head = nn.Linear(c3, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled, ``fc_norm``-ed features (B, C3)."""
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        x = self.patch_embed3(x)
        x = x.flatten(2).permute(0, 2, 1)  # (B, N, C3)
        x = self.patch_embed4(x)
        x = x + self.pos_embed
        for blk in self.blocks3:
            x = blk(x)
        return self.fc_norm(x.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere, including the LayerNorms and ``pos_embed``, at a scale
    that keeps activations and logits of order one through the depth."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.copy_(1.0 + 0.2 * randn(module.weight.shape))
            module.bias.copy_(0.1 * randn(module.bias.shape))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            if name == "head":
                std *= 3.0
            module.weight.copy_(std * randn(module.weight.shape))
            module.bias.copy_(0.05 * randn(module.bias.shape))
    if hasattr(model, "pos_embed"):
        model.pos_embed.copy_(0.5 * randn(model.pos_embed.shape))
    return model


def resize_pos_embed_like_official(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """MAE's ``interpolate_pos_embed`` for a table without a cls position: (1, g*g, C) ->
    (1, new_grid^2, C), bicubic, align_corners=False."""
    c = pos_embed.shape[-1]
    g = int(round(math.sqrt(pos_embed.shape[1])))
    grid = pos_embed.reshape(1, g, g, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(1, 2)
