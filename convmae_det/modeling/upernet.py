"""UperNet decode head and the auxiliary FCN head, with mmsegmentation's module names.

:class:`UperNetHead` = pyramid pooling (PPM) on the coarsest level + FPN (1x1 lateral convs,
top-down sum, 3x3 convs) on the others, everything upsampled to the finest level (/4),
concatenated, fused by a 3x3 conv, dropout, 1x1 classifier. :class:`FCNHead` = a few 3x3 convs on
one level, dropout, 1x1 classifier (used as the auxiliary head on E3, loss weight 0.4).

Both follow detectron2's semantic-segmentation head contract (``forward(features, targets)``
returns ``(None, losses)`` in training and ``(logits at input resolution, {})`` in inference),
are registered in ``SEM_SEG_HEADS_REGISTRY`` and are ``@configurable`` (yacs and LazyConfig).
Attribute names equal mmseg's (``psp_modules.0.1.conv``, ``lateral_convs.0.bn``,
``fpn_bottleneck``, ``conv_seg``, ``convs.0.conv``...), so official weights map one to one.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .seg_backbone import resolve_norm

__all__ = ["ConvNormAct", "UperNetHead", "FCNHead", "segmentation_loss"]

NormSpec = Union[str, Callable[[int], nn.Module], None]


def _norm_attr(norm: nn.Module) -> str:
    """mmcv's name for a norm layer inside a ConvModule."""
    if isinstance(norm, nn.GroupNorm):
        return "gn"
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(norm, nn.LayerNorm):
        return "ln"
    return "norm"


class ConvNormAct(nn.Module):
    """Conv2d -> norm -> ReLU (mmcv ``ConvModule`` layout: ``conv``, ``bn``/``gn``, ``activate``).

    The conv has a bias only without a norm. (B, Cin, H, W) -> (B, Cout, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        norm: NormSpec = "BN",
    ):
        super().__init__()
        norm_layer = get_norm(norm, out_channels)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, bias=norm_layer is None
        )
        self.norm_name = None
        if norm_layer is not None:
            self.norm_name = _norm_attr(norm_layer)
            self.add_module(self.norm_name, norm_layer)
        self.activate = nn.ReLU()
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return self.activate(x)


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def segmentation_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_value: int, weight: float = 1.0
) -> torch.Tensor:
    """Weighted pixel cross-entropy after bilinear upsampling of (B, K, h, w) logits to the
    (B, H, W) targets; the mean runs over pixels whose label is not ``ignore_value``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32
    logits = _resize(logits, tuple(targets.shape[-2:]))
    loss = F.cross_entropy(logits, targets.long(), ignore_index=ignore_value, reduction="mean")
    if not (targets != ignore_value).any():
        loss = logits.sum() * 0.0  # a crop made only of ignore pixels
    return loss * weight


class _ClassifierMixin:
    """Dropout + 1x1 ``conv_seg`` classifier shared by the heads (mmseg ``cls_seg``)."""

    def _init_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


def _select_inputs(
    input_shape: Dict[str, ShapeSpec], in_features: Optional[Sequence[str]]
) -> Tuple[list, list, list]:
    if in_features is None:
        in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(
            f"head in_features {missing} not among backbone outputs {list(input_shape)}"
        )
    return (
        list(in_features),
        [input_shape[f].channels for f in in_features],
        [input_shape[f].stride for f in in_features],
    )


@SEM_SEG_HEADS_REGISTRY.register()
class UperNetHead(_ClassifierMixin, nn.Module):
    """UperNet decode head (PPM + FPN fusion at the finest input level).

    Args:
        input_shape: backbone output shapes; the features are used finest first.
        in_features: names to use (default: all of ``input_shape``, sorted by stride).
        num_classes: output classes.
        channels: width of every conv of the head (768 in the ConvMAE recipe, 512 generic).
        pool_scales: output sizes of the adaptive average pools of the PPM.
        norm: norm of every conv ("BN", "SyncBN", "GN", a callable, or "" for none).
        dropout: Dropout2d probability before ``conv_seg``.
        loss_weight: weight of the cross-entropy loss.
        ignore_value: label ignored by the loss.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Optional[Sequence[str]] = None,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: NormSpec = "BN",
        dropout: float = 0.1,
        loss_weight: float = 1.0,
        ignore_value: int = 255,
    ):
        super().__init__()
        self.in_features, in_channels, strides = _select_inputs(input_shape, in_features)
        if len(self.in_features) < 2:
            raise ValueError("UperNetHead needs at least two input levels")
        self.common_stride = strides[0]
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value
        self.psp_modules = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_channels[-1], channels, 1, norm=norm)
            )
            for scale in pool_scales
        )
        self.bottleneck = ConvNormAct(
            in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1, norm=norm
        )
        self.lateral_convs = nn.ModuleList(
            ConvNormAct(c, channels, 1, norm=norm) for c in in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            ConvNormAct(channels, channels, 3, padding=1, norm=norm) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = ConvNormAct(
            len(in_channels) * channels, channels, 3, padding=1, norm=norm
        )
        self._init_classifier(channels, num_classes, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "in_features": list(head.IN_FEATURES),
            "num_classes": head.NUM_CLASSES,
            "channels": head.CONVS_DIM,
            "pool_scales": tuple(head.POOL_SCALES),
            "norm": resolve_norm(head.NORM, cfg.MODEL.DEVICE),
            "dropout": head.DROPOUT,
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
        }

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) coarsest level -> (B, channels, h, w)."""
        size = tuple(x.shape[-2:])
        pooled = [_resize(ppm(x), size) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Backbone features -> (B, num_classes, H/s, W/s) logits at the finest stride s."""
        inputs = [features[f] for f in self.in_features]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = tuple(outs[0].shape[-2:])
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.cls_seg(fused)

    def forward(
        self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """
        Returns:
            training: (None, {"loss_sem_seg"}); inference: ((B, K, H, W) logits upsampled by the
            finest stride, {}).
        """
        logits = self.layers(features)
        if self.training:
            loss = segmentation_loss(
                logits, targets, ignore_value=self.ignore_value, weight=self.loss_weight
            )
            return None, {"loss_sem_seg": loss}
        size = (logits.shape[-2] * self.common_stride, logits.shape[-1] * self.common_stride)
        return _resize(logits, size), {}


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(_ClassifierMixin, nn.Module):
    """FCN head on one feature level (the auxiliary head of UperNet).

    Args:
        input_shape: backbone output shapes.
        in_feature: the level to use ("e3" for the auxiliary head).
        num_classes: output classes.
        channels: width of the convs (256 for the auxiliary head).
        num_convs: number of ``kernel_size`` convs (``convs.i``); 0 needs channels == input.
        concat_input: concatenate the input to the conv output and fuse with ``conv_cat``.
        norm, dropout, ignore_value: as in :class:`UperNetHead`.
        loss_weight: weight of its cross-entropy (0.4 as the auxiliary head).
        loss_name: key of its loss in the returned dict.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        kernel_size: int = 3,
        concat_input: bool = False,
        norm: NormSpec = "BN",
        dropout: float = 0.1,
        loss_weight: float = 0.4,
        ignore_value: int = 255,
        loss_name: str = "loss_aux",
    ):
        super().__init__()
        (self.in_feature,), (in_channels,), (stride,) = _select_inputs(input_shape, [in_feature])
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"num_convs=0 needs channels == input channels ({in_channels})")
        self.stride = stride
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value
        self.loss_name = loss_name
        pad = kernel_size // 2
        self.convs = nn.Sequential(
            *(
                ConvNormAct(
                    in_channels if i == 0 else channels,
                    channels,
                    kernel_size,
                    padding=pad,
                    norm=norm,
                )
                for i in range(num_convs)
            )
        )
        self.conv_cat = (
            ConvNormAct(in_channels + channels, channels, kernel_size, padding=pad, norm=norm)
            if concat_input
            else None
        )
        self._init_classifier(channels, num_classes, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        aux = cfg.MODEL.AUX_HEAD
        return {
            "input_shape": input_shape,
            "in_feature": aux.IN_FEATURE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "channels": aux.CHANNELS,
            "num_convs": aux.NUM_CONVS,
            "concat_input": aux.CONCAT_INPUT,
            "norm": resolve_norm(aux.NORM, cfg.MODEL.DEVICE),
            "dropout": aux.DROPOUT,
            "loss_weight": aux.LOSS_WEIGHT,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Backbone features -> (B, num_classes, H/s, W/s) logits at its level's stride s."""
        x = features[self.in_feature]
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.cls_seg(y)

    def forward(
        self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        logits = self.layers(features)
        if self.training:
            loss = segmentation_loss(
                logits, targets, ignore_value=self.ignore_value, weight=self.loss_weight
            )
            return None, {self.loss_name: loss}
        size = (logits.shape[-2] * self.stride, logits.shape[-1] * self.stride)
        return _resize(logits, size), {}
