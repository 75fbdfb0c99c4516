"""Segmentation backbone: ConvViT with global attention in every stage-3 block and a /32 level.

This is the backbone of the official ConvMAE UperNet segmenter as a detectron2 :class:`Backbone`:
every stage-3 block attends globally with its own BEiT-style relative-position table
(``blocks3.i.attn.relative_position_bias_table``, zero init), has layer scale ``gamma_1/gamma_2``
(init 1.0) and LayerNorm eps 1e-5; ``pos_embed`` is stored for the fine-tuning grid (32x32 at 512
input; a 14x14 pretraining table is resized bicubically when loaded). The fourth level E4 comes
from E3 through ``fpn``: the official 3x3 stride-2 convolution *without padding* + BatchNorm + GELU
(15x15 at 512 input), or a 2x2 max-pool (16x16).

Outputs for a (B, 3, H, W) input, H and W multiples of 32 (Base widths):
    e1 (B, 256, H/4, W/4)  e2 (B, 384, H/8, W/8)  e3 (B, 768, H/16, W/16)
    e4 (B, 768, H/32 - 1, W/32 - 1) with the conv adaptor, (B, 768, H/32, W/32) with max-pool.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .convvit import ConvViT

__all__ = ["ConvViTSeg", "build_convvit_seg_backbone", "E4_MODES", "resolve_norm"]

E4_MODES = ("conv", "maxpool")


def resolve_norm(norm: str, device: str) -> str:
    """``SyncBN`` needs CUDA tensors; on the CPU (gloo) the all-reduce based ``naiveSyncBN`` of
    detectron2 does the same job with identical parameter names."""
    if norm == "SyncBN" and not str(device).startswith("cuda"):
        return "naiveSyncBN"
    return norm


class ConvViTSeg(ConvViT, Backbone):
    """ConvViT as a four-level detectron2 backbone for semantic segmentation.

    Subclasses :class:`ConvViT`, so parameter names stay the official ones
    (``backbone.blocks3.0.attn.relative_position_bias_table``, ``backbone.fpn.0.weight``).
    Defaults reproduce the official ConvMAE-Base segmenter at 512x512.

    Args:
        e4_mode: "conv" (official: Conv2d(C3, C3, 3, stride 2, no padding) + norm + GELU) or
            "maxpool" (2x2 max-pool of E3, as in the paper's detector).
        e4_norm: norm of the conv adaptor ("BN", "SyncBN", "GN", ...; see ``get_norm``).
        out_features: subset of ("e1", "e2", "e3", "e4") to return.
        rel_pos, rel_pos_hw, layer_scale_init, attn_norm_eps, conv_norm_eps, drop_path_rate,
        pos_embed_hw, and the remaining keywords: see :class:`ConvViT`. ``rel_pos_hw`` defaults to
        ``pos_embed_hw``; grids larger than it use a bicubically resized table.
        fused_attn: False (default) computes attention in the official order, so outputs equal the
            official segmenter's bit for bit in fp32; True uses ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        *,
        e4_mode: str = "conv",
        e4_norm: str = "SyncBN",
        out_features: Sequence[str] = ("e1", "e2", "e3", "e4"),
        rel_pos: str = "per_block",
        rel_pos_hw: Optional[Tuple[int, int]] = None,
        layer_scale_init: Optional[float] = 1.0,
        attn_norm_eps: float = 1e-5,
        conv_norm_eps: float = 1e-5,
        drop_path_rate: float = 0.2,
        pos_embed_hw: Tuple[int, int] = (32, 32),
        fused_attn: bool = False,
        **kwargs,
    ):
        if kwargs.get("window_block_indexes"):
            raise ValueError("the segmentation backbone attends globally in every stage-3 block")
        super().__init__(
            rel_pos=rel_pos,
            rel_pos_hw=rel_pos_hw,
            layer_scale_init=layer_scale_init,
            attn_norm_eps=attn_norm_eps,
            conv_norm_eps=conv_norm_eps,
            drop_path_rate=drop_path_rate,
            pos_embed_hw=pos_embed_hw,
            fused_attn=fused_attn,
            final_norm=False,
            **kwargs,
        )
        c3 = self.embed_dims[2]
        if e4_mode == "conv":
            # fpn.0 / fpn.1 / fpn.2 are the official names of this adaptor.
            self.fpn = nn.Sequential(
                nn.Conv2d(c3, c3, kernel_size=3, stride=2), get_norm(e4_norm, c3), nn.GELU()
            )
        elif e4_mode == "maxpool":
            self.fpn = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            raise ValueError(f"e4_mode={e4_mode!r}; expected one of {E4_MODES}")
        self.e4_mode = e4_mode

        all_channels = dict(zip(("e1", "e2", "e3", "e4"), self.embed_dims + (c3,)))
        all_strides = dict(zip(("e1", "e2", "e3", "e4"), self.strides + (2 * self.strides[2],)))
        unknown = [f for f in out_features if f not in all_channels]
        if unknown or not out_features:
            raise ValueError(f"out_features={list(out_features)}; expected a subset of e1..e4")
        self._out_features = list(out_features)
        self._out_feature_channels = {f: all_channels[f] for f in self._out_features}
        self._out_feature_strides = {f: all_strides[f] for f in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 2 * self.strides[2]

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W), H and W multiples of 32 -> {"e1", "e2", "e3", "e4"} NCHW maps."""
        h, w = x.shape[-2:]
        div = self.size_divisibility
        if h % div or w % div:
            raise ValueError(
                f"segmentation backbone input {h}x{w} is not a multiple of {div}; pad it "
                "(SemanticSegmentor does so through backbone.size_divisibility)"
            )
        if self.e4_mode == "conv" and min(h, w) < 3 * self.strides[2]:
            raise ValueError(
                f"input {h}x{w} is too small for the 3x3 stride-2 E4 convolution (E3 is "
                f"{h // self.strides[2]}x{w // self.strides[2]}); use at least 64x64 or e4_mode="
                "'maxpool'"
            )
        e1, e2 = self.forward_conv_stages(x)
        tokens = self.forward_stage3(self.embed_stage3(e2))  # (B, h, w, C)
        b, h3, w3, c = tokens.shape
        # tokens -> NCHW as the official code does it (same strides, so the E4 convolution
        # rounds exactly like the official one)
        e3 = tokens.reshape(b, h3 * w3, c).transpose(1, 2).reshape(b, c, h3, w3)
        feats = {"e1": e1, "e2": e2, "e3": e3}
        if "e4" in self._out_features:
            feats["e4"] = self.fpn(e3)
        return {f: feats[f] for f in self._out_features}


@BACKBONE_REGISTRY.register()
def build_convvit_seg_backbone(cfg, input_shape: ShapeSpec) -> ConvViTSeg:
    """Build :class:`ConvViTSeg` from ``cfg.MODEL.CONVVIT`` (see ``add_convmae_config``)."""
    c = cfg.MODEL.CONVVIT
    pos_hw = tuple(c.POS_EMBED_HW)
    return ConvViTSeg(
        in_chans=input_shape.channels,
        patch_sizes=tuple(c.PATCH_SIZES),
        embed_dims=tuple(c.EMBED_DIMS),
        depths=tuple(c.DEPTHS),
        num_heads=c.NUM_HEADS,
        mlp_ratios=tuple(c.MLP_RATIOS),
        qkv_bias=c.QKV_BIAS,
        drop_path_rate=c.DROP_PATH_RATE,
        conv_norm_eps=c.CONV_NORM_EPS,
        attn_norm_eps=c.ATTN_NORM_EPS,
        patch_norm_eps=c.PATCH_NORM_EPS,
        pos_embed_hw=pos_hw,
        rel_pos=c.REL_POS,
        rel_pos_hw=tuple(c.REL_POS_HW) if len(c.REL_POS_HW) else pos_hw,
        layer_scale_init=c.LAYER_SCALE_INIT if c.LAYER_SCALE_INIT > 0 else None,
        fused_attn=c.FUSED_ATTN,
        use_act_checkpoint=c.USE_ACT_CHECKPOINT,
        e4_mode=c.E4_MODE,
        e4_norm=resolve_norm(c.E4_NORM, cfg.MODEL.DEVICE),
        out_features=tuple(c.OUT_FEATURES),
    )
