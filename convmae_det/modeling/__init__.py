"""Models: the shared ConvViT encoder and what is built on it."""

from .convvit import REL_POS_KINDS, Attention, Block, ConvBlock, ConvViT, PatchEmbed
from .pretrain import ConvMAE, FastConvMAE, build_pretrain_model
from .position import RelativePositionBias, get_2d_sincos_pos_embed, resize_pos_embed

__all__ = [
    "REL_POS_KINDS",
    "build_pretrain_model",
    "ConvMAE",
    "FastConvMAE",
    "Attention",
    "Block",
    "ConvBlock",
    "ConvViT",
    "PatchEmbed",
    "RelativePositionBias",
    "get_2d_sincos_pos_embed",
    "resize_pos_embed",
]
