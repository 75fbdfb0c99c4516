"""Pretraining reconstructions: for a ConvMAE / FastConvMAE model and an image, a grid with one row
per mask (one for ConvMAE, ``num_masks`` complementary ones for FastConvMAE) and four columns:
original, masked input, reconstruction, reconstruction with the visible patches pasted.

``norm_pix_loss`` models predict every patch normalised by its own mean / variance. Visible patches
are de-normalised with their own statistics; masked patches, whose statistics the model never saw,
with the mean statistics of the visible patches of the same view (nothing of the hidden pixels is
used).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.decoder import patchify, unpatchify

__all__ = [
    "COLUMNS",
    "OFFICIAL_MODEL_NAMES",
    "load_pretrain_model",
    "pretrain_model_kwargs",
    "reconstruct",
    "reconstruction_grid",
    "denormalize_patches",
    "save_reconstruction_grids",
]

logger = logging.getLogger(__name__)
COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


OFFICIAL_MODEL_NAMES: Dict[str, str] = {
    "convmae_convvit_base_patch16": "convmae_b",
    "convmae_convvit_base_patch16_dec512d8b": "convmae_b",
    "fastconvmae_convvit_base_patch16": "fastconvmae_b",
    "fastconvmae_convvit_base_patch16_dec512d8b": "fastconvmae_b",
}
"""``--model`` values of the official ConvMAE / FastConvMAE pretraining scripts (stored as
``args.model`` in their checkpoints) -> our :func:`build_pretrain_model` names. The other sizes
of those scripts (``convmae_convvit_small_patch16``, ``..._large_patch16``, ...) are recognised
but have no builder here (convmae_det builds ConvMAE-Base)."""
_OFFICIAL_FAMILY = re.compile(r"^(fast)?convmae_convvit_[a-z]+_patch\d+(_dec\w+)?$")


def _official_args(args: Any) -> Dict[str, Any]:
    """An official checkpoint's ``args`` (``argparse.Namespace`` or dict) as a dict."""
    if isinstance(args, dict):
        return args
    return dict(vars(args)) if hasattr(args, "__dict__") else {}


def pretrain_model_kwargs(path: str, args: Any, name: Optional[str] = None) -> Dict[str, Any]:
    """The :func:`build_pretrain_model` keywords for a checkpoint's ``args``.

    Our pretraining stores the model config (``args["model"]``, a dict with ``name``); official
    files store the command line (``args.model`` such as ``convmae_convvit_base_patch16``, plus
    ``norm_pix_loss``, ``input_size``, ``mask_ratio``), mapped with :data:`OFFICIAL_MODEL_NAMES`.
    ``name`` (the tool's ``--model``) wins over both. Raises ValueError when no name is known.
    """
    from ..modeling.pretrain import PRETRAIN_ARCHS

    args = _official_args(args)
    model_args = args.get("model")
    kwargs: Dict[str, Any] = {}
    if isinstance(model_args, dict):  # ours: the LazyCall of build_pretrain_model
        kwargs = {k: v for k, v in model_args.items() if not k.startswith("_")}
    elif isinstance(model_args, str):  # an official command line
        ours = model_args if model_args in PRETRAIN_ARCHS else None
        ours = OFFICIAL_MODEL_NAMES.get(model_args, ours)
        if ours is None and name is None and _OFFICIAL_FAMILY.match(model_args):
            raise ValueError(
                f"{path}: the checkpoint holds the official {model_args!r}, which convmae_det "
                f"has no builder for (known: {sorted(PRETRAIN_ARCHS)})"
            )
        if ours is not None:
            kwargs["name"] = ours
        if isinstance(args.get("norm_pix_loss"), bool):
            kwargs["norm_pix_loss"] = args["norm_pix_loss"]
        if isinstance(args.get("input_size"), int):
            kwargs["img_size"] = args["input_size"]
        if isinstance(args.get("mask_ratio"), float):
            kwargs["mask_ratio"] = args["mask_ratio"]
    if name is not None:
        kwargs["name"] = name
    if "name" not in kwargs:
        raise ValueError(
            f"{path}: the checkpoint does not say which pretraining model it holds "
            f"(args.model = {model_args!r}); pass --model NAME (tools/visualize_pretrain.py; "
            f"name= in Python), one of {sorted(PRETRAIN_ARCHS)}"
        )
    if kwargs["name"].startswith("fastconvmae") and isinstance(model_args, str):
        kwargs.pop("mask_ratio", None)  # fixed by the number of complementary masks
    return kwargs


def load_pretrain_model(path: str, *, name: Optional[str] = None, **overrides: Any):
    """Build the pretraining model of a checkpoint and load its weights.

    The model is named by ``name`` (e.g. ``fastconvmae_toy``, ``convmae_b``) or else read from the
    checkpoint: our pretraining's ``args["model"]``, or an official file's ``args.model``
    (``convmae_convvit_base_patch16``, ``fastconvmae_convvit_base_patch16``; see
    :func:`pretrain_model_kwargs`).
    """
    from ..engine.pretrain_checkpoint import load_pretrain_checkpoint
    from ..modeling.pretrain import build_pretrain_model

    ckpt = load_pretrain_checkpoint(path)
    kwargs = pretrain_model_kwargs(path, ckpt.get("args") or {}, name)
    kwargs.update(overrides)
    model = build_pretrain_model(**kwargs)
    incompatible = model.load_state_dict(ckpt["model"], strict=False)
    if incompatible.missing_keys:
        raise ValueError(
            f"{path}: checkpoint lacks {len(incompatible.missing_keys)} keys of "
            f"{kwargs['name']}, e.g. {incompatible.missing_keys[:3]}"
        )
    return model.eval()


def denormalize_patches(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Undo the per-patch normalisation of ``norm_pix`` predictions.

    Args:
        pred: (B, L, D) normalised predictions; target: (B, L, D) the input's patches;
        mask: (B, L), 1 = masked. Visible patches use their own mean / variance, masked patches
        the average mean / variance of the visible patches of the same row.
    Returns:
        (B, L, D) predictions in the input's (normalised-image) units.
    """
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True)
    visible = (1 - mask).unsqueeze(-1).to(target.dtype)
    count = visible.sum(1, keepdim=True).clamp(min=1)
    vis_mean = (mean * visible).sum(1, keepdim=True) / count
    vis_var = (var * visible).sum(1, keepdim=True) / count
    m = mask.unsqueeze(-1).bool()
    mean = torch.where(m, vis_mean.expand_as(mean), mean)
    var = torch.where(m, vis_var.expand_as(var), var)
    return pred * (var + eps) ** 0.5 + mean


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, *, noise: Optional[torch.Tensor] = None) -> Dict:
    """Run ``model`` on (B, 3, H, W) normalised images.

    Returns dict with (K, B, 3, H, W) tensors ``masked``, ``reconstruction``, ``pasted`` (all in
    normalised units; masked pixels of ``masked`` are 0) and ``mask`` (K, B, 1, H, W) with 1 at
    masked pixels.
    """
    b = imgs.shape[0]
    p = model.patch_stride
    grid = model.token_grid(imgs)
    out = model(imgs, noise=noise)
    pred, mask = out["pred"].float(), out["mask"].float()  # (K*B, L, D), (K*B, L)
    k = pred.shape[0] // b
    target = patchify(imgs.float(), p).repeat(k, 1, 1)
    if getattr(model, "norm_pix_loss", False):
        pred = denormalize_patches(pred, target, mask)
    chans = imgs.shape[1]
    rec = unpatchify(pred, p, grid, chans)
    pix_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p), p, grid, 1)
    full = imgs.float().repeat(k, 1, 1, 1)
    masked = full * (1 - pix_mask)
    pasted = full * (1 - pix_mask) + rec * pix_mask
    shape = lambda t: t.reshape(k, b, *t.shape[1:])  # noqa: E731
    return {
        "masked": shape(masked),
        "reconstruction": shape(rec),
        "pasted": shape(pasted),
        "mask": shape(pix_mask),
    }


def _to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8 RGB."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (x.cpu() * s + m).clamp(0, 1) * 255
    return x.round().byte().permute(1, 2, 0).numpy()


def reconstruction_grid(
    model,
    image: np.ndarray,
    *,
    seed: int = 0,
    mean: Sequence[float] = _MEAN,
    std: Sequence[float] = _STD,
    size: Optional[Tuple[int, int]] = None,
    pad: int = 2,
) -> Tuple[np.ndarray, np.ndarray]:
    """The reconstruction grid of one (H, W, 3) uint8 RGB image.

    The image is resized to ``size`` (default: the model's ``img_size``). Returns ``(grid,
    panels)``: ``grid`` (K*(S+pad)-pad, 4*(S'+pad)-pad, 3) uint8 with white separators, and
    ``panels`` (K, 4, S, S', 3) uint8 in the column order of :data:`COLUMNS`.
    """
    h, w = size or tuple(getattr(model, "img_size", image.shape[:2]))
    x = torch.as_tensor(image).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = (x.clamp(0, 1) * 255).round() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    gh, gw = model.token_grid(x)
    noise = torch.rand(1, gh * gw, generator=gen)
    res = reconstruct(model, x.to(device), noise=noise.to(device))
    k = res["masked"].shape[0]
    original = _to_uint8(x[0], mean, std)
    gray = np.full_like(original, 127)
    panels = np.zeros((k, 4, h, w, 3), dtype=np.uint8)
    for i in range(k):
        masked = _to_uint8(res["masked"][i, 0], mean, std)
        m = res["mask"][i, 0, 0].cpu().numpy().astype(bool)
        masked[m] = gray[m]
        panels[i, 0] = original
        panels[i, 1] = masked
        panels[i, 2] = _to_uint8(res["reconstruction"][i, 0], mean, std)
        panels[i, 3] = _to_uint8(res["pasted"][i, 0], mean, std)
    grid = np.full((k * (h + pad) - pad, 4 * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i in range(k):
        for j in range(4):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = panels[
                i, j
            ]
    return grid, panels


def save_reconstruction_grids(
    model, image_paths: Sequence[str], output_dir: str, *, seed: int = 0, scale: int = 1
) -> list:
    """Write ``recon_<image name>.png`` for every image (grid upscaled ``scale`` times with
    nearest neighbours); returns the paths."""
    from PIL import Image

    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for path in image_paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        grid, _ = reconstruction_grid(model, image, seed=seed)
        if scale > 1:
            grid = grid.repeat(scale, 0).repeat(scale, 1)
        name = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(output_dir, f"recon_{name}.png")
        Image.fromarray(grid).save(out)
        paths.append(out)
    return paths
