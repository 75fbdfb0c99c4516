"""The shared ConvViT encoder: shapes, official parameter names, masked convolution, attention paths."""

import math

import pytest
import torch
import torch.nn.functional as F

from convmae_det.modeling import ConvViT
from convmae_det.modeling.position import (
    get_2d_sincos_pos_embed,
    relative_position_index,
    resize_pos_embed,
    table_rel_pos_bias,
)
from tests.conftest import tiny_convvit_kwargs


def official_encoder_keys(depths=(2, 2, 11)):
    """The encoder part of the official ConvMAE pretraining state dict, written out from SPEC §2."""
    keys = ["pos_embed", "patch_embed4.weight", "patch_embed4.bias", "norm.weight", "norm.bias"]
    for s in (1, 2, 3):
        keys += [f"patch_embed{s}.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")]
    for s, depth in ((1, depths[0]), (2, depths[1])):
        for i in range(depth):
            for m in ("norm1", "conv1", "conv2", "attn", "norm2", "mlp.fc1", "mlp.fc2"):
                keys += [f"blocks{s}.{i}.{m}.weight", f"blocks{s}.{i}.{m}.bias"]
    for i in range(depths[2]):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks3.{i}.{m}.weight", f"blocks3.{i}.{m}.bias"]
    return sorted(keys)


def test_base_encoder_has_exactly_the_official_keys_and_shapes():
    model = ConvViT(final_norm=True, pos_embed_init="sincos", pos_embed_trainable=False)
    sd = model.state_dict()
    assert sorted(sd) == official_encoder_keys()
    assert len(sd) == 205
    assert sd["pos_embed"].shape == (1, 196, 768)
    assert sd["blocks1.0.attn.weight"].shape == (256, 1, 5, 5)
    assert sd["blocks3.4.attn.qkv.weight"].shape == (2304, 768)
    assert sd["patch_embed1.proj.weight"].shape == (256, 3, 4, 4)
    assert sd["patch_embed3.proj.weight"].shape == (768, 384, 2, 2)
    assert sd["blocks2.1.mlp.fc1.weight"].shape == (1536, 384, 1, 1)
    assert not model.pos_embed.requires_grad


def test_official_state_dict_loads_strictly():
    src = ConvViT(final_norm=True)
    official = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    model = ConvViT(final_norm=True)
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.blocks3[4].attn.qkv.weight, official["blocks3.4.attn.qkv.weight"])


@pytest.mark.parametrize("hw", [(224, 224), (256, 320)])
def test_base_feature_shapes(hw):
    model = ConvViT().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    h, w = hw
    assert out["e1"].shape == (1, 256, h // 4, w // 4)
    assert out["e2"].shape == (1, 384, h // 8, w // 8)
    assert out["e3"].shape == (1, 768, h // 16, w // 16)


def test_feature_shapes_at_1024():
    model = ConvViT(**tiny_convvit_kwargs()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 1024, 1024))
    assert [tuple(out[k].shape[-2:]) for k in ("e1", "e2", "e3")] == [
        (256, 256),
        (128, 128),
        (64, 64),
    ]
    assert [out[k].shape[1] for k in ("e1", "e2", "e3")] == [32, 48, 64]


def test_input_not_multiple_of_16_is_a_clear_error():
    model = ConvViT(**tiny_convvit_kwargs())
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 3, 100, 64))


def test_drop_path_rates_increase_linearly_over_all_15_blocks():
    model = ConvViT(drop_path_rate=0.14)
    blocks = list(model.blocks1) + list(model.blocks2) + list(model.blocks3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert len(rates) == 15
    assert rates == pytest.approx([0.01 * i for i in range(15)])


def test_layernorm_eps_are_parameters():
    model = ConvViT(conv_norm_eps=1e-6, attn_norm_eps=1e-5)
    assert model.blocks1[0].norm1.eps == 1e-6 and model.blocks2[1].norm2.eps == 1e-6
    assert model.blocks3[0].norm1.eps == 1e-5
    assert model.patch_embed1.norm.eps == 1e-5


def test_pos_embed_resize_equals_torch_bicubic():
    table = torch.randn(1, 14 * 14, 8)
    out = resize_pos_embed(table, (14, 14), (20, 30))
    ref = F.interpolate(
        table.reshape(1, 14, 14, 8).permute(0, 3, 1, 2),
        size=(20, 30),
        mode="bicubic",
        align_corners=False,
    )
    assert torch.equal(out, ref.permute(0, 2, 3, 1).reshape(1, 600, 8))
    assert resize_pos_embed(table, (14, 14), (14, 14)) is table


def test_encoder_resizes_pos_embed_to_the_token_grid():
    model = ConvViT(**tiny_convvit_kwargs())
    pos = model.get_pos_embed((16, 20))
    assert pos.shape == (1, 320, 64)
    assert torch.equal(pos, resize_pos_embed(model.pos_embed, (14, 14), (16, 20)))


def test_sincos_table_matches_the_mae_formula():
    dim, (h, w) = 16, (3, 5)
    table = get_2d_sincos_pos_embed(dim, (h, w))[0]
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    y, x = 2, 3
    ex = torch.cat([torch.sin(x * omega), torch.cos(x * omega)])
    ey = torch.cat([torch.sin(y * omega), torch.cos(y * omega)])
    assert torch.allclose(table[y * w + x].double(), torch.cat([ex, ey]), atol=1e-6)


def test_masked_pixels_do_not_leak_through_masked_convolution():
    block_model = ConvViT(**tiny_convvit_kwargs()).eval()
    blk = block_model.blocks1[0]
    x = torch.randn(1, 32, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0  # top half visible
    x2 = x.clone()
    x2[..., 8:, :] = torch.randn(1, 32, 8, 16)  # change only hidden positions
    with torch.no_grad():
        a, b = blk(x, mask), blk(x2, mask)
    # the depthwise conv sees only visible inputs: visible outputs are unchanged
    assert torch.allclose(a[..., :8, :], b[..., :8, :], atol=1e-6)


def test_complementary_masks_equal_per_mask_convolution():
    blk = ConvViT(**tiny_convvit_kwargs()).blocks1[0].eval()
    x = torch.randn(2, 32, 8, 8)
    perm = torch.randperm(64)
    masks = []
    for k in range(4):
        m = torch.zeros(64)
        m[perm[k * 16 : (k + 1) * 16]] = 1
        masks.append(m.reshape(1, 1, 8, 8).expand(2, 1, 8, 8))
    with torch.no_grad():
        combined = blk(x, masks)
        for m in masks:
            single = blk(x, m)
            assert torch.allclose(combined * m, single * m, atol=1e-6)


@pytest.mark.parametrize("rel_pos", ["shared", "per_block", "decomposed", "none"])
def test_fused_and_explicit_attention_agree(rel_pos):
    kwargs = tiny_convvit_kwargs(
        window_size=4,
        window_block_indexes=[1],
        rel_pos=rel_pos,
        rel_pos_hw=(6, 8),
        pos_embed_hw=(6, 8),
    )
    model = ConvViT(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel" in name:
                p.normal_(std=0.5)
        x = torch.randn(2, 3, 96, 112)  # 6x7 grid: windows of 4 need padding
        fused = model(x)["e3"]
        model.set_fused_attn(False)
        explicit = model(x)["e3"]
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_beit_table_indexing_is_exact_on_its_own_grid_and_crops_on_smaller_grids():
    heads, (th, tw) = 2, (4, 5)
    table = torch.randn((2 * th - 1) * (2 * tw - 1), heads)
    full = table_rel_pos_bias(table, (th, tw), (th, tw))
    idx = relative_position_index((th, tw))
    assert torch.equal(full, table[idx.reshape(-1)].reshape(20, 20, heads).permute(2, 0, 1))
    # token (0,0) and (1,2) on a 2x3 grid have the same offset as on the full grid
    small = table_rel_pos_bias(table, (th, tw), (2, 3))
    assert torch.equal(small[:, 0, 1 * 3 + 2], full[:, 0, 1 * tw + 2])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = ConvViT(**tiny_convvit_kwargs(drop_path_rate=0.0))
    b = ConvViT(**tiny_convvit_kwargs(use_act_checkpoint=True))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for m in (a, b):
        m.train()
        m(x)["e3"].square().mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_invalid_layout_arguments_are_rejected_with_names():
    with pytest.raises(ValueError, match="window_block_indexes"):
        ConvViT(**tiny_convvit_kwargs(window_size=4, window_block_indexes=[7]))
    with pytest.raises(ValueError, match="rel_pos"):
        ConvViT(**tiny_convvit_kwargs(rel_pos="beit"))
