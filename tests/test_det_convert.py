"""Official fine-tuned detector checkpoints (both layouts) and pretraining checkpoints load into
our detectors: zero missing / unexpected keys, and the same trunk features as the official code."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, Sequence, Tuple

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate

import convmae_det  # noqa: F401
from convmae_det.checkpoint import CheckpointError, ConvMAECheckpointer, convert_checkpoint
from convmae_det.engine import load_lazy_config
from official_det_reference import paper_trunk_forward, vitdet_trunk_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
VITDET_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convmae_vitdet_toy.py")
PAPER_COCO = os.path.join(ROOT, "configs/COCO/mask_rcnn_convvitdet_b_25ep.py")
VITDET_COCO = os.path.join(ROOT, "configs/COCO/mask_rcnn_convmae_vitdet_b_25ep.py")
MAE_COCO = os.path.join(ROOT, "configs/COCO/mask_rcnn_vitdet_mae_b_100ep.py")


# --------------------------------------------------------------------- official key layouts
def _conv_stage_shapes(dims: Sequence[int], depths: Sequence[int], mlp: int = 4) -> Dict:
    """Keys / shapes of patch_embed1-4 and blocks1/2 as the official ConvViT names them."""
    shapes = {}
    chans = (3,) + tuple(dims)
    for i, p in enumerate((4, 2, 2)):
        k = f"patch_embed{i + 1}"
        shapes[f"{k}.proj.weight"] = (chans[i + 1], chans[i], p, p)
        for leaf in ("proj.bias", "norm.weight", "norm.bias"):
            shapes[f"{k}.{leaf}"] = (chans[i + 1],)
    shapes["patch_embed4.weight"] = (dims[2], dims[2])
    shapes["patch_embed4.bias"] = (dims[2],)
    for s in (1, 2):
        c = dims[s - 1]
        for i in range(depths[s - 1]):
            k = f"blocks{s}.{i}"
            for n in ("norm1", "norm2"):
                shapes[f"{k}.{n}.weight"] = shapes[f"{k}.{n}.bias"] = (c,)
            for n in ("conv1", "conv2"):
                shapes[f"{k}.{n}.weight"], shapes[f"{k}.{n}.bias"] = (c, c, 1, 1), (c,)
            shapes[f"{k}.attn.weight"], shapes[f"{k}.attn.bias"] = (c, 1, 5, 5), (c,)
            shapes[f"{k}.mlp.fc1.weight"], shapes[f"{k}.mlp.fc1.bias"] = (mlp * c, c, 1, 1), (
                mlp * c,
            )
            shapes[f"{k}.mlp.fc2.weight"], shapes[f"{k}.mlp.fc2.bias"] = (c, mlp * c, 1, 1), (c,)
    c = dims[2]
    for i in range(depths[2]):
        k = f"blocks3.{i}"
        for n in ("norm1", "norm2"):
            shapes[f"{k}.{n}.weight"] = shapes[f"{k}.{n}.bias"] = (c,)
        shapes[f"{k}.attn.qkv.weight"], shapes[f"{k}.attn.qkv.bias"] = (3 * c, c), (3 * c,)
        shapes[f"{k}.attn.proj.weight"], shapes[f"{k}.attn.proj.bias"] = (c, c), (c,)
        shapes[f"{k}.mlp.fc1.weight"], shapes[f"{k}.mlp.fc1.bias"] = (mlp * c, c), (mlp * c,)
        shapes[f"{k}.mlp.fc2.weight"], shapes[f"{k}.mlp.fc2.bias"] = (c, mlp * c), (c,)
    return shapes


def official_paper_trunk(dims, depths, heads, grid: int, window: int, seed=0) -> Dict:
    """Random official ``ConvViTDet`` trunk weights (DET/models/convmae.py), buffers included."""
    shapes = _conv_stage_shapes(dims, depths)
    shapes["pos_embed"] = (1, grid * grid, dims[2])
    for name, side in (("windowed_rel_pos_bias", window), ("global_rel_pos_bias", grid)):
        shapes[f"{name}.relative_position_bias_table"] = ((2 * side - 1) ** 2, heads)
    sd = _random(shapes, seed)
    from official_det_reference import beit_index

    sd["windowed_rel_pos_bias.relative_position_index"] = beit_index(window, window)
    sd["global_rel_pos_bias.relative_position_index"] = beit_index(grid, grid)
    return sd


def official_vitdet_trunk(dims, depths, heads, grid: int, window: int, window_blocks, seed=0):
    """Random Official-ConvMAE-Det ``ConvViT`` trunk weights (pos_embed 14x14, rel_pos_h/w)."""
    shapes = _conv_stage_shapes(dims, depths)
    shapes["pos_embed"] = (1, 196, dims[2])
    head_dim = dims[2] // heads
    for i in range(depths[2]):
        side = window if i in window_blocks else grid
        shapes[f"blocks3.{i}.attn.rel_pos_h"] = (2 * side - 1, head_dim)
        shapes[f"blocks3.{i}.attn.rel_pos_w"] = (2 * side - 1, head_dim)
    return _random(shapes, seed)


def _random(shapes: Dict[str, Tuple[int, ...]], seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        base = 1.0 if ".norm" in k and k.endswith("weight") else 0.0
        out[k] = base + 0.1 * torch.randn(shape, generator=g)
    return out


def official_detector(model: torch.nn.Module, trunk: Dict, prefix: str, seed=1) -> Dict:
    """A whole official fine-tuned file: the trunk under ``prefix`` plus random necks / heads
    (same detectron2 modules and names as ours), detectron2 layout ``{"model": ...}``."""
    g = torch.Generator().manual_seed(seed)
    sd = {prefix + k: v for k, v in trunk.items()}
    for k, v in model.state_dict().items():
        if not k.startswith(prefix):
            sd[k] = v.clone() if v.dtype == torch.long else torch.randn(v.shape, generator=g) * 0.05
    return {"model": sd, "__author__": "official"}


def _build(config: str, overrides=()):
    cfg = load_lazy_config(config, list(overrides))
    return cfg, instantiate(cfg.model).eval()


def _convert_with_tool(tmp_path, ckpt: Dict, config: str) -> str:
    src, dst = str(tmp_path / "official.pth"), str(tmp_path / "converted.pth")
    torch.save(ckpt, src)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/convert_checkpoint.py"), src, dst,
         "--config-file", config, "--strict"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "missing: 0" in proc.stdout and "unexpected: 0" in proc.stdout, proc.stdout
    return dst


# --------------------------------------------------------------------- tests
def test_official_paper_detector_converts_and_gives_the_official_features(tmp_path):
    _, model = _build(PAPER_TOY)
    trunk = official_paper_trunk((32, 64, 128), (1, 1, 3), 4, grid=12, window=4)
    dst = _convert_with_tool(
        tmp_path, official_detector(model, trunk, "backbone.bottom_up."), PAPER_TOY
    )
    DetectionCheckpointer(model).load(dst)
    x = torch.randn(2, 3, 192, 192)  # the grid of the stored pos_embed, as the official code needs
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
    ref = paper_trunk_forward(x, trunk, heads=4, window_size=4, global_blocks=(0, 2))
    for a, b in zip(("e1", "e2", "e3", "e4"), ("s0", "s1", "s2", "s3")):
        torch.testing.assert_close(ours[a], ref[b], atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw", [(160, 224), (208, 144)])
def test_official_vitdet_style_detector_converts_and_gives_the_official_features(tmp_path, hw):
    _, model = _build(VITDET_TOY)
    trunk = official_vitdet_trunk(
        (32, 64, 128), (1, 1, 3), 4, grid=12, window=4, window_blocks=(0,)
    )
    dst = _convert_with_tool(tmp_path, official_detector(model, trunk, "backbone.net."), VITDET_TOY)
    DetectionCheckpointer(model).load(dst)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        ours = model.backbone.net(x)["last_feat"]
    ref = vitdet_trunk_forward(x, trunk, heads=4, window_size=4, window_blocks=(0,))["last_feat"]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "config, prefix",
    [(PAPER_COCO, "backbone.bottom_up."), (VITDET_COCO, "backbone.net.")],
    ids=["paper", "vitdet_style"],
)
def test_full_size_official_layouts_map_onto_the_coco_configs_with_nothing_left(config, prefix):
    _, model = _build(config)
    if "bottom_up" in prefix:
        trunk = official_paper_trunk((256, 384, 768), (2, 2, 11), 12, grid=64, window=16)
    else:
        trunk = official_vitdet_trunk(
            (256, 384, 768), (2, 2, 11), 12, grid=64, window=14, window_blocks=(0, 2, 3, 5, 6, 8, 9)
        )
    state, report = convert_checkpoint(official_detector(model, trunk, prefix), model, strict=True)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert set(state) == set(model.state_dict())
    assert torch.equal(state[prefix + "pos_embed"], trunk["pos_embed"])


def _convmae_pretraining(dims, depths, heads, seed=0) -> Dict:
    """An official ConvMAE pretraining file: encoder + decoder + mask token + final norm."""
    sd = _random(_conv_stage_shapes(dims, depths), seed)
    sd["pos_embed"] = torch.randn(1, 196, dims[2]) * 0.02
    sd["norm.weight"], sd["norm.bias"] = torch.ones(dims[2]), torch.zeros(dims[2])
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_embed.weight"], sd["decoder_embed.bias"] = torch.randn(16, dims[2]), torch.zeros(16)
    sd["decoder_pos_embed"] = torch.randn(1, 196, 16)
    sd["decoder_pred.weight"] = torch.randn(3 * 16 * 16, 16)
    return {"model": sd, "epoch": 1599, "args": None}


def test_convmae_pretraining_checkpoint_loads_with_zero_missing_encoder_keys(tmp_path):
    _, model = _build(PAPER_TOY)
    path = str(tmp_path / "convmae_pretrain.pth")
    torch.save(_convmae_pretraining((32, 64, 128), (1, 1, 3), 4), path)
    ckpt = ConvMAECheckpointer(model)
    ckpt.load(path)
    report = ckpt.last_report
    assert report.missing_encoder_keys == [] and report.unexpected == []
    assert ("backbone.bottom_up.pos_embed", (1, 196, 128), (1, 144, 128)) in report.resized
    w = model.backbone.bottom_up.blocks3[2].attn.qkv.weight
    assert torch.equal(
        w, _convmae_pretraining((32, 64, 128), (1, 1, 3), 4)["model"]["blocks3.2.attn.qkv.weight"]
    )


def test_mae_vit_checkpoint_loads_into_the_vitdet_baseline_with_zero_missing_encoder_keys(tmp_path):
    overrides = ["model.backbone.net.embed_dim=64", "model.backbone.net.depth=2",
                 "model.backbone.net.num_heads=4", "model.backbone.net.window_block_indexes=[0]",
                 "model.backbone.net.img_size=256"]  # fmt: skip
    _, model = _build(MAE_COCO, overrides)
    g = torch.Generator().manual_seed(0)
    sd = {k[len("backbone.net.") :]: torch.randn(v.shape, generator=g) * 0.02
          for k, v in model.state_dict().items() if k.startswith("backbone.net.")}  # fmt: skip
    sd = {k: v for k, v in sd.items() if "rel_pos" not in k}  # MAE pretraining has none
    sd["pos_embed"] = torch.randn(1, 197, 64, generator=g)  # cls + 14x14
    sd["cls_token"] = torch.zeros(1, 1, 64)
    sd["norm.weight"], sd["norm.bias"] = torch.ones(64), torch.zeros(64)
    sd["decoder_embed.weight"], sd["mask_token"] = torch.zeros(32, 64), torch.zeros(1, 1, 32)
    path = str(tmp_path / "mae_pretrain.pth")
    torch.save({"model": sd}, path)
    ckpt = ConvMAECheckpointer(model)
    ckpt.load(path)
    assert ckpt.last_report.missing_encoder_keys == [] and ckpt.last_report.unexpected == []
    assert torch.equal(model.backbone.net.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_checkpoint_of_the_wrong_variant_reports_and_strict_refuses(tmp_path):
    """A ViTDet-style file into the paper model: decomposed tables do not exist there."""
    _, vitdet = _build(VITDET_TOY)
    trunk = official_vitdet_trunk(
        (32, 64, 128), (1, 1, 3), 4, grid=12, window=4, window_blocks=(0,)
    )
    path = str(tmp_path / "vitdet_style.pth")
    torch.save(official_detector(vitdet, trunk, "backbone.net."), path)
    _, paper = _build(PAPER_TOY)
    ckpt = ConvMAECheckpointer(paper)
    ckpt.load(path)
    assert ckpt.last_report.problems > 0
    assert any("rel_pos_h" in k for k in ckpt.last_report.unexpected)
    with pytest.raises(CheckpointError, match="strict"):
        ConvMAECheckpointer(paper, strict=True).load(path)
