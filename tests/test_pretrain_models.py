"""ConvMAE / FastConvMAE pretraining models: official keys, reference forward, no leakage."""

import pytest
import torch
import torch.nn.functional as F

from convmae_det.modeling.convvit import ConvViT
from convmae_det.modeling.pretrain import (
    TOY_ENCODER_KWARGS,
    ConvMAE,
    FastConvMAE,
    build_pretrain_model,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small CPU kernels run faster (and steadier on a busy machine) single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def official_pretrain_shapes():
    """The 313 (key, shape) pairs of the official ConvMAE-Base / FastConvMAE-Base pretraining
    state_dict, written out from the published architecture (independently of our modules)."""
    s = {"pos_embed": (1, 196, 768), "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 196, 512)}
    for i, (cin, c, p) in enumerate([(3, 256, 4), (256, 384, 2), (384, 768, 2)], start=1):
        s.update({f"patch_embed{i}.proj.weight": (c, cin, p, p), f"patch_embed{i}.proj.bias": (c,)})
        s.update({f"patch_embed{i}.norm.weight": (c,), f"patch_embed{i}.norm.bias": (c,)})
    s.update({"patch_embed4.weight": (768, 768), "patch_embed4.bias": (768,)})
    s.update({"stage1_output_decode.weight": (768, 256, 4, 4), "stage1_output_decode.bias": (768,)})
    s.update({"stage2_output_decode.weight": (768, 384, 2, 2), "stage2_output_decode.bias": (768,)})
    for stage, c in ((1, 256), (2, 384)):
        for j in range(2):
            b = f"blocks{stage}.{j}."
            for n in ("norm1", "norm2"):
                s.update({b + n + ".weight": (c,), b + n + ".bias": (c,)})
            for n in ("conv1", "conv2"):
                s.update({b + n + ".weight": (c, c, 1, 1), b + n + ".bias": (c,)})
            s.update({b + "attn.weight": (c, 1, 5, 5), b + "attn.bias": (c,)})
            s.update({b + "mlp.fc1.weight": (4 * c, c, 1, 1), b + "mlp.fc1.bias": (4 * c,)})
            s.update({b + "mlp.fc2.weight": (c, 4 * c, 1, 1), b + "mlp.fc2.bias": (c,)})

    def vit_block(prefix, c):
        out = {}
        for n in ("norm1", "norm2"):
            out.update({prefix + n + ".weight": (c,), prefix + n + ".bias": (c,)})
        out.update({prefix + "attn.qkv.weight": (3 * c, c), prefix + "attn.qkv.bias": (3 * c,)})
        out.update({prefix + "attn.proj.weight": (c, c), prefix + "attn.proj.bias": (c,)})
        out.update({prefix + "mlp.fc1.weight": (4 * c, c), prefix + "mlp.fc1.bias": (4 * c,)})
        out.update({prefix + "mlp.fc2.weight": (c, 4 * c), prefix + "mlp.fc2.bias": (c,)})
        return out

    for j in range(11):
        s.update(vit_block(f"blocks3.{j}.", 768))
    s.update({"norm.weight": (768,), "norm.bias": (768,)})
    s.update({"decoder_embed.weight": (512, 768), "decoder_embed.bias": (512,)})
    for j in range(8):
        s.update(vit_block(f"decoder_blocks.{j}.", 512))
    s.update({"decoder_norm.weight": (512,), "decoder_norm.bias": (512,)})
    s.update({"decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,)})
    return s


@pytest.fixture(scope="module")
def base_models():
    return {name: build_pretrain_model(name) for name in ("convmae_b", "fastconvmae_b")}


@pytest.mark.parametrize("name", ["convmae_b", "fastconvmae_b"])
def test_state_dict_is_exactly_the_official_313_keys_and_shapes(base_models, name):
    sd = base_models[name].state_dict()
    expected = official_pretrain_shapes()
    assert len(expected) == 313
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert abs(sum(v.numel() for v in sd.values()) / 1e6 - 115.04) < 0.01


def test_official_state_dict_loads_strictly_both_ways():
    convmae, fast = build_pretrain_model("convmae_b"), build_pretrain_model("fastconvmae_b")
    official = {k: torch.randn(v) for k, v in official_pretrain_shapes().items()}
    assert not convmae.load_state_dict(official, strict=True).missing_keys
    fast.load_state_dict(convmae.state_dict(), strict=True)
    assert torch.equal(fast.blocks3[4].attn.qkv.weight, official["blocks3.4.attn.qkv.weight"])


def test_fixed_position_tables_are_sincos_and_frozen(base_models):
    model = base_models["convmae_b"]
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    # MAE sin-cos: token 0 encodes x=0, y=0 -> sin parts 0, cos parts 1
    assert torch.allclose(model.pos_embed[0, 0, :192], torch.zeros(192))
    assert torch.allclose(model.decoder_pos_embed[0, 0, 128:256], torch.ones(128))


def test_encoder_part_equals_the_shared_convvit_keys():
    model = build_pretrain_model("convmae_toy")
    encoder = ConvViT(
        final_norm=True, pos_embed_hw=(4, 4), pos_embed_init="sincos", **TOY_ENCODER_KWARGS
    )
    ours = set(model.state_dict())
    assert set(encoder.state_dict()) <= ours
    extra = ours - set(encoder.state_dict())
    assert all(
        k.startswith(("decoder_", "mask_token", "stage1_output", "stage2_output")) for k in extra
    )


# ---------------------------------------------------------------- reference forward
def _official_flow(model, imgs, noise, num_masks):
    """The published algorithm step by step with the model's modules: masks built by
    repeat/permute, per-subset gathers, decoder by concatenating mask tokens, rolling subset k by
    k*n and unshuffling with ids_restore; loss summed over masked patches / their count."""
    b, _, hgt, wid = imgs.shape
    h, w = hgt // 16, wid // 16
    num = h * w
    n = num // num_masks if num_masks > 1 else int(num * (1 - model.mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep, masks = [], []
    for k in range(num_masks):
        ids_keep.append(ids_shuffle[:, k * n : (k + 1) * n])
        m = torch.ones(b, num)
        m[:, k * n : (k + 1) * n] = 0
        masks.append(torch.gather(m, 1, ids_restore))

    def up(mask, f):
        x = mask.reshape(-1, h, w).unsqueeze(-1).repeat(1, 1, 1, f * f).reshape(-1, h, w, f, f)
        return 1 - x.permute(0, 1, 3, 2, 4).reshape(b, h * f, w * f).unsqueeze(1)

    m1 = [up(m, 4) for m in masks]
    m2 = [up(m, 2) for m in masks]
    if num_masks == 1:
        m1, m2 = m1[0], m2[0]
    x = model.patch_embed1(imgs)
    for blk in model.blocks1:
        x = blk(x, m1)
    s1 = model.stage1_output_decode(x).flatten(2).permute(0, 2, 1)
    x = model.patch_embed2(x)
    for blk in model.blocks2:
        x = blk(x, m2)
    s2 = model.stage2_output_decode(x).flatten(2).permute(0, 2, 1)
    x = model.patch_embed4(model.patch_embed3(x).flatten(2).permute(0, 2, 1)) + model.pos_embed

    def g(t, ids):
        return torch.gather(t, 1, ids.unsqueeze(-1).repeat(1, 1, t.shape[-1]))

    x = torch.cat([g(x, i) for i in ids_keep])
    s1 = torch.cat([g(s1, i) for i in ids_keep])
    s2 = torch.cat([g(s2, i) for i in ids_keep])
    for blk in model.blocks3:
        x = blk(x)
    x = model.norm(x + s1 + s2)
    x = model.decoder_embed(x)
    x_ = torch.cat([x, model.mask_token.repeat(x.shape[0], num - n, 1)], dim=1)
    x_ = torch.cat([torch.roll(x_[k * b : (k + 1) * b], k * n, 1) for k in range(num_masks)])
    x = g(x_, ids_restore.repeat(num_masks, 1)) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))
    target = imgs.reshape(b, 3, h, 16, w, 16)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(b, num, 768)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = ((target - mean) / (var + 1e-6) ** 0.5).repeat(num_masks, 1, 1)
    mask = torch.cat(masks)
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def _toy(cls, **kw):
    torch.manual_seed(0)
    return cls(
        img_size=64,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        **TOY_ENCODER_KWARGS,
        **kw,
    ).eval()


@pytest.mark.parametrize("cls,k", [(ConvMAE, 1), (FastConvMAE, 4)])
def test_forward_matches_the_published_algorithm(cls, k):
    model = _toy(cls)
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        out = model(imgs, noise=noise)
        ref_loss, ref_pred, ref_mask = _official_flow(model, imgs, noise, k)
    assert out["loss"].dim() == 0
    assert torch.equal(out["mask"], ref_mask)
    assert torch.allclose(out["pred"], ref_pred, atol=1e-5)
    assert torch.allclose(out["loss"], ref_loss, atol=1e-6)


@pytest.mark.parametrize(
    "name,size,ratio", [("convmae_toy", (48, 80), 0.6), ("fastconvmae_toy", (96, 32), None)]
)
def test_other_input_sizes_and_ratios_run(name, size, ratio):
    model = build_pretrain_model(name)
    imgs = torch.randn(2, 3, *size)
    out = model(imgs, mask_ratio=ratio) if ratio else model(imgs)
    num = size[0] * size[1] // 256
    k = 1 if ratio else 4
    assert out["pred"].shape == (2 * k, num, 768)
    visible = (1 - out["mask"]).sum(1)
    expected = num * (1 - ratio) if ratio else num // 4
    assert torch.all(visible == expected)
    assert torch.isfinite(out["loss"])


# ---------------------------------------------------------------- leakage
def _pixel_mask(mask, grid, patch=16):
    """(B, L) token mask -> (B, 1, H, W) pixel mask."""
    m = mask.reshape(-1, 1, *grid)
    return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def test_masked_pixels_do_not_leak_into_convmae_visible_tokens():
    model = _toy(ConvMAE)
    imgs = torch.randn(2, 3, 64, 64)
    masking = model.sample_masking(imgs, noise=torch.rand(2, 16))
    hidden = _pixel_mask(masking.masks[0], (4, 4))
    changed = imgs + hidden * 5 * torch.randn_like(imgs)
    with torch.no_grad():
        a, b = model.encode(imgs, masking), model.encode(changed, masking)
        assert torch.allclose(a, b, atol=1e-6)
        # control: a visible pixel change does reach the encoder
        c = model.encode(imgs + (1 - hidden) * torch.randn_like(imgs), masking)
    assert not torch.allclose(a, c, atol=1e-3)


def test_masked_pixels_do_not_leak_into_any_fastconvmae_subset():
    model = _toy(FastConvMAE)
    imgs = torch.randn(2, 3, 64, 64)
    masking = model.sample_masking(imgs, noise=torch.rand(2, 16))
    with torch.no_grad():
        base = model.encode(imgs, masking).reshape(4, 2, 4, -1)
        for k in range(4):
            hidden = _pixel_mask(masking.masks[k], (4, 4))
            out = model.encode(imgs + hidden * 5 * torch.randn_like(imgs), masking).reshape(
                4, 2, 4, -1
            )
            assert torch.allclose(out[k], base[k], atol=1e-6)
            others = [j for j in range(4) if j != k]
            assert not torch.allclose(out[others], base[others], atol=1e-3)


def test_fastconvmae_subset_equals_convmae_with_that_mask():
    fast = _toy(FastConvMAE)
    conv = _toy(ConvMAE)
    conv.load_state_dict(fast.state_dict())
    imgs = torch.randn(2, 3, 64, 64)
    masking = fast.sample_masking(imgs, noise=torch.rand(2, 16))
    grid = (4, 4)
    with torch.no_grad():
        f1, f2 = fast.forward_conv_stages(imgs, fast.stage_masks(masking, grid))
        latent = fast.encode(imgs, masking).reshape(4, 2, 4, -1)
        for k in range(4):
            single = masking.subset(k)
            c1, c2 = conv.forward_conv_stages(imgs, conv.stage_masks(single, grid))
            v1, v2 = conv.stage_masks(single, grid)
            assert torch.allclose(f1 * v1, c1 * v1, atol=1e-5)
            assert torch.allclose(f2 * v2, c2 * v2, atol=1e-5)
            assert torch.allclose(latent[k], conv.encode(imgs, single), atol=1e-5)


# ---------------------------------------------------------------- training signal
@pytest.mark.parametrize("name", ["convmae_toy", "fastconvmae_toy"])
def test_loss_decreases_over_a_few_toy_steps(name, tmp_path):
    from convmae_det.engine.pretrain_data import ImageFiles, build_pretrain_transform
    from convmae_det.engine.pretrain_data import generate_toy_images

    generate_toy_images(str(tmp_path), num_images=8, size=64)
    data = ImageFiles(str(tmp_path), build_pretrain_transform(64))
    torch.manual_seed(0)
    imgs = torch.stack([data[i][0] for i in range(8)])
    model = build_pretrain_model(name)
    noise = torch.rand(8, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(12):
        loss = model(imgs, noise=noise)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0]
    assert losses[-1] < losses[0]
