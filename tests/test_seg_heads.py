"""UperNet and FCN heads: shapes, mmseg module names, loss weighting, yacs and LazyConfig."""

import torch
import torch.nn.functional as F
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from seg_toy_fixtures import TOY_CFG

from convmae_det.engine.seg_train_loop import get_seg_cfg
from convmae_det.modeling.segmentor import EncoderDecoderSegmentor
from convmae_det.modeling.seg_backbone import ConvViTSeg
from convmae_det.modeling.upernet import FCNHead, UperNetHead

SHAPES = {
    "e1": ShapeSpec(channels=16, stride=4),
    "e2": ShapeSpec(channels=24, stride=8),
    "e3": ShapeSpec(channels=32, stride=16),
    "e4": ShapeSpec(channels=32, stride=32),
}


def _features(b=2, h=64, w=96):
    return {
        "e1": torch.randn(b, 16, h // 4, w // 4),
        "e2": torch.randn(b, 24, h // 8, w // 8),
        "e3": torch.randn(b, 32, h // 16, w // 16),
        "e4": torch.randn(b, 32, h // 32 - 1, w // 32 - 1),  # conv E4 is one smaller
    }


def test_upernet_predicts_at_stride_4_and_returns_input_resolution_logits_in_inference():
    head = UperNetHead(SHAPES, num_classes=5, channels=16).eval()
    feats = _features()
    assert head.layers(feats).shape == (2, 5, 16, 24)
    logits, losses = head(feats)
    assert logits.shape == (2, 5, 64, 96) and losses == {}


def test_upernet_has_mmseg_module_names_and_shapes():
    head = UperNetHead(SHAPES, num_classes=5, channels=16)
    sd = head.state_dict()
    assert sd["psp_modules.3.1.conv.weight"].shape == (16, 32, 1, 1)
    assert sd["bottleneck.conv.weight"].shape == (16, 32 + 4 * 16, 3, 3)
    assert sd["lateral_convs.1.conv.weight"].shape == (16, 24, 1, 1)
    assert sd["fpn_convs.2.bn.running_var"].shape == (16,)
    assert sd["fpn_bottleneck.conv.weight"].shape == (16, 4 * 16, 3, 3)
    assert sd["conv_seg.weight"].shape == (5, 16, 1, 1)
    assert "lateral_convs.3.conv.weight" not in sd and "bottleneck.conv.bias" not in sd
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1


def test_norm_is_configurable_bn_gn_or_none():
    gn = UperNetHead(SHAPES, num_classes=3, channels=32, norm="GN").state_dict()
    assert "bottleneck.gn.weight" in gn and not any(".bn." in k for k in gn)
    plain = UperNetHead(SHAPES, num_classes=3, channels=32, norm="").state_dict()
    assert "bottleneck.conv.bias" in plain and not any(".bn." in k for k in plain)


def test_training_loss_is_cross_entropy_on_upsampled_logits_ignoring_255():
    head = UperNetHead(SHAPES, num_classes=4, channels=16, dropout=0.0, loss_weight=2.0)
    feats = _features(b=2)
    targets = torch.randint(0, 4, (2, 64, 96))
    targets[:, :10] = 255
    _, losses = head(feats, targets)
    logits = F.interpolate(head.layers(feats), size=(64, 96), mode="bilinear", align_corners=False)
    want = 2.0 * F.cross_entropy(logits, targets, ignore_index=255)
    assert torch.allclose(losses["loss_sem_seg"], want, atol=1e-5)


def test_fcn_aux_head_reads_e3_and_weights_its_loss_by_0_4_in_the_segmentor():
    cfg = get_seg_cfg(
        TOY_CFG, ["MODEL.AUX_HEAD.DROPOUT", "0.0", "MODEL.SEM_SEG_HEAD.DROPOUT", "0.0"]
    )
    model = build_model(cfg).train()
    aux = model.auxiliary_head
    assert isinstance(aux, FCNHead) and aux.in_feature == "e3" and aux.loss_weight == 0.4
    assert aux.state_dict()["convs.0.conv.weight"].shape == (32, 64, 3, 3)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    labels = torch.randint(0, 6, (2, 64, 96))
    labels[0, :, :20] = 255
    batch = [{"image": images[i], "sem_seg": labels[i]} for i in range(2)]
    torch.manual_seed(1)
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg", "loss_aux"}
    x = (images.float() - model.pixel_mean) / model.pixel_std
    feats = model.backbone(x)
    logits = F.interpolate(aux.layers(feats), size=(64, 96), mode="bilinear", align_corners=False)
    want = 0.4 * F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(losses["loss_aux"], want, atol=1e-5)


def test_yacs_and_lazyconfig_build_the_same_head():
    cfg = get_seg_cfg(TOY_CFG, ["MODEL.SEM_SEG_HEAD.NORM", "GN"])
    from_yacs = UperNetHead(cfg, {k: SHAPES[k] for k in SHAPES})
    lazy = L(UperNetHead)(
        input_shape=SHAPES, num_classes=6, channels=64, pool_scales=(1, 2, 3, 6), norm="GN"
    )
    from_lazy = instantiate(lazy)
    a, b = from_yacs.state_dict(), from_lazy.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_lazyconfig_builds_a_whole_segmentor_that_runs():
    backbone = L(ConvViTSeg)(
        embed_dims=(16, 24, 32), depths=(1, 1, 1), num_heads=2, pos_embed_hw=(4, 4), e4_norm="BN"
    )
    model = L(EncoderDecoderSegmentor)(
        backbone=backbone,
        sem_seg_head=L(UperNetHead)(input_shape=SHAPES, num_classes=3, channels=16, norm="BN"),
        auxiliary_head=L(FCNHead)(
            input_shape=SHAPES, in_feature="e3", num_classes=3, channels=8, norm="BN"
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
        test_mode="slide",
        crop_size=(64, 64),
        stride=(43, 43),
    )
    net = instantiate(model).eval()
    with torch.no_grad():
        out = net([{"image": torch.zeros(3, 70, 90, dtype=torch.uint8), "height": 35, "width": 45}])
    assert out[0]["sem_seg"].shape == (3, 35, 45)


def test_upernet_head_works_inside_detectron2s_own_semantic_segmentor():
    cfg = get_seg_cfg(TOY_CFG, ["MODEL.META_ARCHITECTURE", "SemanticSegmentor"])
    model = build_model(cfg)
    assert type(model).__name__ == "SemanticSegmentor" and isinstance(
        model.sem_seg_head, UperNetHead
    )
    batch = [
        {
            "image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
            "sem_seg": torch.randint(0, 6, (64, 64)),
        }
        for _ in range(2)
    ]
    losses = model.train()(batch)
    assert set(losses) == {"loss_sem_seg"} and losses["loss_sem_seg"] > 0
    with torch.no_grad():
        out = model.eval()(
            [{"image": torch.zeros(3, 70, 90, dtype=torch.uint8), "height": 70, "width": 90}]
        )
    assert out[0]["sem_seg"].shape == (6, 70, 90)
