"""ConvViTDet / PaddedSimpleFeaturePyramid: shapes, layout, shared tables, padding, and numerical
equality with independent re-implementations of the two official detector trunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

import convmae_det  # noqa: F401
from convmae_det.modeling.det_backbone import (
    PAPER_DET_WINDOW_BLOCKS,
    VITDET_WINDOW_BLOCKS,
    ConvViTDet,
    PaddedSimpleFeaturePyramid,
    window_padding_bias,
)
from official_det_reference import beit_index, paper_trunk_forward, vitdet_trunk_forward

DIMS, HEADS = (16, 24, 32), 4


def paper_trunk(**kw) -> ConvViTDet:
    """Paper layout (11 blocks, global 0/3/6/10, window 16, shared tables) at tiny width."""
    args = dict(
        embed_dims=DIMS, depths=(1, 1, 11), num_heads=HEADS, window_size=16,
        window_block_indexes=PAPER_DET_WINDOW_BLOCKS, rel_pos="shared", pos_embed_hw=(64, 64),
        rel_pos_hw=(64, 64), pos_embed_trainable=False,
    )  # fmt: skip
    args.update(kw)
    return ConvViTDet(**args).eval()


def vitdet_trunk(**kw) -> ConvViTDet:
    """Official-ConvMAE-Det layout (global 1/4/7/10, window 14, decomposed rel-pos) at tiny width."""
    args = dict(
        embed_dims=DIMS, depths=(1, 1, 11), num_heads=HEADS, window_size=14,
        window_block_indexes=VITDET_WINDOW_BLOCKS, rel_pos="decomposed", rel_pos_hw=(64, 64),
        pos_embed_hw=(14, 14), conv_norm_eps=1e-6, out_features=["e3"],
        out_feature_names=["last_feat"], e4_kind="none", mask_window_padding=False,
    )  # fmt: skip
    args.update(kw)
    return ConvViTDet(**args).eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (zero-initialised tables included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("hw", [(320, 480), (256, 256)])
def test_paper_detector_feature_shapes_and_strides(hw):
    model = paper_trunk()
    spec = model.output_shape()
    assert {k: (v.channels, v.stride) for k, v in spec.items()} == {
        "e1": (16, 4), "e2": (24, 8), "e3": (32, 16), "e4": (32, 32)
    }  # fmt: skip
    assert model.size_divisibility == 32
    assert model.padding_constraints == {"size_divisibility": 32}
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    for name, s in spec.items():
        assert out[name].shape == (1, s.channels, hw[0] // s.stride, hw[1] // s.stride)


@pytest.mark.parametrize("hw", [(320, 480), (256, 256)])
def test_vitdet_style_feature_shapes_and_strides(hw):
    model = vitdet_trunk()
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {
        "last_feat": (32, 16)
    }
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert list(out) == ["last_feat"]
    assert out["last_feat"].shape == (1, 32, hw[0] // 16, hw[1] // 16)


def test_fpn_and_simple_pyramid_produce_p2_to_p6():
    fpn = FPN(bottom_up=paper_trunk(), in_features=["e1", "e2", "e3", "e4"], out_channels=8,
              top_block=LastLevelMaxPool())  # fmt: skip
    sfp = PaddedSimpleFeaturePyramid(
        net=vitdet_trunk(), in_feature="last_feat", out_channels=8,
        scale_factors=(4.0, 2.0, 1.0, 0.5), top_block=LastLevelMaxPool(), norm="LN",
    )  # fmt: skip
    x = torch.randn(1, 3, 320, 480)
    with torch.no_grad():
        for neck in (fpn.eval(), sfp.eval()):
            out = neck(x)
            assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
            for i, name in enumerate(out):
                stride = 4 * 2**i
                assert out[name].shape[-2:] == (-(-320 // stride), -(-480 // stride))


def test_simple_pyramid_padding_constraints_are_spelled_right():
    sfp = PaddedSimpleFeaturePyramid(
        net=vitdet_trunk(), in_feature="last_feat", out_channels=8,
        scale_factors=(4.0, 2.0, 1.0, 0.5), top_block=LastLevelMaxPool(), square_pad=0,
    )  # fmt: skip
    assert sfp.size_divisibility == 32
    assert sfp.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    with torch.no_grad():
        out = sfp.eval()(torch.randn(1, 3, 100, 70))  # not a multiple of 32: padded, no error
    assert out["p2"].shape[-2:] == (32, 24) and out["p5"].shape[-2:] == (4, 3)


def test_shared_tables_are_one_parameter_object_each():
    model = paper_trunk()
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables == [
        "global_rel_pos_bias.relative_position_bias_table",
        "windowed_rel_pos_bias.relative_position_bias_table",
    ]
    g = model.global_rel_pos_bias.relative_position_bias_table
    w = model.windowed_rel_pos_bias.relative_position_bias_table
    assert g.shape == (127 * 127, HEADS) and w.shape == (31 * 31, HEADS)
    assert torch.count_nonzero(g) == 0 and torch.count_nonzero(w) == 0  # zero init
    assert not any(hasattr(b.attn, "relative_position_bias_table") for b in model.blocks3)
    # every window block and every global block feeds the same table: gradients accumulate there
    model.train()
    model(torch.randn(1, 3, 512, 512))["e3"].square().mean().backward()
    assert g.grad is not None and w.grad is not None
    assert torch.count_nonzero(g.grad) > 0 and torch.count_nonzero(w.grad) > 0


def test_global_and_window_layout_as_configured():
    paper, vitdet = paper_trunk(), vitdet_trunk()
    assert paper.global_block_indexes == (0, 3, 6, 10)
    assert [b.window_size for b in paper.blocks3] == [0, 16, 16, 0, 16, 16, 0, 16, 16, 16, 0]
    assert vitdet.global_block_indexes == (1, 4, 7, 10)
    assert [b.window_size for b in vitdet.blocks3] == [14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    head_dim = DIMS[2] // HEADS
    for i, blk in enumerate(vitdet.blocks3):
        side = 14 if i in VITDET_WINDOW_BLOCKS else 64
        assert blk.attn.rel_pos_h.shape == (2 * side - 1, head_dim)
        assert blk.attn.rel_pos_w.shape == (2 * side - 1, head_dim)
    assert not paper.pos_embed.requires_grad and paper.pos_embed.shape == (1, 4096, DIMS[2])
    assert vitdet.pos_embed.requires_grad and vitdet.pos_embed.shape == (1, 196, DIMS[2])
    eps = {m.eps for m in vitdet.blocks1.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}
    eps = {m.eps for m in paper.blocks1.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-5}


def test_e4_is_maxpool_of_e3():
    model = paper_trunk(depths=(1, 1, 2), window_block_indexes=[1])
    randomize_(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 192, 320))
    assert torch.equal(out["e4"], F.max_pool2d(out["e3"], 2))


def test_paper_detector_at_1024_matches_official_and_skips_the_padding_path():
    model = paper_trunk()
    randomize_(model, seed=1)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 1024, 1024)
    # a 64x64 grid is whole 16x16 windows: no padding mask is built at all ...
    assert window_padding_bias(1, (64, 64), 16) is None
    with torch.no_grad():
        ours = model(x)
        ref = paper_trunk_forward(x, sd, heads=HEADS, window_size=16, global_blocks=(0, 3, 6, 10))
        # ... so the masked (ours) and plain (ViTDet) padding variants agree exactly
        model.mask_window_padding = False
        plain = model(x)
    for ours_name, ref_name in zip(("e1", "e2", "e3", "e4"), ("s0", "s1", "s2", "s3")):
        torch.testing.assert_close(ours[ours_name], ref[ref_name], atol=1e-4, rtol=0)
        assert torch.equal(ours[ours_name], plain[ours_name])


@pytest.mark.parametrize("hw", [(320, 480), (208, 144)])
def test_vitdet_style_matches_official_at_odd_sizes(hw):
    model = vitdet_trunk()
    randomize_(model, seed=2)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours = model(x)["last_feat"]
        ref = vitdet_trunk_forward(
            x, sd, heads=HEADS, window_size=14, window_blocks=VITDET_WINDOW_BLOCKS
        )
    torch.testing.assert_close(ours, ref["last_feat"], atol=1e-4, rtol=0)


def test_padded_window_tokens_do_not_change_real_tokens():
    """A 6x6 grid in 4x4 windows: each partial window must equal attention over its real tokens
    alone, with the shared table indexed for the truncated window."""
    model = ConvViTDet(
        embed_dims=(8, 8, 16), depths=(1, 1, 1), num_heads=2, window_size=4,
        window_block_indexes=[0], rel_pos="shared", pos_embed_hw=(6, 6),
    )  # fmt: skip
    randomize_(model, seed=3)
    model.eval()
    blk = model.blocks3[0]
    table = model.windowed_rel_pos_bias.relative_position_bias_table
    x = torch.randn(1, 6, 6, 16)
    with torch.no_grad():
        ours = model.forward_stage3(x)
        ref = torch.empty_like(x)
        y = blk.norm1(x)
        for r0 in (0, 4):
            for c0 in (0, 4):
                win = y[:, r0 : r0 + 4, c0 : c0 + 4]
                h, w = win.shape[1:3]
                ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                ys, xs = ys.reshape(-1), xs.reshape(-1)
                idx = (ys[:, None] - ys[None] + 3) * 7 + (xs[:, None] - xs[None] + 3)
                bias = table[idx.reshape(-1)].reshape(h * w, h * w, -1).permute(2, 0, 1)
                tokens = win.reshape(1, h * w, 16)
                qkv = blk.attn.qkv(tokens).reshape(1, h * w, 3, 2, 8).permute(2, 0, 3, 1, 4)
                q, k, v = qkv[0], qkv[1], qkv[2]
                attn = ((q * 8**-0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
                out = blk.attn.proj((attn @ v).transpose(1, 2).reshape(1, h * w, 16))
                ref[:, r0 : r0 + h, c0 : c0 + w] = out.reshape(1, h, w, 16)
        ref = x + ref
        ref = ref + blk.mlp(blk.norm2(ref))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # without the mask (ViTDet zero padding), the padded zeros do leak into the partial windows
    model.mask_window_padding = False
    with torch.no_grad():
        leaky = model.forward_stage3(x)
    assert torch.allclose(leaky[:, :4, :4], ours[:, :4, :4], atol=1e-6)  # full window: same
    assert not torch.allclose(leaky[:, 4:, 4:], ours[:, 4:, 4:], atol=1e-4)


def test_input_not_divisible_by_32_is_padded_like_an_explicit_zero_pad():
    model = paper_trunk(depths=(1, 1, 2), window_block_indexes=[1], window_size=4,
                        pos_embed_hw=(8, 8), rel_pos_hw=(8, 8))  # fmt: skip
    randomize_(model, seed=4)
    x = torch.randn(1, 3, 100, 70)
    with torch.no_grad():
        out = model(x)
        ref = model(F.pad(x, (0, 26, 0, 28)))
    assert out["e1"].shape[-2:] == (32, 24)
    for name in out:
        assert torch.equal(out[name], ref[name])


@pytest.mark.parametrize("build", [paper_trunk, vitdet_trunk])
def test_image_smaller_than_one_window_works(build):
    model = build()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 64))  # 2x4 tokens, windows of 16 / 14
    e3 = out.get("e3", out.get("last_feat"))
    assert e3.shape == (1, DIMS[2], 2, 4) and torch.isfinite(e3).all()


def test_global_table_is_indexed_like_beit_at_its_own_grid():
    model = paper_trunk(depths=(1, 1, 1), window_block_indexes=[], pos_embed_hw=(6, 6),
                        rel_pos_hw=(6, 6))  # fmt: skip
    randomize_(model, seed=5)
    bias = model.global_rel_pos_bias((6, 6))
    table = model.global_rel_pos_bias.relative_position_bias_table
    expected = table[beit_index(6, 6).reshape(-1)].reshape(36, 36, -1).permute(2, 0, 1)
    assert torch.equal(bias, expected)


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="out_features"):
        ConvViTDet(out_features=["e5"])
    with pytest.raises(ValueError, match="e4_kind"):
        ConvViTDet(out_features=["e4"], e4_kind="none")
    with pytest.raises(ValueError, match="final_norm"):
        ConvViTDet(final_norm=True)


def test_output_shape_is_a_shapespec_dict():
    spec = vitdet_trunk().output_shape()
    assert spec == {"last_feat": ShapeSpec(channels=32, stride=16)}
