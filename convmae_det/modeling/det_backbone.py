"""Detection backbones on the ConvViT encoder and a feature pyramid that pads correctly.

* :class:`ConvViTDet` is the ConvViT encoder as a detectron2 :class:`Backbone`. Its stage 3 mixes
  window and global attention; layout, window size, relative-position kind (shared BEiT tables,
  per-block tables, decomposed tables) and the stride-32 level are constructor arguments, so the
  paper's multi-scale detector and the ViTDet-style detector are two argument sets of one class:

  =========================  ===============================  ==============================
  argument                   paper ("convvitdet", FPN)         ViTDet-style (SimpleFeaturePyramid)
  =========================  ===============================  ==============================
  window_block_indexes       (1, 2, 4, 5, 7, 8, 9)             (0, 2, 3, 5, 6, 8, 9)
  window_size                16                                14
  rel_pos                    "shared" (one table per kind)     "decomposed" (per block)
  pos_embed_hw               (64, 64), frozen                  (14, 14), resized every forward
  conv_norm_eps              1e-5                              1e-6
  out_features               e1, e2, e3, e4 (= maxpool(e3))    e3 (named "last_feat")
  mask_window_padding        True                              False (zero padding, official)
  =========================  ===============================  ==============================

* :class:`PaddedSimpleFeaturePyramid` is detectron2's ``SimpleFeaturePyramid`` with
  ``size_divisibility`` / ``padding_constraints`` spelled and computed right, so inputs are padded to
  a multiple of the coarsest stride even without ``square_pad``.

Inputs of any size are accepted: images are zero-padded (bottom/right) to ``size_divisibility``,
and windowed blocks pad their token grid to whole windows. With ``mask_window_padding`` the padded
tokens are excluded from attention, so they cannot change the features of real tokens; grids that
are a multiple of the window (1024 input, window 16) take exactly the unpadded path.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from .convvit import ConvViT

__all__ = [
    "ConvViTDet",
    "PaddedSimpleFeaturePyramid",
    "window_padding_bias",
    "pad_to_divisible",
    "PAPER_DET_WINDOW_BLOCKS",
    "VITDET_WINDOW_BLOCKS",
]

# blocks3 indexes with window attention; the others are global.
PAPER_DET_WINDOW_BLOCKS = (1, 2, 4, 5, 7, 8, 9)  # global at 0, 3, 6, 10
VITDET_WINDOW_BLOCKS = (0, 2, 3, 5, 6, 8, 9)  # global at 1, 4, 7, 10

_LEVELS = ("e1", "e2", "e3", "e4")
_E4_KINDS = ("maxpool", "none")


def pad_to_divisible(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) tensor at the bottom/right to multiples of ``divisor``."""
    if divisor <= 1:
        return x
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % divisor, (-w) % divisor
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


def window_padding_bias(
    batch: int,
    hw: Tuple[int, int],
    window_size: int,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Optional[torch.Tensor]:
    """Additive attention bias that hides the padded tokens of a window partition.

    The windows are ordered like detectron2's ``window_partition`` (batch, then window rows, then
    window columns). Every window holds at least one real token, so no softmax row is empty.

    Args:
        batch: B.
        hw: (h, w) token grid before padding.
    Returns:
        None when ``hw`` is a multiple of ``window_size`` (nothing is padded), otherwise a
        (B * num_windows, 1, 1, window_size**2) tensor with 0 for real and -inf for padded keys.
    """
    h, w = hw
    ws = window_size
    hp, wp = h + (-h) % ws, w + (-w) % ws
    if (hp, wp) == (h, w):
        return None
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    valid[:h, :w] = True
    valid = valid.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    bias = torch.zeros(valid.shape, dtype=dtype, device=device)
    bias.masked_fill_(~valid, float("-inf"))
    return bias[:, None, None, :].repeat(batch, 1, 1, 1)


class ConvViTDet(ConvViT, Backbone):
    """ConvViT encoder as a detectron2 backbone with window / global attention in stage 3.

    Subclassing (not wrapping) keeps the official parameter names, so fine-tuned detector weights
    load 1:1 under ``backbone.bottom_up.`` (FPN) or ``backbone.net.`` (SimpleFeaturePyramid).

    Args:
        out_features: levels to return, from ``("e1", "e2", "e3", "e4")`` with strides 4, 8, 16, 32
            and channels ``embed_dims`` (e4 has e3's channels).
        out_feature_names: names of the returned features (default: the level names), e.g.
            ``["last_feat"]`` for a SimpleFeaturePyramid.
        e4_kind: how the stride-32 level is made from e3: "maxpool" (2x2, stride 2; the paper's)
            or "none" (then "e4" may not be requested).
        mask_window_padding: hide padded tokens from window attention (see module docstring).
            False reproduces ViTDet's plain zero padding.
        **kwargs: every :class:`ConvViT` argument (keyword-only), e.g. ``window_size``,
            ``window_block_indexes``, ``rel_pos``, ``rel_pos_hw``, ``pos_embed_hw``,
            ``pos_embed_trainable``, ``conv_norm_eps``, ``drop_path_rate``. ``final_norm`` is
            not allowed: detection backbones have no final norm.

    Forward: (B, 3, H, W) with any H, W -> dict name -> (B, C_l, ceil(H/32)*32/s_l, ...).
    """

    def __init__(
        self,
        *,
        out_features: Sequence[str] = _LEVELS,
        out_feature_names: Optional[Sequence[str]] = None,
        e4_kind: str = "maxpool",
        mask_window_padding: bool = True,
        **kwargs,
    ):
        out_features = list(out_features)
        names = list(out_feature_names) if out_feature_names is not None else out_features
        if kwargs.get("final_norm", False):
            raise ValueError("ConvViTDet: final_norm=True is not supported (no final norm in det)")
        if not out_features or any(f not in _LEVELS for f in out_features):
            raise ValueError(
                f"ConvViTDet: out_features={out_features}; expected a subset of {_LEVELS}"
            )
        if e4_kind not in _E4_KINDS:
            raise ValueError(f"ConvViTDet: e4_kind={e4_kind!r}; expected one of {_E4_KINDS}")
        if "e4" in out_features and e4_kind == "none":
            raise ValueError("ConvViTDet: 'e4' requested but e4_kind='none'")
        if len(names) != len(out_features) or len(set(names)) != len(names):
            raise ValueError(
                f"ConvViTDet: out_feature_names={names} must be {len(out_features)} distinct names "
                f"for out_features={out_features}"
            )
        super().__init__(**kwargs)
        self.e4_kind = e4_kind
        self.mask_window_padding = mask_window_padding
        self._levels = out_features
        strides = dict(zip(_LEVELS, self.strides + (self.strides[-1] * 2,)))
        channels = dict(zip(_LEVELS, self.embed_dims + (self.embed_dims[-1],)))
        self._out_features = names
        self._out_feature_strides = {n: strides[lvl] for n, lvl in zip(names, out_features)}
        self._out_feature_channels = {n: channels[lvl] for n, lvl in zip(names, out_features)}
        # e4 needs an even e3 grid; e3 alone needs a whole number of patches.
        self._size_divisibility = self.strides[-1] * (2 if e4_kind != "none" else 1)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }

    def stage3_attention_biases(
        self, x: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The encoder's shared biases, plus the padding mask of partial windows when
        ``mask_window_padding`` is set (added to the window bias)."""
        global_bias, window_bias = super().stage3_attention_biases(x)
        if self.mask_window_padding and self.window_block_indexes and x.dim() == 4:
            pad_bias = window_padding_bias(
                x.shape[0], tuple(x.shape[1:3]), self.window_size, device=x.device, dtype=x.dtype
            )
            if pad_bias is not None:
                window_bias = pad_bias if window_bias is None else window_bias + pad_bias
        return global_bias, window_bias

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, C, H'/s, W'/s)}, H', W' = H, W padded to size_divisibility."""
        x = pad_to_divisible(x, self._size_divisibility)
        e1, e2 = self.forward_conv_stages(x)
        feats = {"e1": e1, "e2": e2}
        if any(level in ("e3", "e4") for level in self._levels):
            e3 = self.forward_stage3(self.embed_stage3(e2)).permute(0, 3, 1, 2)
            feats["e3"] = e3
            if "e4" in self._levels:
                feats["e4"] = F.max_pool2d(e3, kernel_size=2, stride=2)
        return {name: feats[level] for name, level in zip(self._out_features, self._levels)}


class PaddedSimpleFeaturePyramid(SimpleFeaturePyramid):
    """detectron2's SimpleFeaturePyramid (ViTDet) whose padding constraints are honoured.

    Upstream reports ``{"size_divisiblity": ...}`` (misspelled) and no ``size_divisibility``, so
    inputs are never padded to the coarsest stride unless ``square_pad`` is set. Here
    ``size_divisibility`` is the least common multiple of the pyramid's coarsest stride and the
    trunk's own divisibility, the key is spelled right, and ``forward`` pads inputs that do not
    meet it instead of failing. Arguments are those of ``SimpleFeaturePyramid``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._size_divisibility = math.lcm(
            int(self._size_divisibility), int(getattr(self.net, "size_divisibility", 0) or 1)
        )

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, C, H, W), any H, W -> {"p2", ..., "p6"} pyramid maps (see SimpleFeaturePyramid)."""
        return super().forward(pad_to_divisible(x, self._size_divisibility))
