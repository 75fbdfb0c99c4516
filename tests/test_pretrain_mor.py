"""Mixture of Reconstructors: keys, partially-shared decoder, EMA target, frozen teachers."""

import pytest
import torch
import torch.nn.functional as F

from convmae_det.engine.pretrain_loop import pretrain_param_groups
from convmae_det.modeling.mor import FrozenTeacher, load_teacher_state_dict
from convmae_det.modeling.pretrain import build_pretrain_model

timm = pytest.importorskip("timm")

TEACHER_KW = dict(embed_dim=32, depth=1, num_heads=2, img_size=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    """A tiny DINO-style ViT-S/8 saved like DINO's own training checkpoints."""
    torch.manual_seed(3)
    vit = timm.create_model(
        "vit_small_patch8_224.dino",
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        **TEACHER_KW,
    )
    path = tmp_path_factory.mktemp("teachers") / "dino_tiny.pth"
    wrapped = {"teacher": {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}}
    wrapped["teacher"]["module.head.last_layer.weight"] = torch.zeros(3, 3)
    torch.save(wrapped, path)
    return str(path), vit


def _mor_model(name="convmae_toy", **mor):
    torch.manual_seed(0)
    return build_pretrain_model(name, mor=mor)


@pytest.mark.parametrize("name", ["convmae_toy", "fastconvmae_toy"])
def test_mor_adds_only_mor_prefixed_keys(name):
    plain = build_pretrain_model(name)
    model = _mor_model(name)
    keys = set(model.state_dict())
    assert {k for k in keys if not k.startswith("mor.")} == set(plain.state_dict())
    assert any(k.startswith("mor.heads.ema.blocks.1.attn.qkv") for k in keys)
    assert "mor.ema.encoder.blocks3.1.mlp.fc2.weight" in keys
    assert "mor.ema.encoder.decoder_embed.weight" not in keys


def test_pixel_reconstructor_is_the_official_decoder():
    """With no other target, MoR's pixel branch (shared blocks + pixel head) is the plain decoder."""
    plain = build_pretrain_model("convmae_toy").eval()
    mor = _mor_model(head_depth=1, ema=None).eval()
    assert mor.shared_decoder_depth == 1
    mor.load_state_dict(plain.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.no_grad():
        a, b = plain(imgs, noise=noise), mor(imgs, noise=noise)
    assert torch.allclose(a["pred"], b["pred"], atol=1e-6)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6)


def test_ema_target_starts_as_the_encoder_and_gets_no_gradient():
    model = _mor_model("fastconvmae_toy", ema=dict(weight=0.5))
    online = dict(model.named_parameters())
    for name, p in model.mor.ema.encoder.named_parameters():
        assert torch.equal(p, online[name]) and not p.requires_grad
    model.train()
    assert not model.mor.ema.encoder.training
    out = model(torch.randn(2, 3, 64, 64))
    out["loss"].backward()
    expected = out["loss_pixel"] + 0.5 * out["loss_ema"]
    assert torch.allclose(out["loss"], expected)
    assert all(p.grad is None for p in model.mor.ema.parameters())
    assert model.mor.heads["ema"].pred.weight.grad is not None
    trainable = {id(p) for g in pretrain_param_groups(model, 0.05) for p in g["params"]}
    assert not any(id(p) in trainable for p in model.mor.ema.parameters())


def test_ema_update_is_momentum_weighted_average():
    model = _mor_model(ema=dict(momentum=0.9))
    with torch.no_grad():
        for p in model.mor.ema.parameters():
            p.normal_()
    before = {k: v.clone() for k, v in model.mor.ema.encoder.named_parameters()}
    online = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert model.update_ema(progress=0.3) == pytest.approx(0.9)
    for name, p in model.mor.ema.encoder.named_parameters():
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * online[name], atol=1e-6), name


def test_ema_momentum_cosine_ramp():
    model = _mor_model(ema=dict(momentum=0.99, momentum_end=1.0))
    ema = model.mor.ema
    assert ema.momentum_at(0.0) == pytest.approx(0.99)
    assert ema.momentum_at(0.5) == pytest.approx(0.995)
    assert ema.momentum_at(1.0) == pytest.approx(1.0)


def test_checkpoint_without_ema_starts_the_target_from_the_loaded_encoder():
    plain = build_pretrain_model("convmae_toy")
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    model = _mor_model()
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("mor.heads.") for k in result.missing_keys)
    assert torch.equal(
        model.mor.ema.encoder.blocks3[0].attn.qkv.weight, plain.blocks3[0].attn.qkv.weight
    )


def test_teacher_loads_a_wrapped_local_checkpoint(dino_file):
    path, vit = dino_file
    state = load_teacher_state_dict(path)
    assert "cls_token" in state and "head.last_layer.weight" not in state
    assert torch.equal(
        state["blocks.0.attn.qkv.weight"], vit.state_dict()["blocks.0.attn.qkv.weight"]
    )


def test_teacher_with_patch8_gives_features_pooled_to_our_grid(dino_file):
    path, vit = dino_file
    teacher = FrozenTeacher(
        name="dino", arch="vit_small_patch8_224.dino", checkpoint=path, model_kwargs=TEACHER_KW
    )
    imgs = torch.randn(2, 3, 64, 96)
    feats = teacher(imgs, (4, 6))
    assert feats.shape == (2, 24, 32)
    # by hand: ImageNet-normalised input is what DINO expects; drop cls; 8x12 -> 4x6 average pool
    vit.eval()
    with torch.no_grad():
        tokens = vit.forward_features(imgs)[:, 1:]
    grid = tokens.transpose(1, 2).reshape(2, 32, 8, 12)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(feats, expected, atol=1e-5)


def test_clip_teacher_uses_its_own_normalisation(tmp_path):
    clip = timm.create_model(
        "vit_base_patch16_clip_224.openai", pretrained=False, num_classes=0, **TEACHER_KW
    )
    path = tmp_path / "clip_tiny.pth"
    torch.save(clip.state_dict(), path)
    teacher = FrozenTeacher(
        name="clip",
        arch="vit_base_patch16_clip_224.openai",
        checkpoint=str(path),
        model_kwargs=TEACHER_KW,
    )
    raw = torch.rand(1, 3, 64, 64)
    ours = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    clip_in = (
        raw - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    ) / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(ours * teacher.scale + teacher.shift, clip_in, atol=1e-5)
    clip.eval()
    with torch.no_grad():
        expected = clip.forward_features(clip_in)[:, 1:]
    assert torch.allclose(teacher(ours, (4, 4)), expected, atol=1e-4)


def test_teacher_checkpoint_that_does_not_fit_is_an_error(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"model": {"something.else": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="does not fit"):
        FrozenTeacher(
            name="t", arch="vit_small_patch8_224", checkpoint=str(path), model_kwargs=TEACHER_KW
        )
    with pytest.raises(FileNotFoundError):
        FrozenTeacher(name="t", arch="vit_small_patch8_224", checkpoint=str(tmp_path / "none.pth"))


def test_mor_with_teacher_trains_every_head_and_keeps_teacher_weights_out(dino_file):
    path, _ = dino_file
    teachers = [
        dict(
            name="dino",
            arch="vit_small_patch8_224.dino",
            checkpoint=path,
            model_kwargs=TEACHER_KW,
            weight=0.25,
        )
    ]
    model = _mor_model("fastconvmae_toy", head_depth=1, teachers=teachers, ema=dict(weight=2.0))
    assert model.mor.target_names == ("ema", "dino")
    assert not any("dino" in k and not k.startswith("mor.heads.dino") for k in model.state_dict())
    out = model(torch.randn(2, 3, 64, 64))
    expected = out["loss_pixel"] + 2.0 * out["loss_ema"] + 0.25 * out["loss_dino"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    for name in ("ema", "dino"):
        assert model.mor.heads[name].blocks[0].attn.qkv.weight.grad is not None
    assert model.decoder_blocks[0].attn.qkv.weight.grad is not None  # shared block
    teacher_params = list(model.mor._teachers["dino"].model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher_params)
