"""float64 stays float64: trunks, segmentation backbone, table resizes and losses.

Only half precision (float16 / bfloat16) is upcast to float32 inside the models (softmax, table
resizes, losses); float32 and float64 run in their own precision. In float64 the detection trunks
(paper and ViTDet-style) and the segmentation backbone must therefore agree with the independent
reference implementations, run in float64 as well, to ~1e-12; a single float32 step would leave
differences of ~1e-7. The fp32 checks repeat the existing tolerances, so the same models stay
correct in fp32 (bitwise equality of the fp32 and bf16-autocast outputs before / after the change
was checked separately when the rule was introduced).
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from official_det_reference import paper_trunk_forward, vitdet_trunk_forward
from seg_official_reference import OfficialConvMAESeg
from seg_official_reference import randomize_ as randomize_official_

import convmae_det  # noqa: F401
from convmae_det.modeling.decoder import masked_mse, pixel_target
from convmae_det.modeling.det_backbone import ConvViTDet
from convmae_det.modeling.position import (
    get_2d_sincos_pos_embed,
    resize_pos_embed,
    resize_rel_pos_table,
)
from convmae_det.modeling.pretrain import build_pretrain_model
from convmae_det.modeling.seg_backbone import ConvViTSeg
from convmae_det.modeling.upernet import segmentation_loss

DIMS, HEADS = (16, 24, 32), 4
F64_ATOL = 1e-12


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values (in the model's own dtype) in every parameter, zero-initialised tables too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _paper_trunk(fused: bool) -> ConvViTDet:
    """Paper layout (global 0/3, shared BEiT tables) at its own 8x8 grid."""
    return ConvViTDet(
        embed_dims=DIMS, depths=(1, 1, 4), num_heads=HEADS, window_size=4,
        window_block_indexes=(1, 2), rel_pos="shared", pos_embed_hw=(8, 8), rel_pos_hw=(8, 8),
        pos_embed_trainable=False, fused_attn=fused,
    ).eval()  # fmt: skip


def _vitdet_trunk(fused: bool) -> ConvViTDet:
    """ViTDet layout (global 1/3, decomposed rel-pos, 14x14 pos_embed resized to the grid)."""
    return ConvViTDet(
        embed_dims=DIMS, depths=(1, 1, 4), num_heads=HEADS, window_size=7,
        window_block_indexes=(0, 2), rel_pos="decomposed", rel_pos_hw=(8, 8),
        pos_embed_hw=(14, 14), conv_norm_eps=1e-6, out_features=["e3"],
        out_feature_names=["last_feat"], e4_kind="none", mask_window_padding=False,
        fused_attn=fused,
    ).eval()  # fmt: skip


def _max_diff(ours: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> float:
    return max((ours[k] - ref[k]).abs().max().item() for k in ref)


def _paper_outputs(dtype: torch.dtype, fused: bool):
    model = _randomize(_paper_trunk(fused).to(dtype), seed=11)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(12), dtype=dtype)
    with torch.no_grad():
        ours = model(x)
        ref = paper_trunk_forward(x, sd, heads=HEADS, window_size=4, global_blocks=(0, 3))
    return ours, {name: ref[f"s{i}"] for i, name in enumerate(("e1", "e2", "e3", "e4"))}


def _vitdet_outputs(dtype: torch.dtype, fused: bool):
    model = _randomize(_vitdet_trunk(fused).to(dtype), seed=13)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # a 10x14 grid: pos_embed resized from 14x14, windows of 7 padded, global rel-pos resized
    x = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(14), dtype=dtype)
    with torch.no_grad():
        ours = model(x)
        ref = vitdet_trunk_forward(x, sd, heads=HEADS, window_size=7, window_blocks=(0, 2))
    return ours, ref


@pytest.mark.parametrize("build", [_paper_outputs, _vitdet_outputs], ids=["paper", "vitdet"])
def test_detection_trunks_in_float64_match_the_float64_reference(build):
    for fused in (False, True):  # explicit softmax and SDPA
        ours, ref = build(torch.float64, fused)
        for name in ref:
            assert ours[name].dtype == torch.float64 and ref[name].dtype == torch.float64
            assert ref[name].abs().max() > 0.1
        assert _max_diff(ours, ref) <= F64_ATOL, (fused, _max_diff(ours, ref))


@pytest.mark.parametrize("build", [_paper_outputs, _vitdet_outputs], ids=["paper", "vitdet"])
def test_detection_trunks_in_float32_still_match_the_reference(build):
    for fused in (False, True):
        ours, ref = build(torch.float32, fused)
        assert all(ours[k].dtype == torch.float32 for k in ours)
        assert _max_diff(ours, ref) <= 1e-4, (fused, _max_diff(ours, ref))


def _seg_outputs(dtype: torch.dtype, fused: bool):
    ref = OfficialConvMAESeg(128, DIMS, (1, 1, 2), 2)
    randomize_official_(ref, seed=15)
    ref = ref.to(dtype).eval()
    ours = ConvViTSeg(
        e4_norm="BN", embed_dims=DIMS, depths=(1, 1, 2), num_heads=2, pos_embed_hw=(8, 8),
        fused_attn=fused,
    ).to(dtype).eval()  # fmt: skip
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("relative_position_index")}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(16), dtype=dtype)
    with torch.no_grad():
        out = ours(x)
        want = dict(zip(("e1", "e2", "e3", "e4"), ref(x)))
    return out, want


def test_segmentation_backbone_in_float64_matches_the_float64_reference():
    for fused in (False, True):  # official attention order (the default) and SDPA
        ours, ref = _seg_outputs(torch.float64, fused)
        for name in ref:
            assert ours[name].dtype == torch.float64 and ref[name].dtype == torch.float64
            assert ref[name].abs().max() > 0.1
        assert _max_diff(ours, ref) <= F64_ATOL, (fused, _max_diff(ours, ref))


def test_segmentation_backbone_in_float32_still_matches_the_reference():
    ours, ref = _seg_outputs(torch.float32, False)
    assert _max_diff(ours, ref) <= 1e-5
    ours, ref = _seg_outputs(torch.float32, True)
    assert _max_diff(ours, ref) <= 1e-4


def test_resize_pos_embed_in_float64_is_a_float64_bicubic_resize():
    table = torch.randn(1, 7 * 7, 8, dtype=torch.float64)
    out = resize_pos_embed(table, (7, 7), (9, 5))
    grid = table.reshape(1, 7, 7, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(9, 5), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 45, 8)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-15, rtol=0)
    # float32 is resized in float32; half precision in float32, then rounded back
    want32 = F.interpolate(grid.float(), size=(9, 5), mode="bicubic", align_corners=False)
    want32 = want32.permute(0, 2, 3, 1).reshape(1, 45, 8)
    assert torch.equal(resize_pos_embed(table.float(), (7, 7), (9, 5)), want32)
    half = resize_pos_embed(table.half(), (7, 7), (9, 5))
    assert half.dtype == torch.float16
    assert torch.equal(half, resize_pos_embed(table.half().float(), (7, 7), (9, 5)).half())


def test_resize_rel_pos_table_in_float64_is_a_float64_bicubic_resize():
    table = torch.randn(13 * 13, 3, dtype=torch.float64)
    out = resize_rel_pos_table(table, (7, 7), (9, 9))
    src = table.reshape(13, 13, 3).permute(2, 0, 1)[None]
    want = F.interpolate(src, size=(17, 17), mode="bicubic", align_corners=False)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want[0].permute(1, 2, 0).reshape(-1, 3), atol=1e-15, rtol=0)


def test_sincos_table_is_built_in_the_requested_precision():
    t64 = get_2d_sincos_pos_embed(16, (5, 6), dtype=torch.float64)
    t32 = get_2d_sincos_pos_embed(16, (5, 6))
    assert t64.dtype == torch.float64 and t32.dtype == torch.float32
    assert torch.equal(t64.float(), t32)
    assert (t64 - t32.double()).abs().max() > 0  # not float32 values in a float64 tensor
    # a float64 pretraining model recomputes the fixed table of another grid in float64
    model = build_pretrain_model("convmae_toy").double()
    table = model.get_pos_embed((6, 4))
    assert table.dtype == torch.float64
    torch.testing.assert_close(
        table, get_2d_sincos_pos_embed(model.embed_dims[2], (6, 4), dtype=torch.float64),
        atol=0, rtol=0,
    )  # fmt: skip


def test_losses_keep_float64_and_upcast_half_precision():
    g = torch.Generator().manual_seed(17)
    imgs = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    target = pixel_target(imgs, 16)
    assert target.dtype == torch.float64
    assert pixel_target(imgs.bfloat16(), 16).dtype == torch.float32
    pred = torch.randn(target.shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(target.shape[:2], generator=g) > 0.5).float()
    loss = masked_mse(pred, target, mask)
    want = ((pred - target).pow(2).mean(-1) * mask.double()).sum() / mask.sum()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, atol=1e-15, rtol=0)
    assert masked_mse(pred.bfloat16(), target.float(), mask).dtype == torch.float32
    logits = torch.randn(2, 5, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 32, 32), generator=g)
    loss = segmentation_loss(logits, labels, ignore_value=5)
    assert loss.dtype == torch.float64
    assert segmentation_loss(logits.bfloat16(), labels, ignore_value=5).dtype == torch.float32


def test_pretraining_model_runs_in_float64_end_to_end():
    model = build_pretrain_model("convmae_toy").double().eval()
    g = torch.Generator().manual_seed(18)
    imgs = torch.randn(2, 3, 96, 64, generator=g, dtype=torch.float64)  # not the 64x64 grid
    noise = torch.rand(2, 24, generator=g)
    with torch.no_grad():
        out = model(imgs, noise=noise)
    assert out["loss"].dtype == torch.float64 and out["pred"].dtype == torch.float64
    assert torch.isfinite(out["loss"])
