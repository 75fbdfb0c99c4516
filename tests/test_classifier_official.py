"""``ConvViTClassifierNet`` against an independent re-implementation of the official ConvMAE
classifier (``tests/classification_official_reference.py``): the same 207 keys and shapes, and
the same logits when an official-layout file is loaded through our checkpoint path (the
checkpointer, ``convert_checkpoint`` and ``tools/convert_checkpoint.py --config-file``); the
pos_embed resize at 384, the linear-probe features, and a file whose head has another class
count. fp32, CPU, eval mode."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict

import pytest
import torch
from classification_official_reference import (
    OfficialConvViTClassifier,
    randomize_,
    resize_pos_embed_like_official,
)
from detectron2.checkpoint import DetectionCheckpointer

from convmae_det.checkpoint import ConvMAECheckpointer, convert_checkpoint
from convmae_det.modeling.classifier import ConvViTClassifierNet, ImageClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE_CONFIG = os.path.join(ROOT, "configs", "ImageNet", "convvit_b_finetune_100ep.py")
TINY = dict(embed_dims=(32, 48, 64), depths=(1, 1, 3), num_heads=4)
ATOL = 1e-4


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _save_official(ref: torch.nn.Module, path: str) -> str:
    torch.save({"model": ref.state_dict()}, path)
    return path


def _logits(model: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        outputs = model.eval()([{"image": im} for im in images])
    return torch.stack([o["logits"] for o in outputs])


@pytest.fixture(scope="module")
def base_official(tmp_path_factory) -> Dict[str, Any]:
    """The Base reference (random, non-trivial), its official-layout file and its outputs at 224."""
    ref = randomize_(OfficialConvViTClassifier(), seed=1).eval()
    path = _save_official(ref, str(tmp_path_factory.mktemp("base") / "official_base.pth"))
    images = _images(1, 224, seed=2)
    with torch.no_grad():
        logits = ref(images)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    return {"path": path, "images": images, "logits": logits, "shapes": shapes}


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory) -> Dict[str, Any]:
    """A narrow reference (same structure) for the cheaper checks, 10 classes."""
    ref = randomize_(OfficialConvViTClassifier(num_classes=10, **TINY), seed=3).eval()
    path = _save_official(ref, str(tmp_path_factory.mktemp("tiny") / "official_tiny.pth"))
    return {"ref": ref, "path": path}


def test_base_key_names_and_shapes_are_the_official_ones(base_official):
    ours = {k: tuple(v.shape) for k, v in ConvViTClassifierNet().state_dict().items()}
    official = base_official["shapes"]
    assert len(official) == 207
    assert set(ours) == set(official), (sorted(set(ours) - set(official)), sorted(set(official) - set(ours)))  # fmt: skip
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


def test_base_224_logits_match_the_reference_through_the_checkpointer(base_official):
    model = ImageClassifier(net=ConvViTClassifierNet())
    checkpointer = ConvMAECheckpointer(model, strict=True)
    checkpointer.load(base_official["path"])
    report = checkpointer.last_report
    assert report.format == "convvit_imagenet_finetune"
    assert report.problems == 0 and not report.resized
    assert len(report.loaded) == 207
    assert "net.head.weight" in report.loaded and "net.fc_norm.weight" in report.loaded
    logits = _logits(model, base_official["images"])
    expected = base_official["logits"]
    assert logits.shape == expected.shape == (1, 1000)
    assert expected.abs().max() > 1.0  # not a trivially small output
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.skipif(
    not os.path.isfile(FINETUNE_CONFIG),
    reason="configs/ImageNet/convvit_b_finetune_100ep.py does not exist yet",
)
def test_base_logits_match_after_tools_convert_checkpoint_with_the_finetune_config(
    base_official, tmp_path
):
    from convmae_det.model_from_config import build_model_from_config, load_any_config

    dst = str(tmp_path / "converted.pth")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "convert_checkpoint.py"),
            base_official["path"],
            dst,
            "--config-file",
            FINETUNE_CONFIG,
            "--strict",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded: 207" in proc.stdout
    cfg, kind = load_any_config(FINETUNE_CONFIG)
    model = build_model_from_config(cfg, kind, device="cpu")
    assert isinstance(model, ImageClassifier)
    DetectionCheckpointer(model).load(dst)  # the converted file loads with a plain checkpointer
    torch.testing.assert_close(
        _logits(model, base_official["images"]), base_official["logits"], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_narrow_logits_match_through_convert_checkpoint(tiny_official, fused):
    net = ConvViTClassifierNet(num_classes=10, **TINY)
    net.set_fused_attn(fused)
    model = ImageClassifier(net=net)
    ckpt = torch.load(tiny_official["path"], weights_only=True)
    state, report = convert_checkpoint(ckpt, model, strict=True)
    assert report.problems == 0 and len(report.loaded) == len(model.state_dict())
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    images = _images(2, 224, seed=4)
    with torch.no_grad():
        expected = tiny_official["ref"](images)
    torch.testing.assert_close(_logits(model, images), expected, atol=ATOL, rtol=0)


def test_384_input_resizes_pos_embed_like_the_official_interpolation(tiny_official):
    """Ours with the 14x14 table run at 384 (resized on the fly), and ours with a 24x24 table
    loaded from the 224 file (resized by the converter), both equal the reference built for 384
    whose table went through MAE's ``interpolate_pos_embed``."""
    src = tiny_official["ref"]
    ref384 = OfficialConvViTClassifier(img_size=384, num_classes=10, **TINY).eval()
    state = dict(src.state_dict())
    state["pos_embed"] = resize_pos_embed_like_official(state["pos_embed"], 24)
    ref384.load_state_dict(state)
    images = _images(1, 384, seed=5)
    with torch.no_grad():
        expected = ref384(images)

    on_the_fly = ImageClassifier(net=ConvViTClassifierNet(num_classes=10, **TINY))
    ConvMAECheckpointer(on_the_fly, strict=True).load(tiny_official["path"])
    assert tuple(on_the_fly.net.pos_embed.shape) == (1, 196, 64)
    torch.testing.assert_close(_logits(on_the_fly, images), expected, atol=ATOL, rtol=0)

    stored_384 = ImageClassifier(
        net=ConvViTClassifierNet(num_classes=10, pos_embed_hw=(24, 24), **TINY)
    )
    checkpointer = ConvMAECheckpointer(stored_384, strict=True)
    checkpointer.load(tiny_official["path"])
    assert checkpointer.last_report.resized == [("net.pos_embed", (1, 196, 64), (1, 576, 64))]
    torch.testing.assert_close(_logits(stored_384, images), expected, atol=ATOL, rtol=0)


def test_linear_probe_pooled_features_equal_the_reference_pre_head_features(tiny_official):
    net = ConvViTClassifierNet(num_classes=10, linear_probe=True, **TINY)
    model = ImageClassifier(net=net)
    checkpointer = ConvMAECheckpointer(model)
    checkpointer.load(tiny_official["path"])
    report = checkpointer.last_report
    encoder = [k for k in model.state_dict() if not k.startswith("net.head.")]
    assert set(encoder) <= set(report.loaded)
    # the BatchNorm + Linear head is fresh; the file's plain head is left out
    assert report.problems == 0, report.summary()
    fresh = {k for keys in report.initialised.values() for k in keys}
    assert {"net.head.1.weight", "net.head.1.bias", "net.head.0.running_var"} <= fresh
    assert not any(k.startswith("net.head.") for k in report.loaded)
    images = _images(2, 224, seed=6)
    with torch.no_grad():
        expected = tiny_official["ref"].forward_features(images)
        pooled = model.eval().net.forward_pooled(images)
    assert pooled.shape == expected.shape == (2, 64)
    torch.testing.assert_close(pooled, expected, atol=ATOL, rtol=0)
    # training mode keeps the frozen encoder in eval: the same features
    with torch.no_grad():
        torch.testing.assert_close(net.train().forward_pooled(images), expected, atol=ATOL, rtol=0)


def test_a_head_of_another_class_count_is_reported_as_fresh(tiny_official):
    model = ImageClassifier(net=ConvViTClassifierNet(num_classes=5, **TINY))
    fresh_head = model.net.head.weight.detach().clone()
    checkpointer = ConvMAECheckpointer(model, strict=True)
    checkpointer.load(tiny_official["path"])  # neither raises nor counts as a problem
    report = checkpointer.last_report
    assert report.problems == 0, report.summary()
    fresh = {k for keys in report.initialised.values() for k in keys}
    assert {"net.head.weight", "net.head.bias"} <= fresh, report.summary()
    assert not {"net.head.weight", "net.head.bias"} & set(report.loaded)
    ignored = {k for keys in report.ignored.values() for k in keys}
    assert {"head.weight", "head.bias"} <= ignored, report.summary()  # the file's 10-class head
    torch.testing.assert_close(model.net.head.weight, fresh_head)  # the head keeps its init
    # everything before the head came from the file
    images = _images(1, 224, seed=7)
    with torch.no_grad():
        expected = tiny_official["ref"].forward_features(images)
        torch.testing.assert_close(
            model.eval().net.forward_pooled(images), expected, atol=ATOL, rtol=0
        )
