"""ConvMAE and FastConvMAE pretraining models built on the shared ConvViT encoder.

Both subclass :class:`ConvViT`, so the state_dict keys are the official top-level ones: the 205
encoder keys (``patch_embed1.proj.weight``, ``blocks3.0.attn.qkv.weight``, ``norm.weight``, ...)
plus ``stage{1,2}_output_decode.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_embed.*``,
``decoder_blocks.{i}.*``, ``decoder_norm.*`` and ``decoder_pred.*`` (313 keys for Base).
The optional Mixture of Reconstructors adds its keys under ``mor.``.

Forward pass (images (B, 3, H, W), H and W multiples of 16, grid h x w = H/16 x W/16, L = h*w):

1. masking on the stage-3 grid: K visible subsets (ConvMAE K = 1, FastConvMAE K = 4);
2. stages 1-2 once, with masked convolution (the depthwise conv sees visible positions only; for
   K > 1 it runs once per subset and each position keeps its own subset's result);
3. stage 3 on the visible tokens of every subset as one (K*B, n, C) batch, plus the stage-1/2
   maps projected to the stage-3 grid (``stage{1,2}_output_decode``) at the same positions, ``norm``;
4. decoder: ``decoder_embed``, mask tokens at the hidden positions, fixed sin-cos
   ``decoder_pos_embed``, blocks, ``decoder_norm``, ``decoder_pred`` -> (K*B, L, 16*16*3);
5. loss: per-patch normalised pixels, MSE averaged over the masked patches of all subsets.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .convvit import ConvViT
from .decoder import build_decoder_blocks, gather_tokens, masked_mse, pixel_target
from .decoder import place_visible_tokens
from .masking import Masking, complementary_masking, num_kept_tokens, random_masking
from .masking import upsample_visible
from .position import get_2d_sincos_pos_embed, resize_pos_embed

__all__ = [
    "ConvMAEEncoder",
    "ConvMAE",
    "FastConvMAE",
    "build_pretrain_model",
    "PRETRAIN_ARCHS",
    "TOY_ENCODER_KWARGS",
]

SizeLike = Union[int, Tuple[int, int]]


def _pair(size: SizeLike) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class ConvMAEEncoder(ConvViT):
    """The pretraining encoder: ConvViT with a final ``norm`` and the multi-scale fusion of ConvMAE.

    Args:
        img_size: pretraining resolution; sets the grid of the fixed sin-cos ``pos_embed``
            (224 -> 14x14). Other sizes divisible by 16 also run: a fixed table is then recomputed
            as sin-cos for the actual grid (a trainable one is resized bicubically).
        **encoder_kwargs: :class:`ConvViT` arguments. Pretraining defaults: ``final_norm=True``,
            ``pos_embed_init="sincos"``, ``pos_embed_trainable=False``.
    """

    def __init__(self, *, img_size: SizeLike = 224, **encoder_kwargs: Any):
        kwargs = dict(final_norm=True, pos_embed_init="sincos", pos_embed_trainable=False)
        kwargs.update(encoder_kwargs)
        patch_sizes = tuple(kwargs.get("patch_sizes", (4, 2, 2)))
        stride = patch_sizes[0] * patch_sizes[1] * patch_sizes[2]
        size = _pair(img_size)
        if size[0] % stride or size[1] % stride:
            raise ValueError(
                f"img_size={img_size} is not a multiple of the encoder stride {stride}"
            )
        kwargs.setdefault("pos_embed_hw", (size[0] // stride, size[1] // stride))
        super().__init__(**kwargs)
        self.img_size = size
        self.encoder_kwargs = dict(encoder_kwargs)
        c1, c2, c3 = self.embed_dims
        f1, f2 = self.strides[2] // self.strides[0], self.strides[2] // self.strides[1]
        self.stage1_output_decode = nn.Conv2d(c1, c3, f1, stride=f1)
        self.stage2_output_decode = nn.Conv2d(c2, c3, f2, stride=f2)
        self._sincos_cache: Dict[Tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def token_grid(self, imgs: torch.Tensor) -> Tuple[int, int]:
        """Stage-3 grid (h, w) of a (B, C, H, W) batch; H and W must be multiples of the stride."""
        hgt, wid = imgs.shape[-2:]
        s = self.patch_stride
        if hgt % s or wid % s:
            raise ValueError(f"pretraining input {hgt}x{wid} is not a multiple of {s}")
        return hgt // s, wid // s

    def _fixed_table(self, table: torch.Tensor, stored_hw: Tuple, hw: Tuple) -> torch.Tensor:
        """``table`` for grid ``hw``: itself, a sin-cos table if it is fixed, else a resize."""
        if tuple(hw) == tuple(stored_hw):
            return table
        if table.requires_grad:
            return resize_pos_embed(table, stored_hw, hw)
        key = (table.shape[-1], tuple(hw), table.device, table.dtype)
        if key not in self._sincos_cache:
            work = torch.promote_types(table.dtype, torch.float32)  # float64 stays float64
            sincos = get_2d_sincos_pos_embed(table.shape[-1], tuple(hw), dtype=work)
            self._sincos_cache[key] = sincos.to(device=table.device, dtype=table.dtype)
        return self._sincos_cache[key]

    def get_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        return self._fixed_table(self.pos_embed, self.pos_embed_hw, hw)

    def stage_masks(
        self, masking: Masking, grid: Tuple[int, int], dtype: torch.dtype = torch.float32
    ):
        """(stage-1, stage-2) visible maps for :meth:`ConvViT.forward_conv_stages`: tensors
        (B, 1, H/4, W/4) and (B, 1, H/8, W/8) for one subset, lists of K of them otherwise."""
        f1 = self.strides[2] // self.strides[0]
        f2 = self.strides[2] // self.strides[1]
        m1 = [upsample_visible(m, grid, f1, dtype) for m in masking.masks]
        m2 = [upsample_visible(m, grid, f2, dtype) for m in masking.masks]
        if masking.num_subsets == 1:
            return m1[0], m2[0]
        return m1, m2

    def _fused_stage_maps(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        """Stage-1/2 maps projected onto the stage-3 grid and summed: (B, L, C3)."""
        d1 = self.stage1_output_decode(e1).flatten(2).transpose(1, 2)
        d2 = self.stage2_output_decode(e2).flatten(2).transpose(1, 2)
        return d1 + d2

    # ------------------------------------------------------------------ encoders
    def encode(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Masked encoder. imgs (B, 3, H, W) -> latent (K*B, n, C3), subset-major (the B samples
        of subset 0, then subset 1, ...), tokens in the order of ``masking.ids_keep``."""
        grid = self.token_grid(imgs)
        dtype = imgs.dtype
        if torch.is_autocast_enabled(imgs.device.type):
            dtype = torch.get_autocast_dtype(imgs.device.type)
        e1, e2 = self.forward_conv_stages(imgs, masks=self.stage_masks(masking, grid, dtype))
        fused = self._fused_stage_maps(e1, e2)
        x = self.embed_stage3(e2).flatten(1, 2)  # (B, L, C3), position added
        ids = masking.ids_keep
        x = torch.cat([gather_tokens(x, i) for i in ids])
        fused = torch.cat([gather_tokens(fused, i) for i in ids])
        x = self.forward_stage3(x) + fused
        return self.norm(x)

    def encode_full(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder (the EMA target of MoR). imgs (B, 3, H, W) -> (B, L, C3)."""
        e1, e2 = self.forward_conv_stages(imgs)
        x = self.forward_stage3(self.embed_stage3(e2).flatten(1, 2))
        return self.norm(x + self._fused_stage_maps(e1, e2))


class ConvMAE(ConvMAEEncoder):
    """ConvMAE: block-wise masked ConvViT encoder + MAE decoder, per-patch normalised pixel loss.

    Args:
        img_size: pretraining resolution (sets ``pos_embed`` / ``decoder_pos_embed`` grids).
        mask_ratio: default masked fraction; ``L * (1 - mask_ratio)`` must be an integer.
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio, decoder_norm_eps:
            the decoder (official: 512, 8, 16, 4, 1e-6).
        norm_pix_loss: normalise every target patch by its mean / std.
        mor: optional Mixture-of-Reconstructors config (see :mod:`convmae_det.modeling.mor`).
        **encoder_kwargs: :class:`ConvViT` arguments.
    """

    def __init__(
        self,
        *,
        img_size: SizeLike = 224,
        mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        decoder_norm_eps: float = 1e-6,
        norm_pix_loss: bool = True,
        mor: Optional[Dict[str, Any]] = None,
        **encoder_kwargs: Any,
    ):
        super().__init__(img_size=img_size, **encoder_kwargs)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        num_pos = self.pos_embed_hw[0] * self.pos_embed_hw[1]
        in_chans = self.patch_embed1.proj.in_channels
        self.in_chans = in_chans
        self.decoder_embed = nn.Linear(self.embed_dims[2], decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_pos, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = build_decoder_blocks(
            dim=decoder_embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=decoder_mlp_ratio,
            norm_eps=decoder_norm_eps,
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=decoder_norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_stride**2 * in_chans)
        self.mor = None
        if mor is not None:
            from .mor import build_mor

            self.mor = build_mor(
                mor,
                decoder_dim=decoder_embed_dim,
                decoder_depth=decoder_depth,
                decoder_num_heads=decoder_num_heads,
                decoder_mlp_ratio=decoder_mlp_ratio,
                decoder_norm_eps=decoder_norm_eps,
                encoder_dim=self.embed_dims[2],
                encoder_factory=self._make_target_encoder,
            )
        self._init_pretrain_weights()
        if self.mor is not None:
            self.mor.reset_ema(self)
        self.register_load_state_dict_post_hook(_fill_missing_ema)

    def _make_target_encoder(self) -> ConvMAEEncoder:
        kwargs = dict(self.encoder_kwargs, drop_path_rate=0.0, use_act_checkpoint=False)
        return ConvMAEEncoder(img_size=self.img_size, **kwargs)

    def _init_pretrain_weights(self) -> None:
        """Official initialisation: xavier-uniform linears (and ``patch_embed3`` as a linear),
        unit LayerNorms, N(0, 0.02) mask token, fixed sin-cos position tables."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.embed_dims[2], self.pos_embed_hw))
            dim = self.decoder_pos_embed.shape[-1]
            self.decoder_pos_embed.copy_(get_2d_sincos_pos_embed(dim, self.pos_embed_hw))

    # ------------------------------------------------------------------ masking
    def sample_masking(
        self,
        imgs: torch.Tensor,
        *,
        mask_ratio: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Masking:
        """Random block-wise masking of a batch (``noise`` (B, L) makes it deterministic)."""
        grid = self.token_grid(imgs)
        num = grid[0] * grid[1]
        keep = num_kept_tokens(num, self.mask_ratio if mask_ratio is None else mask_ratio)
        if noise is None:
            noise = torch.rand(imgs.shape[0], num, device=imgs.device)
        return random_masking(noise, keep)

    # ------------------------------------------------------------------ decoder
    @property
    def shared_decoder_depth(self) -> int:
        """Decoder blocks run before the reconstructors split (all of them without MoR)."""
        return len(self.decoder_blocks) if self.mor is None else self.mor.shared_depth

    def decoder_input(
        self, latent: torch.Tensor, masking: Masking, grid: Tuple[int, int]
    ) -> torch.Tensor:
        """latent (K*B, n, C3) -> decoder tokens (K*B, L, Cd): mask tokens + positions."""
        x = self.decoder_embed(latent)
        ids = torch.cat(masking.ids_keep)
        x = place_visible_tokens(x, ids, self.mask_token, grid[0] * grid[1])
        return x + self._fixed_table(self.decoder_pos_embed, self.pos_embed_hw, grid).to(x.dtype)

    def decode_shared(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.decoder_blocks[: self.shared_decoder_depth]:
            x = blk(x)
        return x

    def predict_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel reconstructor: the remaining decoder blocks, ``decoder_norm``, ``decoder_pred``.
        (K*B, L, Cd) -> (K*B, L, p*p*3)."""
        for blk in self.decoder_blocks[self.shared_decoder_depth :]:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    # ------------------------------------------------------------------ forward
    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Masking]:
        masking = self.sample_masking(imgs, mask_ratio=mask_ratio, noise=noise)
        return self.encode(imgs, masking), masking

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            imgs: (B, 3, H, W) normalised images, H and W multiples of 16.
            mask_ratio: overrides the model's ratio (ConvMAE only).
            noise: (B, L) masking noise, for reproducible masks.
        Returns:
            dict with ``loss`` (scalar to optimise), ``loss_pixel`` and, with MoR,
            ``loss_<target>`` for every other target (unweighted); ``pred`` (K*B, L, p*p*3)
            pixel predictions and ``mask`` (K*B, L) with 1 at the patches the loss counts.
        """
        grid = self.token_grid(imgs)
        latent, masking = self.forward_encoder(imgs, mask_ratio, noise)
        tokens = self.decode_shared(self.decoder_input(latent, masking, grid))
        pred = self.predict_pixels(tokens)
        mask = torch.cat(masking.masks)
        target = pixel_target(imgs, self.patch_stride, self.norm_pix_loss)
        target = target.repeat(masking.num_subsets, 1, 1)
        loss_pixel = masked_mse(pred, target, mask)
        out = {"loss_pixel": loss_pixel, "pred": pred, "mask": mask}
        if self.mor is None:
            out["loss"] = loss_pixel
        else:
            losses = self.mor(tokens, imgs, mask, grid=grid, num_subsets=masking.num_subsets)
            out.update(losses)
            out["loss"] = self.mor.weighted_total(loss_pixel, losses)
        return out

    @torch.no_grad()
    def update_ema(self, progress: float = 0.0) -> Optional[float]:
        """After an optimizer step: move the MoR EMA target towards the online encoder.
        ``progress`` in [0, 1] drives the momentum schedule. Returns the momentum used."""
        if self.mor is None or self.mor.ema is None:
            return None
        return self.mor.update_ema(self, progress)


class FastConvMAE(ConvMAE):
    """FastConvMAE: ``num_masks`` complementary masks per image, stages 1-2 computed once.

    The visible sets (1/num_masks of the grid each) are disjoint and tile the grid; stage 3 and the
    shared decoder process the num_masks*B masked views as one batch, and every patch is a loss
    position in num_masks - 1 of the views. Loss = sum over views of the masked-patch MSE / number
    of masked patches (as in the official code; equal to the mean of the per-view losses).
    """

    def __init__(self, *, num_masks: int = 4, **kwargs: Any):
        ratio = 1.0 - 1.0 / num_masks
        given = kwargs.pop("mask_ratio", ratio)
        if abs(given - ratio) > 1e-9:
            raise ValueError(
                f"FastConvMAE with num_masks={num_masks} masks {ratio:g} of every view; "
                f"mask_ratio={given} is not supported"
            )
        super().__init__(mask_ratio=ratio, **kwargs)
        self.num_masks = num_masks

    def sample_masking(
        self,
        imgs: torch.Tensor,
        *,
        mask_ratio: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Masking:
        if mask_ratio is not None and abs(mask_ratio - self.mask_ratio) > 1e-9:
            raise ValueError(f"FastConvMAE masks {self.mask_ratio:g}; got mask_ratio={mask_ratio}")
        grid = self.token_grid(imgs)
        if noise is None:
            noise = torch.rand(imgs.shape[0], grid[0] * grid[1], device=imgs.device)
        return complementary_masking(noise, self.num_masks)


def _fill_missing_ema(module: nn.Module, incompatible) -> None:
    """A checkpoint without the MoR EMA target (official files, or ours before MoR was on):
    start the target from the loaded encoder instead of reporting its keys as missing."""
    mor = getattr(module, "mor", None)
    if mor is None or mor.ema is None:
        return
    missing = [k for k in incompatible.missing_keys if k.startswith("mor.ema.")]
    if missing:
        mor.reset_ema(module)
        for k in missing:
            incompatible.missing_keys.remove(k)


# ---------------------------------------------------------------------- builders
TOY_ENCODER_KWARGS: Dict[str, Any] = dict(embed_dims=(32, 64, 128), depths=(1, 1, 3), num_heads=4)
"""The encoder of the toy pretraining models; ``configs/toy/mask_rcnn_convvitdet_toy.py`` uses the
same one, so the demo detector starts from the toy pretraining checkpoint."""

_TOY_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, img_size=64)

PRETRAIN_ARCHS: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "convmae_b": (ConvMAE, {}),
    "fastconvmae_b": (FastConvMAE, {}),
    "convmae_toy": (ConvMAE, dict(TOY_ENCODER_KWARGS, **_TOY_DECODER)),
    "fastconvmae_toy": (FastConvMAE, dict(TOY_ENCODER_KWARGS, **_TOY_DECODER)),
}


def build_pretrain_model(name: str, **overrides: Any) -> ConvMAE:
    """Build a pretraining model by name: ``convmae_b``, ``fastconvmae_b`` (ConvMAE-Base, the
    official configuration) or ``convmae_toy``, ``fastconvmae_toy`` (tiny, for CPU demos/tests).

    ``overrides`` replace any constructor argument, e.g. ``img_size=192``, ``mask_ratio=0.5``,
    ``drop_path_rate=0.1`` or ``mor=dict(ema=dict(momentum=0.996))``.
    """
    if name not in PRETRAIN_ARCHS:
        raise KeyError(
            f"unknown pretraining model {name!r}; expected one of {sorted(PRETRAIN_ARCHS)}"
        )
    cls, defaults = PRETRAIN_ARCHS[name]
    kwargs = copy.deepcopy(defaults)
    kwargs.update(overrides)
    return cls(**kwargs)
