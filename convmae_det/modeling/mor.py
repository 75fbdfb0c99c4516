"""Mixture of Reconstructors (MoR, FastConvMAE paper): one partially-shared decoder, several targets.

The decoder of the pretraining model is split after ``shared_depth`` blocks. The official modules
(``decoder_blocks[shared_depth:]``, ``decoder_norm``, ``decoder_pred``) stay the pixel
reconstructor, so official checkpoints keep their meaning; every other target gets its own head
(``head_depth`` transformer blocks, a LayerNorm and a linear predictor) under ``mor.heads.<name>``.

Targets, all at the stage-3 patch grid and predicted at the masked patches only:

* ``pixel``: the usual per-patch normalised pixels (computed by the pretraining model);
* ``ema``: features of an exponential-moving-average copy of the encoder run on the full image
  (``mor.ema.encoder.*``, no gradients, updated after every optimizer step with
  ``model.update_ema(progress)``; the momentum may follow a cosine ramp to ``momentum_end``);
* teachers: frozen image encoders created with timm and loaded from local checkpoint files (a
  DINO or CLIP ViT, ...). Their patch features are resized to our grid when the teacher's patch
  size differs. Teacher weights are not part of our state_dict: they come from their own files.

Feature targets are normalised per token (LayerNorm without affine, as in data2vec) unless
``target_norm=False``. The training loss is ``sum_t weight_t * loss_t``.

Config (the ``mor=`` argument of the pretraining models)::

    dict(
        head_depth=2,            # non-shared decoder blocks of every reconstructor
        pixel_weight=1.0,
        target_norm=True,
        ema=dict(weight=1.0, momentum=0.996, momentum_end=None),   # None disables the EMA target
        teachers=[dict(name="dino", arch="vit_base_patch16_224.dino",
                       checkpoint="/path/dino_vitb16.pth", weight=1.0)],
        pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225),  # input normalisation
    )
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import build_decoder_blocks, masked_mse

__all__ = [
    "ReconstructorHead",
    "EMATarget",
    "FrozenTeacher",
    "MixtureOfReconstructors",
    "build_mor",
    "load_teacher_state_dict",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReconstructorHead(nn.Module):
    """The non-shared tail of the decoder for one target: (N, L, dim) -> (N, L, out_dim)."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.blocks = build_decoder_blocks(
            dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class EMATarget(nn.Module):
    """EMA copy of the online encoder giving full-image features (B, L, C) as targets.

    Its parameters never require gradients and it always runs in eval mode (no drop path).
    """

    def __init__(self, encoder: nn.Module, *, momentum: float = 0.996, momentum_end=None):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MoR ema.momentum={momentum}; expected a value in [0, 1]")
        self.encoder = encoder.requires_grad_(False).eval()
        self.momentum = momentum
        self.momentum_end = momentum_end

    def train(self, mode: bool = True) -> "EMATarget":
        super().train(mode)
        self.encoder.eval()
        return self

    def momentum_at(self, progress: float) -> float:
        """Constant ``momentum``, or a cosine ramp from ``momentum`` to ``momentum_end``."""
        if self.momentum_end is None:
            return self.momentum
        p = min(max(progress, 0.0), 1.0)
        return (
            self.momentum_end
            - (self.momentum_end - self.momentum) * (1 + math.cos(math.pi * p)) / 2
        )

    def _pairs(self, online: nn.Module):
        source = dict(online.named_parameters())
        for name, param in self.encoder.named_parameters():
            if name not in source:
                raise KeyError(
                    f"EMA target parameter {name!r} has no counterpart in the online model"
                )
            yield param, source[name]

    @torch.no_grad()
    def reset(self, online: nn.Module) -> None:
        """Copy the online encoder's weights."""
        for ema, src in self._pairs(online):
            ema.copy_(src.detach())

    @torch.no_grad()
    def update(self, online: nn.Module, progress: float = 0.0) -> float:
        """``ema = m * ema + (1 - m) * online``; returns m."""
        m = self.momentum_at(progress)
        for ema, src in self._pairs(online):
            ema.lerp_(src.detach().to(ema.dtype), 1.0 - m)
        return m

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return self.encoder.encode_full(imgs)


def load_teacher_state_dict(
    path: str, model: Optional[nn.Module] = None
) -> Dict[str, torch.Tensor]:
    """Read a teacher's weights from a local file (``.safetensors`` or a torch file, read with
    ``load_checkpoint_file``: a file that would run code is refused with a ``CheckpointError``
    naming it), unwrap ``teacher`` / ``model`` / ``state_dict`` / ``module`` levels,
    strip ``module.`` / ``backbone.`` / ``encoder.`` prefixes and apply the timm model's own
    ``checkpoint_filter_fn`` (which converts e.g. OpenAI / open_clip CLIP and DINOv2 layouts)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MoR teacher checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        from ..checkpoint.io import load_checkpoint_file

        state = load_checkpoint_file(path)
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for key in ("teacher", "model", "state_dict", "module"):
            if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                state, unwrapped = state[key], True
                break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"MoR teacher checkpoint {path!r} holds no state dict")
    state = dict(state)
    for prefix in ("module.", "backbone.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if model is not None:
        import importlib

        filter_fn = getattr(
            importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None
        )
        if filter_fn is not None:
            state = filter_fn(state, model)
    return state


class FrozenTeacher:
    """A frozen timm image encoder giving (B, L, D) patch-feature targets on our grid.

    Deliberately not an ``nn.Module`` attribute of the model: its weights stay out of our
    state_dict, optimizer and DDP; it follows the input's device on first use.

    Args:
        name: target name (``mor.heads.<name>``).
        arch: timm model name, e.g. ``vit_base_patch16_224.dino``, ``vit_base_patch16_clip_224.openai``.
        checkpoint: local weight file (required: teachers are never downloaded).
        model_kwargs: extra ``timm.create_model`` arguments.
        mean, std: the teacher's input normalisation (default: its timm ``pretrained_cfg``).
        input_mean, input_std: the normalisation of the images the model receives.
    """

    def __init__(
        self,
        *,
        name: str,
        arch: str,
        checkpoint: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
    ):
        import timm

        kwargs = dict(pretrained=False, num_classes=0, **(model_kwargs or {}))
        try:
            model = timm.create_model(arch, dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
        except TypeError:  # not a ViT: no dynamic-size arguments
            model = timm.create_model(arch, **kwargs)
        state = load_teacher_state_dict(checkpoint, model)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(
                f"MoR teacher {name!r}: {checkpoint} does not fit timm {arch!r}; missing "
                f"{len(result.missing_keys)} keys, e.g. {result.missing_keys[:5]}"
            )
        if result.unexpected_keys:
            logger.info(
                "MoR teacher %s: ignored %d keys of %s (e.g. %s)",
                name,
                len(result.unexpected_keys),
                checkpoint,
                result.unexpected_keys[:3],
            )
        self.name = name
        self.model = model.requires_grad_(False).eval()
        self.out_dim = int(model.num_features)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        t_mean = torch.tensor(mean if mean is not None else cfg.get("mean", IMAGENET_MEAN))
        t_std = torch.tensor(std if std is not None else cfg.get("std", IMAGENET_STD))
        in_mean, in_std = torch.tensor(input_mean), torch.tensor(input_std)
        # x_teacher = x * scale + shift  ==  (x * in_std + in_mean - t_mean) / t_std
        self.scale = (in_std / t_std).reshape(1, -1, 1, 1).float()
        self.shift = ((in_mean - t_mean) / t_std).reshape(1, -1, 1, 1).float()

    def _feature_grid(self, feats: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Teacher output -> (B, D, gh, gw)."""
        if feats.dim() == 4:
            return feats
        tokens = feats[:, int(getattr(self.model, "num_prefix_tokens", 0)) :]
        embed = getattr(self.model, "patch_embed", None)
        if embed is not None and hasattr(embed, "dynamic_feat_size"):
            gh, gw = embed.dynamic_feat_size(hw)
        else:
            gh = gw = int(round(math.sqrt(tokens.shape[1])))
        if gh * gw != tokens.shape[1]:
            raise ValueError(
                f"MoR teacher {self.name!r}: {tokens.shape[1]} tokens for a {gh}x{gw} grid"
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)

    @torch.no_grad()
    def __call__(self, imgs: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """imgs (B, 3, H, W) normalised for our model -> (B, h*w, D) on our ``grid``."""
        if next(self.model.parameters()).device != imgs.device:
            self.model.to(imgs.device)
            self.scale, self.shift = self.scale.to(imgs.device), self.shift.to(imgs.device)
        x = imgs.float() * self.scale + self.shift
        feats = self._feature_grid(self.model.forward_features(x), tuple(x.shape[-2:])).float()
        gh, gw = feats.shape[-2:]
        h, w = grid
        if (gh, gw) != (h, w):
            if gh % h == 0 and gw % w == 0:
                feats = F.adaptive_avg_pool2d(feats, (h, w))
            else:
                feats = F.interpolate(feats, size=(h, w), mode="bilinear", align_corners=False)
        return feats.flatten(2).transpose(1, 2)


class MixtureOfReconstructors(nn.Module):
    """Per-target reconstructor heads on the shared decoder tokens, and their targets."""

    def __init__(
        self,
        *,
        decoder_dim: int,
        decoder_depth: int,
        decoder_num_heads: int,
        encoder_dim: int,
        encoder_factory: Callable[[], nn.Module],
        head_depth: int = 2,
        decoder_mlp_ratio: float = 4.0,
        decoder_norm_eps: float = 1e-6,
        pixel_weight: float = 1.0,
        target_norm: bool = True,
        ema: Optional[Dict[str, Any]] = None,
        teachers: Sequence[Dict[str, Any]] = (),
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if not 0 <= head_depth <= decoder_depth:
            raise ValueError(f"MoR head_depth={head_depth}; expected 0..{decoder_depth}")
        self.shared_depth = decoder_depth - head_depth
        self.target_norm = target_norm
        self.weights: Dict[str, float] = {"pixel": float(pixel_weight)}
        head_kw = dict(
            dim=decoder_dim,
            depth=head_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=decoder_mlp_ratio,
            norm_eps=decoder_norm_eps,
        )
        self.heads = nn.ModuleDict()
        self.ema = None
        if ema is not None:
            ema = dict(ema)
            self.weights["ema"] = float(ema.pop("weight", 1.0))
            self.ema = EMATarget(encoder_factory(), **ema)
            self.heads["ema"] = ReconstructorHead(out_dim=encoder_dim, **head_kw)
        self._teachers: Dict[str, FrozenTeacher] = {}
        for spec in teachers:
            spec = dict(spec)
            name = spec.get("name")
            if not name or "." in name or name in self.weights:
                raise ValueError(f"MoR teacher name {name!r} is empty, has a dot or is taken")
            self.weights[name] = float(spec.pop("weight", 1.0))
            teacher = FrozenTeacher(input_mean=pixel_mean, input_std=pixel_std, **spec)
            self._teachers[name] = teacher
            self.heads[name] = ReconstructorHead(out_dim=teacher.out_dim, **head_kw)

    @property
    def target_names(self) -> Tuple[str, ...]:
        return tuple(self.heads.keys())

    def reset_ema(self, online: nn.Module) -> None:
        if self.ema is not None:
            self.ema.reset(online)

    def update_ema(self, online: nn.Module, progress: float = 0.0) -> float:
        return self.ema.update(online, progress)

    @torch.no_grad()
    def target(self, name: str, imgs: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, L, D) target of ``name`` (normalised per token with ``target_norm``), float32
        (float64 from a float64 EMA encoder)."""
        source = self.ema if name == "ema" else self._teachers[name]
        feats = source(imgs, grid)
        feats = feats.to(torch.promote_types(feats.dtype, torch.float32))
        if self.target_norm:
            feats = F.layer_norm(feats, feats.shape[-1:])
        return feats

    def forward(
        self,
        tokens: torch.Tensor,
        imgs: torch.Tensor,
        mask: torch.Tensor,
        *,
        grid: Tuple[int, int],
        num_subsets: int = 1,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            tokens: (K*B, L, Cd) output of the shared decoder blocks.
            imgs: (B, 3, H, W) the normalised input images.
            mask: (K*B, L), 1 at the loss positions.
        Returns:
            ``{"loss_<name>": scalar}`` unweighted, one per non-pixel target.
        """
        losses = {}
        for name, head in self.heads.items():
            target = self.target(name, imgs, grid).repeat(num_subsets, 1, 1)
            losses[f"loss_{name}"] = masked_mse(head(tokens), target, mask)
        return losses

    def weighted_total(self, loss_pixel: torch.Tensor, losses: Dict[str, torch.Tensor]):
        total = self.weights["pixel"] * loss_pixel
        for name in self.heads:
            total = total + self.weights[name] * losses[f"loss_{name}"]
        return total

    def extra_repr(self) -> str:
        return f"shared_depth={self.shared_depth}, weights={self.weights}"


def build_mor(config: Dict[str, Any], **model_args: Any) -> MixtureOfReconstructors:
    """MoR from its config dict (see the module docstring) and the model's decoder / encoder
    arguments. ``ema`` defaults to enabled: pixels + EMA need no external file."""
    config = dict(config)
    config.setdefault("ema", {})
    unknown = set(config) - {
        "head_depth",
        "pixel_weight",
        "target_norm",
        "ema",
        "teachers",
        "pixel_mean",
        "pixel_std",
    }
    if unknown:
        raise KeyError(f"unknown MoR config keys {sorted(unknown)}")
    return MixtureOfReconstructors(**model_args, **config)
