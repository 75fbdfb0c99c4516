"""CPU inference as a user runs it (``Predictor``, ``tools/demo.py``): the default fast paths (SDPA
attention, channels-last) give the detections of the plain path in fp32; ``--dtype bf16`` runs
where the CPU has native bf16 and is refused with a clear message elsewhere; the demo prints the
paths it uses.

Toy detector and segmenter, random weights (heads sharpened so that scores are not all tied).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import convmae_det  # noqa: F401
from convmae_det.fast_paths import fast_path_coverage
from convmae_det.visualization.predictor import (
    INFERENCE_PATHS,
    PLAIN_PATHS,
    Predictor,
    UnsupportedDtypeError,
    bf16_support,
    inference_paths,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET_TOY = os.path.join(ROOT, "configs/toy/mask_rcnn_convvitdet_toy.py")
SEG_TOY = os.path.join(ROOT, "configs/ADE20K/upernet_convmae_toy.yaml")
BF16_OK, BF16_WHY = bf16_support("cpu")


@pytest.fixture(scope="module")
def det_weights(tmp_path_factory):
    """Toy detector weights with a sharpened classifier (spread-out scores, as a trained model
    has), saved once so that every predictor starts from the same numbers."""
    from convmae_det.model_from_config import build_model_from_config, load_any_config

    torch.manual_seed(0)
    cfg, kind = load_any_config(DET_TOY)
    model = build_model_from_config(cfg, kind)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(200.0)
    path = str(tmp_path_factory.mktemp("w") / "det.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _predictor(weights, paths, config=DET_TOY, opts=None):
    pred = Predictor(config_file=config, opts=opts, weights=weights, device="cpu", paths=paths)
    if hasattr(pred.model, "roi_heads"):
        pred.model.roi_heads.box_predictor.test_score_thresh = 0.0  # every candidate detection
    return pred


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((150, 200), (96, 96))]


def test_default_paths_are_sdpa_and_channels_last_in_fp32():
    assert INFERENCE_PATHS.attn == "sdpa" and INFERENCE_PATHS.channels_last
    assert INFERENCE_PATHS.dtype == "fp32"
    assert PLAIN_PATHS.attn == "explicit" and not PLAIN_PATHS.channels_last
    pred = Predictor(config_file=SEG_TOY, opts=["MODEL.DEVICE", "cpu"], device="cpu")
    assert pred.paths == INFERENCE_PATHS
    coverage = fast_path_coverage(pred.model)
    assert coverage["sdpa_attention_modules"] == coverage["attention_modules"] > 0
    conv = next(m for m in pred.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_default_paths_give_the_plain_paths_detections_in_fp32(det_weights):
    fast, plain = _predictor(det_weights, INFERENCE_PATHS), _predictor(det_weights, PLAIN_PATHS)
    for image in _images():
        a, b = fast(image)["instances"], plain(image)["instances"]
        assert len(a) == len(b) > 10
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max() <= 1e-4
        assert (a.scores - b.scores).abs().max() <= 1e-5
        # masks thresholded at 0.5: a pixel may flip where the probability is 0.5 to 1e-6
        assert (a.pred_masks != b.pred_masks).float().mean() <= 1e-4


def test_default_paths_give_the_plain_paths_segmentation_in_fp32():
    torch.manual_seed(0)
    fast = _predictor("", INFERENCE_PATHS, SEG_TOY, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    plain = _predictor("", PLAIN_PATHS, SEG_TOY, ["MODEL.DEVICE", "cpu"])
    for image in _images():
        a, b = fast(image)["sem_seg"], plain(image)["sem_seg"]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_is_refused_with_a_clear_message_without_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    with pytest.raises(UnsupportedDtypeError) as info:
        inference_paths("bf16", device="cpu")
    message = str(info.value)
    assert message.startswith(
        "--dtype bf16 refused on cpu: this CPU has neither AVX512-BF16 nor AMX"
    )
    assert "use --dtype fp32" in message and "\n" not in message
    with pytest.raises(UnsupportedDtypeError, match="inference runs in 'fp32' or 'bf16'"):
        inference_paths("fp16")


@pytest.mark.skipif(not BF16_OK, reason=f"no native bf16: {BF16_WHY}")
def test_bf16_runs_and_agrees_with_fp32_where_the_cpu_has_it(det_weights):
    fp32 = _predictor(det_weights, INFERENCE_PATHS)
    bf16 = _predictor(det_weights, inference_paths("bf16"))
    assert bf16.paths.dtype == "bf16"
    a, b = fp32(_images()[0])["instances"], bf16(_images()[0])["instances"]
    assert b.scores.dtype == torch.float32 and b.pred_boxes.tensor.dtype == torch.float32
    assert len(b) > 10
    # close, not equal: the top detections keep their class and roughly their box
    top = 5
    assert (a.pred_classes[:top] == b.pred_classes[:top]).float().mean() >= 0.6
    iou = _best_iou(a.pred_boxes.tensor[:top], b.pred_boxes.tensor)
    assert iou.median() >= 0.8


def _best_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from detectron2.structures import Boxes, pairwise_iou

    return pairwise_iou(Boxes(a), Boxes(b)).max(dim=1).values


def _run_demo(tmp_path, *extra):
    from PIL import Image

    img = str(tmp_path / "x.png")
    Image.fromarray(_images()[1]).save(img)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--config-file", SEG_TOY,
         "--device", "cpu", "--input", img, "--output", str(tmp_path / "o.png"), *extra],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip


def test_demo_prints_the_paths_it_uses(tmp_path):
    proc = _run_demo(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "inference: cpu fp32, SDPA attention (2 of 2 modules SDPA), channels-last convolutions; "
        "same results as the plain path (to float rounding)" in proc.stdout.splitlines()
    ), proc.stdout
    proc = _run_demo(tmp_path, "--plain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "inference: cpu fp32, explicit attention (0 of 2 modules SDPA), NCHW convolutions; "
        "the plain reference path" in proc.stdout.splitlines()
    ), proc.stdout


def test_demo_bf16_runs_or_is_refused_depending_on_the_cpu(tmp_path):
    proc = _run_demo(tmp_path, "--dtype", "bf16")
    if BF16_OK:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"inference: cpu bf16 autocast ({BF16_WHY}), SDPA attention" in proc.stdout
        assert "results close to, not equal to, fp32" in proc.stdout
    else:
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"error: --dtype bf16 refused on cpu: {BF16_WHY}"
        ]
