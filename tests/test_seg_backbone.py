"""The segmentation backbone: levels, strides, sizes, and equality with the official forward."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from seg_official_reference import OfficialConvMAESeg, official_head_state, randomize_
from seg_official_reference import official_upernet_forward

from convmae_det.checkpoint import ConvMAECheckpointer
from convmae_det.engine.seg_train_loop import get_seg_cfg
from convmae_det.modeling.seg_backbone import ConvViTSeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CFG = os.path.join(ROOT, "configs", "ADE20K", "upernet_convmae_toy.yaml")
TOY_DIMS, TOY_DEPTHS, TOY_HEADS = (32, 48, 64), (1, 1, 2), 2


def tiny_seg_backbone(**kw):
    args = dict(embed_dims=(16, 24, 32), depths=(1, 1, 2), num_heads=2, pos_embed_hw=(4, 4))
    args.update(kw)
    return ConvViTSeg(e4_norm="BN", **args).eval()


def test_levels_have_strides_4_8_16_32_and_official_conv_e4_has_no_padding():
    net = tiny_seg_backbone()
    out = net(torch.randn(1, 3, 128, 192))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "e1": (1, 16, 32, 48),
        "e2": (1, 24, 16, 24),
        "e3": (1, 32, 8, 12),
        "e4": (1, 32, 3, 5),  # (8 - 3) // 2 + 1, (12 - 3) // 2 + 1
    }
    shapes = net.output_shape()
    assert [shapes[k].stride for k in ("e1", "e2", "e3", "e4")] == [4, 8, 16, 32]
    assert net.size_divisibility == 32
    assert net.padding_constraints == {"size_divisibility": 32}


def test_e4_is_maxpool_of_e3_when_asked():
    net = tiny_seg_backbone(e4_mode="maxpool")
    out = net(torch.randn(2, 3, 64, 96))
    assert torch.equal(out["e4"], torch.nn.functional.max_pool2d(out["e3"], 2))


def test_every_stage3_block_is_global_with_its_own_zero_table_and_layer_scale_one():
    net = tiny_seg_backbone()
    assert net.global_block_indexes == (0, 1)
    for blk in net.blocks3:
        assert blk.window_size == 0
        assert blk.attn.relative_position_bias_table.shape == (7 * 7, 2)
        assert torch.count_nonzero(blk.attn.relative_position_bias_table) == 0
        assert torch.equal(blk.gamma_1, torch.ones(32)) and torch.equal(blk.gamma_2, torch.ones(32))
        assert blk.norm1.eps == 1e-5
    assert "fpn.0.weight" in net.state_dict() and "fpn.1.running_var" in net.state_dict()
    assert net.fpn[0].padding == (0, 0) and net.fpn[0].stride == (2, 2)


def test_input_not_divisible_by_32_is_rejected_with_its_size():
    with pytest.raises(ValueError, match="80x96 is not a multiple of 32"):
        tiny_seg_backbone()(torch.randn(1, 3, 80, 96))


def test_grids_larger_than_the_tables_run_with_resized_tables():
    net = tiny_seg_backbone()
    with torch.no_grad():
        for blk in net.blocks3:
            blk.attn.relative_position_bias_table.normal_()
    out = net(torch.randn(1, 3, 160, 96))  # 10x6 grid, tables built for 4x4
    assert out["e3"].shape == (1, 32, 10, 6) and torch.isfinite(out["e3"]).all()


def _toy_model():
    cfg = get_seg_cfg(TOY_CFG)
    return cfg, build_model(cfg).eval()


def _official_file(tmp_path):
    ref = OfficialConvMAESeg(128, TOY_DIMS, TOY_DEPTHS, TOY_HEADS)
    randomize_(ref)
    ref.eval()
    sd = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    heads = official_head_state(list(TOY_DIMS) + [TOY_DIMS[2]], 64, 6, 32)
    sd.update(heads)
    path = str(tmp_path / "official_upernet.pth")
    torch.save({"meta": {"iter": 160000}, "state_dict": sd}, path)
    return ref, heads, path


def test_official_layout_file_loads_with_nothing_missing_or_unexpected(tmp_path):
    _, _, path = _official_file(tmp_path)
    _, model = _toy_model()
    ckpt = ConvMAECheckpointer(model, strict=True)
    ckpt.load(path)
    report = ckpt.last_report
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    ignored = sum(report.ignored.values(), [])
    assert sorted(ignored) == [
        f"backbone.blocks3.{i}.attn.relative_position_index" for i in range(2)
    ]
    assert len(report.loaded) == len(model.state_dict())


def test_converted_official_segmenter_reproduces_backbone_and_decode_head(tmp_path):
    """The conversion tool maps the official file so that our model computes the same outputs."""
    ref, heads, src = _official_file(tmp_path)
    dst = str(tmp_path / "converted.pth")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), src, dst,
         "--config-file", TOY_CFG, "--strict"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg, model = _toy_model()
    state = torch.load(dst, map_location="cpu")["model"]
    incompatible = model.load_state_dict(state, strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    DetectionCheckpointer(model).load(dst)  # the documented entry point
    model.eval()

    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ours = model.backbone(x)  # official attention order (MODEL.CONVVIT.FUSED_ATTN False)
        theirs = ref(x)
        model.backbone.set_fused_attn(True)
        ours_fused = model.backbone(x)
    for name, want in zip(("e1", "e2", "e3", "e4"), theirs):
        assert ours[name].shape == want.shape
        assert (ours[name] - want).abs().max() <= 1e-5, name
        assert (ours_fused[name] - want).abs().max() <= 1e-4, name
        assert want.abs().max() > 0.1  # the comparison is not trivially between zeros
    with torch.no_grad():
        logits = model.sem_seg_head.layers(ours)
        want = official_upernet_forward(heads, list(theirs))
    assert (logits - want).abs().max() <= 1e-3 * max(1.0, want.abs().max().item())


def test_ade20k_config_builds_convmae_base_and_runs_a_512_forward():
    cfg = get_seg_cfg(os.path.join(ROOT, "configs", "ADE20K", "upernet_convmae_b_512_160k.yaml"))
    cfg.TEST.SEM_SEG.MODE = "whole"
    model = build_model(cfg).eval()
    bb = model.backbone
    assert bb.embed_dims == (256, 384, 768) and bb.depths == (2, 2, 11)
    assert bb.blocks3[10].attn.relative_position_bias_table.shape == (63 * 63, 12)
    assert bb.pos_embed.shape == (1, 1024, 768)
    assert model.sem_seg_head.conv_seg.weight.shape == (150, 768, 1, 1)
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 512, 512))
        out = model([{"image": torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)}])
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "e1": (256, 128, 128),
        "e2": (384, 64, 64),
        "e3": (768, 32, 32),
        "e4": (768, 15, 15),
    }
    assert out[0]["sem_seg"].shape == (150, 512, 512)


def test_pretraining_checkpoint_loads_with_pos_embed_resized_from_14x14(tmp_path):
    from convmae_det.modeling.convvit import ConvViT
    from convmae_det.modeling.position import resize_pos_embed

    enc = ConvViT(embed_dims=TOY_DIMS, depths=TOY_DEPTHS, num_heads=TOY_HEADS, final_norm=True)
    sd = dict(enc.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_embed.weight"] = torch.zeros(16, TOY_DIMS[2])
    path = str(tmp_path / "pretrain.pth")
    torch.save({"model": sd, "epoch": 1599}, path)
    _, model = _toy_model()
    ckpt = ConvMAECheckpointer(model)
    ckpt.load(path)
    assert ckpt.last_report.missing == [] and ckpt.last_report.unexpected == []
    want = resize_pos_embed(sd["pos_embed"], (14, 14), (8, 8))
    assert torch.allclose(model.backbone.pos_embed, want)
    assert torch.equal(model.backbone.blocks3[0].attn.qkv.weight, sd["blocks3.0.attn.qkv.weight"])
    assert torch.count_nonzero(model.backbone.blocks3[1].attn.relative_position_bias_table) == 0
